"""RMSNorm over the last dimension: y = x / sqrt(mean(x^2) + eps) * weight.

Triton forward: one program per row, statistics in fp32, output in x's dtype. Saved for backward:
x and the per-row 1/rms (fp32), plus the weight (a parameter); the normalised x is recomputed.
Backward: a few programs per SM, each walking a contiguous range of rows and summing its partial
weight gradient in registers (in a per-program row of memory for rows longer than MAX_BLOCK); the
partials are then summed in fp32.
"""
from __future__ import annotations

import torch

from autotune.kernels._common import (LazyKernel, cdiv, check_float, check_shape, num_programs, num_warps, row_block,
                             use_triton)

try:
    import triton.language as tl
except ImportError:
    tl = None

MAX_BLOCK = 16384  # columns one program holds at once; longer rows loop over blocks


def _rms_norm_fwd(X, W, Y, RSTD, N, eps, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    X += row * N
    Y += row * N
    if ONE_BLOCK:  # the row stays in registers between the statistics and the output
        mask = cols < N
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)
    else:
        sum_sq = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, N, BLOCK):
            mask = start + cols < N
            x = tl.load(X + start + cols, mask=mask, other=0.0).to(tl.float32)
            sum_sq += x * x
        rstd = 1.0 / tl.sqrt(tl.sum(sum_sq, axis=0) / N + eps)
        for start in range(0, N, BLOCK):
            mask = start + cols < N
            x = tl.load(X + start + cols, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(Y + start + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


def _rms_norm_bwd(X, W, DY, DX, RSTD, DW_PARTIAL, M, N, rows_per_program,
                  BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    # dx = rstd * (w*dy - xhat * mean(xhat * w*dy)),  dw = sum over rows of dy * xhat
    pid = tl.program_id(0).to(tl.int64)  # int64 row offsets: rows * N may pass 2**31
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK)
    DW_PARTIAL += pid * N
    if ONE_BLOCK:
        mask = cols < N
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        for row in range(row_start, row_end):
            offset = row * N
            x = tl.load(X + offset + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + offset + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            xhat = x * rstd
            wdy = w * dy
            c = tl.sum(xhat * wdy, axis=0) / N
            tl.store(DX + offset + cols, ((wdy - xhat * c) * rstd).to(DX.dtype.element_ty), mask=mask)
            dw += dy * xhat
        tl.store(DW_PARTIAL + cols, dw, mask=mask)
    else:
        for row in range(row_start, row_end):
            offset = row * N
            rstd = tl.load(RSTD + row)
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, N, BLOCK):
                mask = start + cols < N
                x = tl.load(X + offset + start + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + offset + start + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
                acc += x * rstd * w * dy
            c = tl.sum(acc, axis=0) / N
            for start in range(0, N, BLOCK):
                mask = start + cols < N
                x = tl.load(X + offset + start + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + offset + start + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
                xhat = x * rstd
                tl.store(DX + offset + start + cols, ((w * dy - xhat * c) * rstd).to(DX.dtype.element_ty),
                         mask=mask)
                dw = tl.load(DW_PARTIAL + start + cols, mask=mask, other=0.0)
                tl.store(DW_PARTIAL + start + cols, dw + dy * xhat, mask=mask)


_fwd_kernel = LazyKernel(_rms_norm_fwd)
_bwd_kernel = LazyKernel(_rms_norm_bwd)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        n = x.shape[-1]
        rows = x.numel() // n
        y = torch.empty_like(x)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        block = row_block(n, MAX_BLOCK)
        _fwd_kernel[(rows,)](x, weight, y, rstd, n, eps, BLOCK=block, ONE_BLOCK=block >= n,
                             num_warps=num_warps(block))
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        dy = dy.contiguous()
        n = x.shape[-1]
        rows = x.numel() // n
        dx = torch.empty_like(x)
        programs = num_programs(x.device, rows)
        dw_partial = torch.zeros(programs, n, dtype=torch.float32, device=x.device)
        block = row_block(n, MAX_BLOCK)
        _bwd_kernel[(programs,)](x, weight, dy, dx, rstd, dw_partial, rows, n, cdiv(rows, programs),
                                 BLOCK=block, ONE_BLOCK=block >= n, num_warps=num_warps(block))
        return dx, dw_partial.sum(0).to(weight.dtype), None


@torch.compiler.disable  # under torch.compile the kernels run as they are, between compiled graphs
def _rms_norm_triton(x, weight, eps):
    return RMSNormFunction.apply(x, weight, eps)


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The reference: statistics in fp32 (or the input's precision when higher), output in x's dtype."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(xf.dtype)
    return y.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, impl: str = "auto") -> torch.Tensor:
    """RMSNorm of x [..., n] with weight [n]; impl "auto" (Triton on CUDA), "triton" or "torch"."""
    check_float("x", x)
    check_float("weight", weight)
    check_shape("weight", weight, (x.shape[-1],))
    if use_triton(impl, x, weight):
        return _rms_norm_triton(x, weight, eps)
    return rms_norm_torch(x, weight, eps)
