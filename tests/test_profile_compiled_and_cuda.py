"""What the engine keeps for backward where the CPU's eager measurement does not run it as the GPU
does: a compiled block (autotune.profile.COMPILED_SAVING, docs/formulas.md [Compiled blocks]),
measured again on the engine's model compiled as the engine compiles it, at a shape the table was
not measured at and one it was; and CUDA's fused RMSNorm (autotune.profile.cuda_norm_saving),
against a stand-in that keeps what aten._fused_rms_norm's backward takes."""
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from autotune.engine.config import ModelConfig
from autotune.profile import compiled_saving, cuda_norm_saving, measure_compiled_saving, measure_saved_bytes

SHAPES = ((48, 112, 1, 40), (64, 160, 2, 32))  # (h, f, b, s)


@pytest.mark.parametrize("family, precision, cast, checkpointing, every_k", [
    ("llama", "bf16", "params", "none", 2),  # the norms' fp32 intermediates and silu(gate) recomputed
    ("llama", "bf16", "params", "op", 2),
    ("gpt2", "bf16", "autocast", "none", 2),
])
def test_a_compiled_block_keeps_what_the_table_says_less(family, precision, cast, checkpointing, every_k):
    variant = "op2" if checkpointing == "op" else checkpointing
    per_h, per_f, per_block = compiled_saving(family, precision, cast, variant)
    assert per_h > 0
    for h, f, b, s in SHAPES:
        model = ModelConfig(name="t", family=family, n_layers=2, d_model=h, n_heads=4,
                            n_kv_heads=2 if family == "llama" else 4, d_ff=f, vocab_size=96, max_seq_len=64,
                            tie_embeddings=family == "gpt2")
        assert measure_compiled_saving(model, b, s, precision, cast, checkpointing, every_k) == (
            b * s * (per_h * h + per_f * f) + per_block), (h, f, b, s)


def test_full_checkpointing_keeps_the_same_compiled_or_not():
    model = ModelConfig(name="t", n_layers=2, d_model=48, n_heads=4, n_kv_heads=2, d_ff=112, vocab_size=96,
                        max_seq_len=64)
    assert compiled_saving("llama", "bf16", "params", "full") == (0, 0, 0)
    assert measure_compiled_saving(model, 1, 40, "bf16", "params", "full") == 0


class _CudaRMSNorm(torch.autograd.Function):
    """Keeps what CUDA's aten._fused_rms_norm keeps for its backward: the input, the weight and an
    fp32 rstd a row (values do not matter to what is saved)."""

    @staticmethod
    def forward(ctx, x, weight):
        rstd = torch.empty(x.shape[:-1] + (1,), dtype=torch.float32)
        ctx.save_for_backward(x, weight, rstd)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, dy):
        x, weight, _ = ctx.saved_tensors
        return torch.zeros_like(x), torch.zeros_like(weight)


@contextmanager
def cuda_rms_norm():
    rms_norm = F.rms_norm
    F.rms_norm = lambda x, shape, weight=None, eps=None: _CudaRMSNorm.apply(x, weight)
    try:
        yield
    finally:
        F.rms_norm = rms_norm


@pytest.mark.parametrize("precision, cast", [("bf16", "params"), ("bf16", "autocast"), ("fp32", "params")])
@pytest.mark.parametrize("checkpointing, norms", [("none", 2), ("attention", 2), ("op", 0), ("full", 0)])
def test_cudas_fused_rms_norm_keeps_less_than_the_cpus_by_the_stated_bytes(precision, cast, checkpointing, norms):
    model = ModelConfig(name="t", n_layers=2, d_model=48, n_heads=4, n_kv_heads=2, d_ff=112, vocab_size=96,
                        max_seq_len=64)
    b, s = 2, 24
    cpu = measure_saved_bytes(model, b, s, precision, cast, checkpointing)
    with cuda_rms_norm():
        cuda = measure_saved_bytes(model, b, s, precision, cast, checkpointing)
    per_norm = cuda_norm_saving("llama", precision, cast, 1)
    assert per_norm > 0
    assert cpu["block"] - cuda["block"] == cuda_norm_saving("llama", precision, cast, norms) * b * s * 48
    assert cpu["outside"] - cuda["outside"] == per_norm * b * s * 48  # the final norm


def test_the_estimate_on_cuda_keeps_every_eager_rms_norms_saving_less():
    """Without checkpointing: a block's two norms, dense or MoE (tiny-moe has one dense block and
    three MoE blocks), and the final norm."""
    import dataclasses

    from autotune.config import planner_config
    from autotune.estimate import estimate
    from autotune.hardware import load_hardware

    cfg = planner_config(["model=tiny-moe", "cluster=8xh100", "job.seq_len=64", "job.global_batch=4",
                          "plan.precision=bf16", "plan.zero_stage=0", "plan.micro_batch=4",
                          "plan.activation_checkpointing=none"])
    hw = load_hardware(cfg.cluster)
    cuda, cpu = (estimate(cfg.train, h).memory["activations_bytes"] for h in (hw, dataclasses.replace(hw, device="cpu")))
    m = cfg.train.model
    assert cpu - cuda == (2 * m.n_layers + 1) * cuda_norm_saving("llama", "bf16", "autocast", 1) * 4 * 64 * m.d_model
