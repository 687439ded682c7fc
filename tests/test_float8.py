"""Float8 training (plan.fp8, autotune/engine/float8.py): the float8 linear against PyTorch references,
and a tiny model's training against bf16's.

The references live here: a float64 matmul of the inputs quantized to float8 exactly as the recipe
says (amax scaling to e4m3's largest value, per tensor or per row with power-of-2 scales), which the
linear's forward must match to its bf16 output rounding; and the float64 product of the unquantized
inputs, which forward and backward must match within float8's error (e4m3 keeps 3 mantissa bits,
e5m2 2: a relative rounding error up to 2^-4 and 2^-3 per element, averaged down in a dot product).
"""
from __future__ import annotations

import functools

import pytest
import torch

from autotune.engine import dist
from autotune.engine.config import ConfigError, build_train_config
from autotune.engine.float8 import apply_float8, converts

pytest.importorskip("torchao")

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
TINY = dict(name="tiny", family="llama", n_layers=4, d_model=64, n_heads=4, n_kv_heads=2, d_ff=160,
            vocab_size=256, max_seq_len=128)
# few tokens: torch._scaled_mm on the CPU is a plain loop (about 50 ms for a 256 x 64 x 160 GEMM)
JOB = dict(seq_len=16, global_batch=4, steps=4, optimizer=dict(warmup_steps=2))
# (tokens, in, out): widths float8 GEMMs take (multiples of 16), token counts that are not
SHAPES = [(37, 64, 48), (5, 32, 96), (129, 160, 64)]


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm()).item()


