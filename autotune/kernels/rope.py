"""Rotary position embedding on q and k, matching `engine.model.apply_rope` exactly.

q [b, s, a, d] and k [b, s, g, d] (g may differ from a: grouped-query attention), cos and sin
[s, d/2] (fp32 from the engine; FSDP's mixed precision may hand them over in bf16), "halves" layout as in Hugging Face llama: x1, x2 = the two halves of the last
dimension, out = cat(x1*cos - x2*sin, x2*cos + x1*sin). Math in fp32, output in the input's dtype.

Triton: one program per (batch, position) rotates every head of q and of k there, loading cos and
sin once. Saved for backward: only cos and sin (the model's buffers, no activation memory): the
backward is the inverse rotation, the same kernel with sin negated.
"""
from __future__ import annotations

import torch

from autotune.kernels._common import LazyKernel, check_float, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None


def _rope_kernel(Q, K, COS, SIN, QO, KO, seq_len, q_heads, k_heads, half,
                 BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_HALF: tl.constexpr, INVERSE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # = batch * seq_len + position
    pos = row % seq_len
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < half
    cos = tl.load(COS + pos * half + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(SIN + pos * half + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    if INVERSE:
        sin = -sin
    heads = tl.arange(0, BLOCK_Q)[:, None]
    mask = (heads < q_heads) & d_mask[None, :]
    offsets = row * q_heads * 2 * half + heads * 2 * half + d[None, :]
    x1 = tl.load(Q + offsets, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(Q + offsets + half, mask=mask, other=0.0).to(tl.float32)
    tl.store(QO + offsets, (x1 * cos - x2 * sin).to(QO.dtype.element_ty), mask=mask)
    tl.store(QO + offsets + half, (x2 * cos + x1 * sin).to(QO.dtype.element_ty), mask=mask)
    heads = tl.arange(0, BLOCK_K)[:, None]
    mask = (heads < k_heads) & d_mask[None, :]
    offsets = row * k_heads * 2 * half + heads * 2 * half + d[None, :]
    x1 = tl.load(K + offsets, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(K + offsets + half, mask=mask, other=0.0).to(tl.float32)
    tl.store(KO + offsets, (x1 * cos - x2 * sin).to(KO.dtype.element_ty), mask=mask)
    tl.store(KO + offsets + half, (x2 * cos + x1 * sin).to(KO.dtype.element_ty), mask=mask)


_kernel = LazyKernel(_rope_kernel)


def _rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool):
    b, s, a, d = q.shape
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    _kernel[(b * s,)](q, k, cos, sin, qo, ko, s, a, k.shape[2], d // 2,
                      BLOCK_Q=triton.next_power_of_2(a), BLOCK_K=triton.next_power_of_2(k.shape[2]),
                      BLOCK_HALF=triton.next_power_of_2(d // 2), INVERSE=inverse)
    return qo, ko


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        ctx.save_for_backward(cos, sin)
        return _rotate(q, k, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor):
        cos, sin = ctx.saved_tensors
        dq, dk = _rotate(dq.contiguous(), dk.contiguous(), cos, sin, inverse=True)
        return dq, dk, None, None


@torch.compiler.disable  # under torch.compile the kernels run as they are, between compiled graphs
def _rope_triton(q, k, cos, sin):
    return RoPEFunction.apply(q, k, cos, sin)


def apply_rope_torch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference, `engine.model.apply_rope` in fp32 (or the input's precision when higher)."""
    def rotate(x: torch.Tensor) -> torch.Tensor:
        compute = torch.promote_types(x.dtype, torch.float32)
        x1, x2 = x.to(compute).chunk(2, dim=-1)
        c, s = cos.to(compute)[:, None, :], sin.to(compute)[:, None, :]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [b, s, a, d] and k [b, s, g, d] by cos/sin [s, d/2]; impl "auto", "triton" or "torch"."""
    check_float("q", q)
    check_float("k", k)
    if q.dtype != k.dtype:
        raise TypeError(f"q and k must have one dtype, got {q.dtype} and {k.dtype}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [batch, seq, heads, head_dim], got {tuple(q.shape)} and {tuple(k.shape)}")
    b, s, _, d = q.shape
    if k.shape[:2] != q.shape[:2] or k.shape[3] != d:
        raise ValueError(f"k {tuple(k.shape)} must share batch, seq and head_dim with q {tuple(q.shape)}")
    if d % 2:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {d}")
    for name, t in (("cos", cos), ("sin", sin)):
        check_float(name, t)
        if tuple(t.shape) != (s, d // 2):
            raise ValueError(f"{name} must have shape (seq, head_dim/2) = {(s, d // 2)}, got {tuple(t.shape)}")
    if use_triton(impl, q, k, cos, sin):
        return _rope_triton(q, k, cos, sin)
    return apply_rope_torch(q, k, cos, sin)
