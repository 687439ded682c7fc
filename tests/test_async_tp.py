"""Async tensor parallelism (plan.async_tp): the pipelined all-gather + matmul and matmul +
reduce-scatter against their plain collectives, and the engine's async tp plans against the same
plans without overlap, on 4 gloo ranks.

On 4 ranks (tests/conftest.py's four_rank_run, one launch shared with other modules):
the fused ops run on a ring of 4 (forward and every input's gradient, float64); the trajectories run
tp=4 (gpt2: biases on every linear, full checkpointing, so the ring runs again in recompute) and
tp=2 x dp=2 (llama, grouped-query attention, ZeRO-2), tp=2 x cp=2 in bf16 under autocast (the ring
attention between the pipelined projections) and tp=2 x pp=2 (1F1B over 4 micro-batches), each with
and without plan.async_tp.

Tolerance: async tp sums a row-parallel product in ring order and the weight gradients over the
gathered sequence in one matmul, where the plain collectives sum in another order. Observed over 3
AdamW steps: fp32 at most 1e-7 relative (tp=2 sums two terms and matches exactly), 1e-5 allowed;
bf16 at most 4.4e-5 (the gradient norm at step 3), 1e-3 allowed (a quarter of bf16's epsilon).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.nn.functional as F

from autotune.engine import dist
from autotune.engine.async_tp import AllGatherLinears, LinearReduceScatter
from autotune.engine.config import ConfigError, build_train_config
from autotune.engine.train import Engine, reduce_loss

STEPS = 3
LLAMA = dict(name="tiny", family="llama", n_layers=2, d_model=48, n_heads=4, n_kv_heads=2, d_ff=96,
             vocab_size=256, max_seq_len=64)
GPT2 = dict(LLAMA, family="gpt2", n_kv_heads=None)
JOB = dict(seq_len=16, global_batch=4, steps=STEPS, optimizer=dict(warmup_steps=1))
PLANS = {
    "gpt2_tp4": (GPT2, dict(tp=4, sequence_parallel=True, activation_checkpointing="full", micro_batch=2)),
    "llama_tp2_dp2_zero2": (LLAMA, dict(tp=2, dp=2, zero_stage=2, sequence_parallel=True, micro_batch=2)),
    "llama_tp2_cp2_bf16": (LLAMA, dict(tp=2, cp=2, sequence_parallel=True, micro_batch=4, precision="bf16")),
    "llama_tp2_pp2": (LLAMA, dict(tp=2, pp=2, sequence_parallel=True, micro_batch=1)),
}


def trajectory(model: dict, plan: dict) -> list[tuple[float, float]]:
    """(loss, gradient norm) of each step."""
    engine = Engine(build_train_config({"model": model, "job": JOB, "plan": plan}), dist.device_for_rank())
    results = [engine.step(step) for step in range(STEPS)]
    return [(reduce_loss(r.loss)[0], float(r.grad_norm)) for r in results]


def op_errors() -> dict[str, float]:
    """Largest relative error of each fused op's output and gradients against gathering, multiplying
    and reduce-scattering whole tensors (every rank builds the same global tensors)."""
    group, rank, tp = tdist.group.WORLD, tdist.get_rank(), tdist.get_world_size()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4 * tp, 6, generator=g, dtype=torch.float64)  # [b, s, d], s split over tp
    weights = [torch.randn(tp, 5, 6, generator=g, dtype=torch.float64) for _ in range(2)]  # column shards
    biases = [torch.randn(tp, 5, generator=g, dtype=torch.float64), None]
    grads = [torch.randn(2, 4 * tp, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    mine = [t.clone().requires_grad_() for t in (x.chunk(tp, 1)[rank], weights[0][rank], weights[1][rank],
                                                  biases[0][rank])]
    outs = AllGatherLinears.apply(mine[0], group, 2, mine[1], mine[2], mine[3], None)
    torch.autograd.backward(outs, grads)
    ref = [t.clone().requires_grad_() for t in (x, weights[0][rank], weights[1][rank], biases[0][rank])]
    ref_outs = [F.linear(ref[0], ref[1], ref[3]), F.linear(ref[0], ref[2])]
    torch.autograd.backward(ref_outs, grads)
    # every rank's x gradient term is summed over the ring: the reference sums the ranks' terms
    ref_x_grad = sum(grads[0] @ weights[0][r] + grads[1] @ weights[1][r] for r in range(tp)).chunk(tp, 1)[rank]
    errors = {f"ag out{i}": rel(a, b) for i, (a, b) in enumerate(zip(outs, ref_outs))}
    errors |= {"ag dx": rel(mine[0].grad, ref_x_grad)}
    errors |= {f"ag d{name}": rel(m.grad, r.grad) for name, m, r in zip(("w0", "w1", "b0"), mine[1:], ref[1:])}

    row = torch.randn(tp, 2, 4 * tp, 3, generator=g, dtype=torch.float64)  # each rank's [b, s, in/tp]
    w_row = torch.randn(tp, 6, 3, generator=g, dtype=torch.float64)
    grad_y = torch.randn(2, 4 * tp, 6, generator=g, dtype=torch.float64)
    xr, wr = row[rank].clone().requires_grad_(), w_row[rank].clone().requires_grad_()
    y = LinearReduceScatter.apply(xr, wr, group)
    y.backward(grad_y.chunk(tp, 1)[rank])
    ref_y = sum(F.linear(row[r], w_row[r]) for r in range(tp)).chunk(tp, 1)[rank]
    errors |= {"rs out": rel(y, ref_y), "rs dx": rel(xr.grad, grad_y @ w_row[rank]),
               "rs dw": rel(wr.grad, grad_y.flatten(0, 1).t() @ row[rank].flatten(0, 1))}
    return errors


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max() / b.detach().abs().max())


def on_four_ranks() -> dict:
    """Run on every rank (tests/tp_pp_worker.py's call): the fused ops' errors, and each plan's
    trajectory with and without overlap."""
    results: dict = {"ops": op_errors()}
    for name, (model, plan) in PLANS.items():
        for overlap in (True, False):
            results[name, overlap] = trajectory(model, dict(plan, async_tp=overlap))
    return results


def four_rank_spec(root: Path) -> dict:
    """What test_async_tp_follows_tp_without_overlap runs on 4 ranks (tests/tp_pp_worker.py's SPEC)."""
    return {"calls": {__name__: f"{__name__}:on_four_ranks"}}


def test_async_tp_follows_tp_without_overlap(four_rank_run):
    results = four_rank_run["out"][__name__]
    assert max(results["ops"].values()) < 1e-12, results["ops"]
    for name, (_, plan) in PLANS.items():
        rel = 1e-3 if plan.get("precision") == "bf16" else 1e-5
        for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(results[name, True], results[name, False])):
            assert loss == pytest.approx(ref_loss, rel=rel), f"{name}: step {step} loss"
            assert norm == pytest.approx(ref_norm, rel=rel), f"{name}: step {step} gradient norm"


@pytest.mark.parametrize("plan, message", [
    (dict(async_tp=True), "set plan.tp > 1 and plan.sequence_parallel=true"),
    (dict(async_tp=True, tp=2), "plan.sequence_parallel=False"),
    (dict(async_tp=True, tp=2, sequence_parallel=True, precision="bf16", fp8="tensorwise"), "use plan.fp8=none"),
])
def test_bad_async_tp_plans_are_refused_in_one_line(plan, message):
    with pytest.raises(ConfigError, match=message) as caught:
        build_train_config({"model": LLAMA, "job": JOB, "plan": plan})
    assert "\n" not in str(caught.value)
