"""Fused Triton kernels, each with a plain PyTorch reference of the same signature.

Every public function takes `impl="auto" | "triton" | "torch"`: "auto" runs Triton on CUDA tensors
(when triton is installed) and the reference elsewhere; "triton" insists (on the CPU it needs
TRITON_INTERPRET=1, Triton's interpreter); "torch" runs the reference. The Triton path is a
`torch.autograd.Function` whose forward and backward are Triton kernels.

What each Triton op keeps for backward is saved with `ctx.save_for_backward` and nothing else, so
`torch.autograd.graph.saved_tensors_hooks` sees exactly what stays alive. `SAVED_FOR_BACKWARD`
gives the same in bytes, as a function of the shapes, counting activations only: the parameters
(norm weights and biases) and the rotary tables that the ops also save are not counted.
"""
from __future__ import annotations

from typing import Callable

from autotune.kernels.layer_norm import layer_norm, layer_norm_torch
from autotune.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_torch
from autotune.kernels.rms_norm import rms_norm, rms_norm_torch
from autotune.kernels.rope import apply_rope, apply_rope_torch
from autotune.kernels.swiglu import swiglu, swiglu_torch

FP32 = 4

SAVED_FOR_BACKWARD: dict[str, Callable[..., int]] = {
    # x [rows, dim] in its dtype + 1/rms per row (fp32)
    "rms_norm": lambda rows, dim, itemsize: rows * dim * itemsize + rows * FP32,
    # x + mean and 1/std per row (fp32)
    "layer_norm": lambda rows, dim, itemsize: rows * dim * itemsize + 2 * rows * FP32,
    # gate and up; silu is recomputed in backward
    "swiglu": lambda numel, itemsize: 2 * numel * itemsize,
    # only cos and sin, the model's buffers
    "apply_rope": lambda *shape: 0,
    # d hidden [tokens, hidden] and d weight [vocab, hidden], made during the forward (compute dtype)
    "linear_cross_entropy": lambda tokens, hidden, vocab, itemsize: (tokens + vocab) * hidden * itemsize,
}

__all__ = [
    "SAVED_FOR_BACKWARD",
    "apply_rope", "apply_rope_torch",
    "layer_norm", "layer_norm_torch",
    "linear_cross_entropy", "linear_cross_entropy_torch",
    "rms_norm", "rms_norm_torch",
    "swiglu", "swiglu_torch",
]