def quantized(t: torch.Tensor, rowwise: bool) -> torch.Tensor:
    """t through e4m3 and back, in float64: scaled so its amax (per tensor, or per row with the scale
    rounded down to a power of 2) lands on e4m3's largest value."""
    t = t.double()
    amax = t.abs().amax(dim=-1, keepdim=True) if rowwise else t.abs().amax()
    scale = E4M3_MAX / amax.clamp(min=1e-12)
    if rowwise:
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    q = (t * scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.double() / scale


def float8_linear(recipe: str, n_in: int, n_out: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(a bf16 linear, the same weights as the engine's float8 linear)."""
    torch.manual_seed(0)
    plain = torch.nn.Linear(n_in, n_out, bias=False).to(torch.bfloat16)
    model = torch.nn.Module()  # the linear where the engine converts linears: in model.layers
    model.layers = torch.nn.Sequential(torch.nn.Linear(n_in, n_out, bias=False).to(torch.bfloat16))
    model.layers.load_state_dict(torch.nn.Sequential(plain).state_dict())
    plan = build_train_config({"model": TINY, "job": JOB, "plan": dict(precision="bf16", fp8=recipe)}).plan
    apply_float8(model, plan)
    assert type(model.layers[0]).__name__ == "Float8Linear"
    return plain, model.layers[0]


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("tokens, n_in, n_out", SHAPES)
def test_float8_linear_against_references(recipe, tokens, n_in, n_out):
    plain, fp8 = float8_linear(recipe, n_in, n_out)
    x = torch.randn(tokens, n_in, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    upstream = torch.randn(tokens, n_out, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    w = plain.weight
    rowwise = recipe == "rowwise"
    outs, grads = {}, {}
    for name, model in (("bf16", plain), ("fp8", fp8)):
        leaf = x.clone().requires_grad_()
        out = model(leaf)
        out.backward(upstream)
        outs[name], grads[name] = out, (leaf.grad, model.weight.grad)
    assert outs["fp8"].dtype == torch.bfloat16 and grads["fp8"][1].dtype == torch.bfloat16
    # forward: the quantized inputs' exact product, to the bf16 rounding of the output
    emulated = quantized(x, rowwise) @ quantized(w, rowwise).T
    assert rel_err(outs["fp8"], emulated) < 5e-3
    # against the unquantized product: float8's error, an order above bf16's
    exact = x.double() @ w.double().T
    forward_err, bf16_err = rel_err(outs["fp8"], exact), rel_err(outs["bf16"], exact)
    assert bf16_err < forward_err < 0.05, (forward_err, bf16_err)
    # backward: grad_input = g·W and grad_weight = gᵀ·x, in float8 (tensorwise: g in e5m2)
    exact_grads = (upstream.double() @ w.double(), upstream.double().T @ x.double())
    for what, got, ref, bf16 in zip(("grad_input", "grad_weight"), grads["fp8"], exact_grads, grads["bf16"]):
        err = rel_err(got, ref)
        assert rel_err(bf16, ref) < err < 0.1, (what, err)


def test_only_the_blocks_aligned_linears_become_float8():
    from autotune.engine.model import build_model

    model = build_model(build_train_config({"model": TINY, "job": JOB}).model, seed=0)
    apply_float8(model, build_train_config({"model": TINY, "job": JOB, "plan": dict(precision="bf16", fp8="rowwise")}).plan)
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert kinds.pop("lm_head") == "Linear"  # the head stays bf16
    assert len(kinds) == 7 * TINY["n_layers"] and set(kinds.values()) == {"Float8Linear"}
    assert not converts(torch.nn.Linear(64, 40), "layers.0.mlp.w_up")  # 40: no float8 GEMM
    # under tp each rank's shard must be a float8 width: 48 / 2 = 24 is not
    assert converts(torch.nn.Linear(64, 48), "layers.0.mlp.w_up") and not converts(torch.nn.Linear(64, 48), "layers.0.mlp.w_up", tp=2)


@pytest.fixture
def one_process_group():
    dist.init_distributed()
    yield
    dist.shutdown()


def train_losses(plan: dict) -> list[float]:
    from autotune.engine.train import Engine, reduce_loss

    engine = Engine(build_train_config({"model": TINY, "job": JOB, "plan": plan}), dist.device_for_rank())
    return [reduce_loss(engine.step(step).loss)[0] for step in range(JOB["steps"])]


@functools.cache
def one_process_losses(fp8: str, zero_stage: int) -> list[float]:
    """train_losses of bf16 (with float8 linears under `fp8`) on one process: trained once per
    session, the reference of several tests here and in tests/test_float8_tp.py (the caller holds
    a process group; nobody modifies the result)."""
    return train_losses(dict(micro_batch=4, precision="bf16", zero_stage=zero_stage, fp8=fp8))


@pytest.mark.parametrize("recipe, zero_stage", [("tensorwise", 0), ("rowwise", 0), ("tensorwise", 3)])
def test_tiny_model_trains_in_float8_as_in_bf16(one_process_group, recipe, zero_stage):
    ref = one_process_losses("none", zero_stage)
    losses = one_process_losses(recipe, zero_stage)
    assert losses != ref  # the linears really ran in float8
    assert losses == pytest.approx(ref, rel=0.02)


@pytest.mark.parametrize("plan, message", [
    (dict(fp8="tensorwise"), "set plan.precision=bf16"),
    (dict(fp8="e4m3"), "plan.fp8='e4m3': use one of none, tensorwise, rowwise"),
])
def test_float8_plan_errors(plan, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        build_train_config({"model": TINY, "job": JOB, "plan": plan})


def llama3_8b_on_8_h100(fp8: str, gpu: str = "h100-sxm-96g-500w"):
    """torchtitan's Llama 3 8B row: 8 H100 (Meta's 500 W HBM2e parts), FSDP, local batch 2 x 8192, compiled."""
    import dataclasses

    from omegaconf import OmegaConf

    from autotune.config import CONF_DIR
    from autotune.hardware import catalog_gpu

    model = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "llama-3-8b.yaml"))
    plan = dict(zero_stage=3, dp=8, micro_batch=2, precision="bf16", fp8=fp8, compile=True,
                activation_checkpointing="selective")
    cfg = build_train_config({"model": model, "job": dict(seq_len=8192, global_batch=16), "plan": plan})
    return cfg, dataclasses.replace(catalog_gpu(gpu), gpus_per_node=8)


def test_the_cost_model_moves_as_torchtitans_float8_runs():
    """torchtitan's published Llama 3 8B on 8 H100: float8 tensorwise with float8 all-gather trains
    faster than bf16 (5,760 -> 7,186 tokens/s per GPU eager; 6,667 -> 8,532 compiled) at about the
    same memory (82.4 -> 76.8 GiB reserved)."""
    from autotune.estimate import estimate

    est = {m: estimate(*llama3_8b_on_8_h100(m)) for m in ("none", "tensorwise", "rowwise")}
    speedup = est["tensorwise"].tokens_per_s / est["none"].tokens_per_s
    assert 1.1 < speedup < 1.4, speedup
    assert est["tensorwise"].allocated_bytes == pytest.approx(est["none"].allocated_bytes, rel=0.03)
    # rowwise: a slower forward GEMM, its backward GEMMs' rescales, transposed copies for its casts:
    # between the two (torchao's docs, 8 H100, compiled, bs 1: bf16 6,150, rowwise 6,768, tensorwise 7,689.5)
    assert est["none"].tokens_per_s < est["rowwise"].tokens_per_s < est["tensorwise"].tokens_per_s


def test_a_gpu_without_float8_refuses_it_and_the_search_tries_it_where_it_runs():
    from autotune.config import ClusterConfig, SearchConfig
    from autotune.estimate import estimate
    from autotune.hardware import catalog_gpu, fp8_modes
    from autotune.plans import enumerate_plans, plan_from_row, plan_label

    cfg, _ = llama3_8b_on_8_h100("tensorwise")
    with pytest.raises(ConfigError, match="plan.fp8=tensorwise: A100-SXM4-80GB has no float8 tensor cores"):
        estimate(cfg, catalog_gpu("a100-80g"))
    assert fp8_modes(catalog_gpu("a100-80g")) == ["none"] and fp8_modes(catalog_gpu("a10g")) == ["none"]
    train = build_train_config({"model": TINY, "job": JOB})
    cluster = ClusterConfig(name="two", gpu="h100-sxm", gpus_per_node=2)
    plans = enumerate_plans(train, cluster, SearchConfig(), fp8=fp8_modes(catalog_gpu("h100-sxm")))
    fp8 = plans[plans["fp8"] != "none"]
    assert set(fp8["fp8"]) == {"tensorwise", "rowwise"}
    assert (fp8["precision"] == "bf16").all() and set(fp8["tp"]) == {1, 2}
    # each bf16 plan, with tp or not, once per recipe
    assert len(fp8) == 2 * ((plans["fp8"] == "none") & (plans["precision"] == "bf16")).sum()
    assert "fp8:rowwise" in plan_label(plan_from_row(fp8[fp8["fp8"] == "rowwise"].iloc[0]))
    assert (enumerate_plans(train, cluster, SearchConfig())["fp8"] == "none").all()


def test_emit_says_deepspeed_has_no_float8_training():
    from autotune.config import ClusterConfig
    from autotune.emit import ds_config, launch_script

    cfg, _ = llama3_8b_on_8_h100("tensorwise")
    note = ds_config(cfg)["autotune"]["note"]
    assert "DeepSpeed has no float8 training of its own" in note and "float8 all-gather" in note
    assert "fp8=tensorwise" in launch_script(cfg, ClusterConfig(name="node", gpu="h100-sxm", gpus_per_node=8))


def test_the_cost_model_under_tp_sp_float8():
    """Llama 3 8B tp 8 with sequence parallel on one H100 node: each rank's GEMM shards at the
    float8 rate; the tp collectives as bf16's but for the all-gathers in float8 (4 a block and
    micro-batch: inputs forward, output gradients backward) and one scalar amax all-reduce per
    tp-sharded tensorwise cast (fwd 4 inputs + 7 weights, bwd 7 output gradients) [Float8]."""
    from omegaconf import OmegaConf

    from autotune.config import CONF_DIR
    from autotune.estimate import estimate
    from autotune.estimate.collectives import collective_time

    _, hw = llama3_8b_on_8_h100("none")
    model = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "llama-3-8b.yaml"))
    est = {}
    for fp8 in ("none", "tensorwise", "rowwise"):
        plan = dict(fp8=fp8, tp=8, dp=1, sequence_parallel=True, zero_stage=0, micro_batch=1, precision="bf16",
                    activation_checkpointing="none")
        cfg = build_train_config({"model": model, "job": dict(seq_len=8192, global_batch=16), "plan": plan})
        est[fp8] = estimate(cfg, hw)
    assert est["tensorwise"].compute["matmul_s"] < 0.8 * est["none"].compute["matmul_s"]
    layers, micro_batches = cfg.model.n_layers, 16  # global batch 16, one sequence a micro-batch
    n = 8192 * cfg.model.d_model  # one micro-batch's [s, d] residual stream
    gathers = micro_batches * 4 * layers * (collective_time("all_gather", 2 * n, 8, 8, hw) - collective_time("all_gather", n, 8, 8, hw))
    amaxes = micro_batches * (11 + 7) * layers * collective_time("all_reduce", 4, 8, 8, hw)
    comm = {m: e.time["tp_comm_s"] for m, e in est.items()}
    assert 0 < gathers - amaxes and comm["none"] - comm["tensorwise"] == pytest.approx(gathers - amaxes, rel=1e-6)
    assert comm["rowwise"] == pytest.approx(comm["none"])  # bf16 gathers, per-row scales: no amax all-reduce


def test_rowwise_costs_what_torchao_runs():
    """Rowwise as torchao runs it [Float8]: the forward GEMM (CUTLASS rowwise) at 0.9 of tensorwise's
    rate, the backward GEMMs at tensorwise's (cuBLAS, unit scales); then, by hand on TINY (K·N of a
    block's 7 linears 43,008; per token: input gradients 544, output gradients 576, inputs cast once
    352; 16 tokens), each backward GEMM's output rescaled, 4 bytes an element compiled and 12 eager,
    and compiled 2 bytes an element more of each operand cast along its other axis."""
    import dataclasses

    from autotune.estimate.arrays import PlanArrays
    from autotune.estimate.float8 import rate_ratio, rowwise_backward_bytes
    from autotune.hardware import catalog_gpu
    from autotune.plans import plans_frame

    cfg = build_train_config({"model": TINY, "job": JOB, "plan": dict(precision="bf16")})
    recipes = [("rowwise", True), ("rowwise", False), ("tensorwise", True)]
    plans = PlanArrays.of(plans_frame([dataclasses.replace(cfg.plan, fp8=fp8, compile=c) for fp8, c in recipes]), cfg.job)
    hw = catalog_gpu("h100-sxm")
    rates = rate_ratio(plans, hw, hw.matmul_efficiency)
    assert rates["fwd"][0] == pytest.approx(0.9 * rates["fwd"][2]) and rates["bwd"][0] == pytest.approx(rates["bwd"][2])
    assert rates["bwd"][2] == pytest.approx(1979 * 0.65 / (989 * 0.80), rel=1e-3)  # the catalog's float8 over bf16
    tokens = JOB["seq_len"]
    compiled = 4 * (544 * tokens + 43008) + 2 * ((576 + 352) * tokens + 43008)
    eager = 12 * (544 * tokens + 43008)
    assert rowwise_backward_bytes(cfg.model, plans, tokens).tolist() == pytest.approx([compiled, eager, 0])
