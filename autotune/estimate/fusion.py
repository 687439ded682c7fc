"""What a compiled block's memory-bound ops move (plan.compile; [Compiled blocks] in docs/formulas.md).

The engine compiles each block (engine.parallel.apply_compile); its matmuls and SDPA stay library
kernels, and inductor fuses the elementwise and reduction ops between them into one kernel per
chain, which reads the chain's inputs once and writes only what leaves it (what a later kernel or
backward reads). `compiled_kernels` lists those kernels of one dense block of the engine's model
(autotune/engine/model.py), each with the bytes it moves as coefficients of the traffic fit's
features (TRAFFIC_BLOCK_FEATURES: per token of the micro-batch, h, f, q and kv wide, and the rotary
tables); `compiled_block_traffic` sums them. They replace the eager count of the block's activation
traffic (measured, autotune/profile/traffic.py); its weight term stays (autocast's weight casts feed
the library matmuls, and gradients accumulate outside the compiled graph).
"""
from __future__ import annotations

from typing import NamedTuple

from autotune.engine.config import ModelConfig

STAT_BYTES = 4  # a norm's per-token fp32 statistics (rstd; LayerNorm's mean too)
TABLE_BYTES = 4  # a rotary kernel reads cos and sin, d/2 fp32 each, of every position: 4 bytes per unit of s·d


class Kernel(NamedTuple):
    """One fused kernel of a compiled block: its phase and the bytes it moves per unit of each feature."""

    name: str
    phase: str  # fwd | bwd
    bytes: dict[str, float]


def widths(precision: str, cast: str) -> tuple[int, int]:
    """Bytes an element of the residual stream and of the tensors between the matmuls. 16-bit
    weights (cast=params): both 16-bit; autocast: the residual stream stays fp32 (the fp32 embedding
    plus the matmuls' 16-bit outputs), the matmuls' inputs and outputs are 16-bit."""
    act = 4 if precision == "fp32" else 2
    return (4 if cast == "autocast" else act), act


def compiled_kernels(model: ModelConfig, precision: str, cast: str) -> list[Kernel]:
    """The fused kernels of one dense block, forward then backward (matmuls and SDPA not included).

    Forward: the first norm; rotary on q, and on k with GQA's repeat written out (SDPA reads the
    repeated k and v); v's repeat; the residual add fused with the second norm; SwiGLU (or GELU);
    the last residual add. Backward in reverse: each norm's backward fused with the sum of the
    gradients its input receives (the matmuls' partial gradients and the residual's); rotary's and
    the repeat's backward (the group's gradients summed); under autocast, the fp32 gradient
    arriving at the block cast to 16 bits for the first matmul and the residual's gradient written
    again in 16 bits for wo's; the biases' gradients as one reduction each."""
    residual, act = widths(precision, cast)
    llama = model.family == "llama"
    gqa = model.kv_heads != model.n_heads
    stats = STAT_BYTES * (1 if llama else 2)
    rope = {"sd": TABLE_BYTES} if llama else {}
    mlp_fwd = {"f": 3 * act} if llama else {"f": 2 * act}  # SwiGLU reads gate and up; GELU its input
    fwd = [
        Kernel("norm", "fwd", {"tok": stats, "h": residual + act}),
        *([Kernel("rope_q", "fwd", {"q": 2 * act} | rope), Kernel("rope_k", "fwd", {"kv": act, "q": act} | rope)] if llama else []),
        *([Kernel("repeat_v", "fwd", {"kv": act, "q": act})] if gqa else []),
        Kernel("add_norm", "fwd", {"tok": stats, "h": 2 * residual + 2 * act}),
        Kernel("swiglu" if llama else "gelu", "fwd", mlp_fwd),
        Kernel("add", "fwd", {"h": 2 * residual + act}),
    ]
    autocast = cast == "autocast" and precision != "fp32"
    biased = model.family == "gpt2"
    bwd = [
        *([Kernel("cast_grad", "bwd", {"h": residual + act})] if autocast else []),
        Kernel("swiglu_bwd", "bwd", {"f": 5 * act}) if llama else Kernel("gelu_bwd", "bwd", {"f": 3 * act}),
        Kernel("norm_bwd", "bwd", {"tok": stats, "h": 2 * act + 3 * residual + (act if autocast else 0)}),
        *([Kernel("rope_q_bwd", "bwd", {"q": 2 * act} | rope), Kernel("rope_k_bwd", "bwd", {"q": act, "kv": act} | rope)]
          if llama else []),
        *([Kernel("repeat_v_bwd", "bwd", {"q": act, "kv": act})] if gqa else []),
        Kernel("norm_bwd", "bwd", {"tok": stats, "h": 3 * act + 3 * residual}),
        *([Kernel(f"bias_{w}_bwd", "bwd", {width: act}) for w, width in (("q", "q"), ("k", "kv"), ("v", "kv"))]
          if biased or model.qkv_bias else []),
        *([Kernel(f"bias_{w}_bwd", "bwd", {width: act}) for w, width in (("o", "h"), ("up", "f"), ("down", "h"))]
          if biased else []),
    ]
    return fwd + bwd


def library_kernels(model: ModelConfig) -> dict[str, int]:
    """The block's matmuls (backward: input and weight gradients) and SDPA, per phase: the kernels a
    compiled block launches besides its fused ones."""
    matmuls = 7 if model.family == "llama" else 6
    return {"fwd": matmuls + 1, "bwd": 2 * matmuls + 1}


def compiled_block_traffic(model: ModelConfig, precision: str, cast: str) -> dict[str, dict[str, float]]:
    """{"block_fwd", "block_bwd": bytes per unit of each feature, summed over `compiled_kernels`;
    "ops": {"block_fwd", "block_bwd": the kernels launched}}."""
    kernels = compiled_kernels(model, precision, cast)
    out: dict[str, dict[str, float]] = {f"block_{p}": {} for p in ("fwd", "bwd")}
    for k in kernels:
        total = out[f"block_{k.phase}"]
        for feature, nbytes in k.bytes.items():
            total[feature] = total.get(feature, 0.0) + nbytes
    library = library_kernels(model)
    out["ops"] = {f"block_{p}": float(sum(k.phase == p for k in kernels) + library[p]) for p in ("fwd", "bwd")}
    return out
