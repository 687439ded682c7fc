"""LayerNorm over the last dimension: y = (x - mean) / sqrt(var + eps) * weight + bias.

Triton forward: one program per row, statistics in fp32 (two-pass variance), output in x's dtype.
Saved for backward: x and the per-row mean and 1/std (fp32), plus weight and bias (parameters).
Backward: a few programs per SM over contiguous row ranges, partial weight/bias gradients kept in
registers (in per-program rows of memory for rows longer than MAX_BLOCK) and summed in fp32.
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


def _layer_norm_fwd(X, W, B, Y, MEAN, RSTD, N, eps,
                    BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    X += row * N
    Y += row * N
    if ONE_BLOCK:  # the row stays in registers between the statistics and the output
        mask = cols < N
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / N
        xc = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / N + eps)
        y = xc * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, N, BLOCK):
            acc += tl.load(X + start + cols, mask=start + cols < N, other=0.0).to(tl.float32)
        mean = tl.sum(acc, axis=0) / N
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, N, BLOCK):
            mask = start + cols < N
            xc = tl.where(mask, tl.load(X + start + cols, mask=mask, other=0.0).to(tl.float32) - mean, 0.0)
            acc += xc * xc
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
        for start in range(0, N, BLOCK):
            mask = start + cols < N
            x = tl.load(X + start + cols, mask=mask, other=0.0).to(tl.float32)
            y = (x - mean) * rstd * tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y += tl.load(B + start + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(Y + start + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


def _layer_norm_bwd(X, W, DY, DX, MEAN, RSTD, DW_PARTIAL, DB_PARTIAL, M, N, rows_per_program,
                    BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr):
    # dx = rstd * (w*dy - xhat * mean(xhat * w*dy) - mean(w*dy)),  dw = sum dy*xhat,  db = sum dy
    pid = tl.program_id(0).to(tl.int64)  # int64 row offsets: rows * N may pass 2**31
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK)
    DW_PARTIAL += pid * N
    DB_PARTIAL += pid * N
    if ONE_BLOCK:
        mask = cols < N
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        db = tl.zeros([BLOCK], dtype=tl.float32)
        for row in range(row_start, row_end):
            offset = row * N
            x = tl.load(X + offset + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + offset + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            xhat = tl.where(mask, (x - tl.load(MEAN + row)) * rstd, 0.0)
            wdy = w * dy
            c1 = tl.sum(xhat * wdy, axis=0) / N
            c2 = tl.sum(wdy, axis=0) / N
            tl.store(DX + offset + cols, ((wdy - xhat * c1 - c2) * rstd).to(DX.dtype.element_ty), mask=mask)
            dw += dy * xhat
            db += dy
        tl.store(DW_PARTIAL + cols, dw, mask=mask)
        if HAS_BIAS:
            tl.store(DB_PARTIAL + cols, db, mask=mask)
    else:
        for row in range(row_start, row_end):
            offset = row * N
            mean = tl.load(MEAN + row)
            rstd = tl.load(RSTD + row)
            acc1 = tl.zeros([BLOCK], dtype=tl.float32)
            acc2 = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, N, BLOCK):
                mask = start + cols < N
                x = tl.load(X + offset + start + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + offset + start + cols, mask=mask, other=0.0).to(tl.float32)
                wdy = tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32) * dy
                acc1 += tl.where(mask, (x - mean) * rstd, 0.0) * wdy
                acc2 += wdy
            c1 = tl.sum(acc1, axis=0) / N
            c2 = tl.sum(acc2, axis=0) / N
            for start in range(0, N, BLOCK):
                mask = start + cols < N
                x = tl.load(X + offset + start + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + offset + start + cols, mask=mask, other=0.0).to(tl.float32)
                wdy = tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32) * dy
                xhat = (x - mean) * rstd
                tl.store(DX + offset + start + cols, ((wdy - xhat * c1 - c2) * rstd).to(DX.dtype.element_ty),
                         mask=mask)
                dw = tl.load(DW_PARTIAL + start + cols, mask=mask, other=0.0)
                tl.store(DW_PARTIAL + start + cols, dw + dy * xhat, mask=mask)
                if HAS_BIAS:
                    db = tl.load(DB_PARTIAL + start + cols, mask=mask, other=0.0)
                    tl.store(DB_PARTIAL + start + cols, db + dy, mask=mask)


_fwd_kernel = LazyKernel(_layer_norm_fwd)
_bwd_kernel = LazyKernel(_layer_norm_bwd)


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
        n = x.shape[-1]
        rows = x.numel() // n
        y = torch.empty_like(x)
        mean = torch.empty(rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        block = row_block(n, MAX_BLOCK)
        # without a bias the weight stands in for the unused pointer (never read)
        _fwd_kernel[(rows,)](x, weight, weight if bias is None else bias, y, mean, rstd, n, eps,
                             BLOCK=block, ONE_BLOCK=block >= n, HAS_BIAS=bias is not None,
                             num_warps=num_warps(block))
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, mean, rstd = ctx.saved_tensors
        dy = dy.contiguous()
        n = x.shape[-1]
        rows = x.numel() // n
        dx = torch.empty_like(x)
        programs = num_programs(x.device, rows)
        dw_partial = torch.zeros(programs, n, dtype=torch.float32, device=x.device)
        db_partial = torch.zeros_like(dw_partial) if ctx.has_bias else dw_partial
        block = row_block(n, MAX_BLOCK)
        _bwd_kernel[(programs,)](x, weight, dy, dx, mean, rstd, dw_partial, db_partial, rows, n,
                                 cdiv(rows, programs), BLOCK=block, ONE_BLOCK=block >= n,
                                 HAS_BIAS=ctx.has_bias, num_warps=num_warps(block))
        db = db_partial.sum(0).to(weight.dtype) if ctx.has_bias else None
        return dx, dw_partial.sum(0).to(weight.dtype), db, None


@torch.compiler.disable  # under torch.compile the kernels run as they are, between compiled graphs
def _layer_norm_triton(x, weight, bias, eps):
    return LayerNormFunction.apply(x, weight, bias, eps)


def layer_norm_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """The reference: statistics in fp32 (or the input's precision when higher), output in x's dtype."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps) * weight.to(xf.dtype)
    if bias is not None:
        y = y + bias.to(xf.dtype)
    return y.to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5,
               impl: str = "auto") -> torch.Tensor:
    """LayerNorm of x [..., n] with weight [n] and bias [n] (or None); impl "auto", "triton" or "torch"."""
    check_float("x", x)
    check_float("weight", weight)
    check_shape("weight", weight, (x.shape[-1],))
    tensors = (x, weight)
    if bias is not None:
        check_float("bias", bias)
        check_shape("bias", bias, (x.shape[-1],))
        tensors += (bias,)
    if use_triton(impl, *tensors):
        return _layer_norm_triton(x, weight, bias, eps)
    return layer_norm_torch(x, weight, bias, eps)
