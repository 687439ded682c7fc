"""Float8 training under tensor parallelism (plan.fp8 with plan.tp, autotune/engine/float8.py): one
run on 2 gloo ranks (tests/conftest.py's two_rank_run, one launch shared with other modules), checked
in the test process against one-process references.

- A float8 linear, column- and row-parallel over the 2 ranks (torchao's float8 tp styles for
  tensorwise, torch's for rowwise): forward and backward within float8's error of the float64
  product, and, where each rank's shard holds whole rows of the scaled tensors, equal to the
  quantized inputs' product to bf16 rounding, which needs the scales of the whole tensors (the
  tensorwise amaxes all-reduced over tp).
- A tiny model trained tp=2 in float8 (tensorwise, with and without sequence parallel, with ZeRO-3's
  float8 all-gather; rowwise with sequence parallel): losses within float8's error of the same plan
  without tp and of bf16, and not bf16's.

gloo has no float8 dtype, so under sequence parallel on gloo the input and the output's gradient
are all-gathered in bf16 and cast after; the float8 wire format runs on NCCL only.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from test_float8 import JOB, TINY, float8_linear, one_process_losses, quantized, rel_err, train_losses

pytest.importorskip("torchao")

TOKENS, N_IN, N_OUT = 37, 64, 96  # each rank's shard of either width a multiple of 16
TP_PLANS = {
    "tensorwise": dict(fp8="tensorwise"),
    "tensorwise_sp_zero3": dict(fp8="tensorwise", sequence_parallel=True, zero_stage=3),
    "rowwise_sp": dict(fp8="rowwise", sequence_parallel=True),
}


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(TOKENS, N_IN, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    upstream = torch.randn(TOKENS, N_OUT, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    return x, upstream


def tp_linear(recipe: str, parallel: str, mesh) -> tuple[torch.Tensor, ...]:
    """Output, input gradient and weight gradient, whole, of the float8 linear `parallel` ("col" or
    "row") over the tp mesh, in the styles the engine gives a sublayer of such linears."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from autotune.engine.float8 import tp_styles

    _, fp8 = float8_linear(recipe, N_IN, N_OUT)
    styles = tp_styles(fp8, gloo_gather=False) or (ColwiseParallel, RowwiseParallel, None)
    parallelize_module(fp8, mesh, (styles[0] if parallel == "col" else styles[1])(use_local_output=False))
    x, upstream = inputs()
    leaf = x.clone().requires_grad_()
    rank = mesh.get_local_rank()
    out = fp8(leaf if parallel == "col" else leaf.chunk(2, dim=-1)[rank]).full_tensor()
    out.backward(upstream)
    grad_input = leaf.grad
    if parallel == "row":  # each rank's gradient covers its own columns of x
        torch.distributed.all_reduce(grad_input)
    # clone: a gathered tensor is waited on and becomes a plain tensor
    return out.detach().clone(), grad_input, fp8.weight.grad.full_tensor().clone()


def on_two_ranks() -> dict:
    """Run on 2 ranks (tests/tp_pp_worker.py's call): the tp float8 linears and the tiny model's
    losses under each tp plan."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2,))
    results = {(recipe, parallel): tp_linear(recipe, parallel, mesh)
               for recipe in ("tensorwise", "rowwise") for parallel in ("col", "row")}
    results.update({name: train_losses(dict(plan, micro_batch=4, precision="bf16", tp=2, dp=1))
                    for name, plan in TP_PLANS.items()})
    return results


def two_rank_spec(root: Path) -> dict:
    """What this module's tests read from 2 ranks (tests/tp_pp_worker.py's SPEC)."""
    return {"calls": {__name__: f"{__name__}:on_two_ranks"}}


@pytest.fixture
def two_ranks(two_rank_run) -> dict:
    return two_rank_run["out"][__name__]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("parallel", ["col", "row"])
def test_tensor_parallel_float8_linear_against_references(two_ranks, recipe, parallel):
    out, grad_input, grad_weight = two_ranks[(recipe, parallel)]
    plain, _ = float8_linear(recipe, N_IN, N_OUT)
    x, upstream = inputs()
    w = plain.weight.detach()
    rowwise = recipe == "rowwise"
    if not (rowwise and parallel == "row"):  # a row-parallel rank's rows are half rows: other scales
        assert rel_err(out, quantized(x, rowwise) @ quantized(w, rowwise).T) < 5e-3
    leaf = x.clone().requires_grad_()
    bf16_out = plain(leaf)
    bf16_out.backward(upstream)
    exact = (x.double() @ w.double().T, upstream.double() @ w.double(), upstream.double().T @ x.double())
    bf16 = (bf16_out, leaf.grad, plain.weight.grad)
    for what, got, ref, bf16_got, bound in zip(("output", "grad_input", "grad_weight"), (out, grad_input, grad_weight),
                                                exact, bf16, (0.05, 0.1, 0.1)):
        err = rel_err(got, ref)
        assert rel_err(bf16_got, ref) < err < bound, (what, err)


@pytest.fixture(scope="module")
def one_process() -> dict[str, list[float]]:
    """The tiny model's losses without tp, in bf16 and under each float8 recipe."""
    from autotune.engine import dist

    dist.init_distributed()
    try:
        return {fp8: one_process_losses(fp8, 0) for fp8 in ("none", "tensorwise", "rowwise")}
    finally:
        dist.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("name", TP_PLANS)
def test_tiny_model_trains_in_float8_under_tp_as_without(two_ranks, one_process, name):
    losses, bf16 = two_ranks[name], one_process["none"]
    assert len(losses) == JOB["steps"] and losses != bf16  # the linears really ran in float8
    assert losses == pytest.approx(one_process[TP_PLANS[name]["fp8"]], rel=0.02)
    assert losses == pytest.approx(bf16, rel=0.02)
