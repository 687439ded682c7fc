"""SwiGLU gating: silu(gate) * up, elementwise.

Triton forward: one pass over gate and up, math in fp32, output in their dtype. Saved for backward:
gate and up only; the backward recomputes sigmoid(gate) instead of keeping silu(gate) or the
product, so nothing beyond the two inputs (which the MLP's matmuls produced anyway) stays alive.
"""
from __future__ import annotations

import torch

from autotune.kernels._common import LazyKernel, cdiv, check_float, use_triton

try:
    import triton.language as tl
except ImportError:
    tl = None

BLOCK = 1024


def _swiglu_fwd(GATE, UP, OUT, numel, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    g = tl.load(GATE + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offsets, (g * tl.sigmoid(g) * u).to(OUT.dtype.element_ty), mask=mask)


def _swiglu_bwd(GATE, UP, DOUT, DGATE, DUP, numel, BLOCK: tl.constexpr):
    # d silu(g)/dg = sig * (1 + g * (1 - sig))
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    g = tl.load(GATE + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offsets, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(DOUT + offsets, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    tl.store(DGATE + offsets, (dout * u * sig * (1.0 + g * (1.0 - sig))).to(DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + offsets, (dout * g * sig).to(DUP.dtype.element_ty), mask=mask)


_fwd_kernel = LazyKernel(_swiglu_fwd)
_bwd_kernel = LazyKernel(_swiglu_bwd)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(gate)
        _fwd_kernel[(cdiv(gate.numel(), BLOCK),)](gate, up, out, gate.numel(), BLOCK=BLOCK)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        gate, up = ctx.saved_tensors
        dout = dout.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        _bwd_kernel[(cdiv(gate.numel(), BLOCK),)](gate, up, dout, dgate, dup, gate.numel(), BLOCK=BLOCK)
        return dgate, dup


@torch.compiler.disable  # under torch.compile the kernels run as they are, between compiled graphs
def _swiglu_triton(gate, up):
    return SwiGLUFunction.apply(gate, up)


def swiglu_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The reference: math in fp32 (or the input's precision when higher), output in the inputs' dtype."""
    g = gate.to(torch.promote_types(gate.dtype, torch.float32))
    return (g * torch.sigmoid(g) * up.to(g.dtype)).to(gate.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """silu(gate) * up for gate and up of one shape and dtype; impl "auto", "triton" or "torch"."""
    check_float("gate", gate)
    check_float("up", up)
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have one shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.dtype != up.dtype:
        raise TypeError(f"gate and up must have one dtype, got {gate.dtype} and {up.dtype}")
    if use_triton(impl, gate, up):
        return _swiglu_triton(gate, up)
    return swiglu_torch(gate, up)
