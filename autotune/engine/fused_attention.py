"""One block of attention by torch's fused kernels, returning its log-sum-exp (the ring's blocks,
autotune/engine/context_parallel.py): the scores are computed tile by tile and never held whole.

q [b, heads, sq, d], k and v [b, heads, sk, d] (the ring repeats each kv head over its group), in
the compute dtype; the log-sum-exp is fp32 [b, heads, sq]. The ops are those torch's own
context_parallel calls per ring step: on CUDA flash attention for 16-bit blocks and memory-efficient
attention for fp32 ones (flash runs only 16-bit); on the CPU torch's flash attention for CPU. The
backward takes the merged output and log-sum-exp of all blocks, so that each block's gradients
are its share of the whole softmax's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

aten = torch.ops.aten
EFFICIENT_LSE_ROWS = 32  # memory-efficient attention pads its log-sum-exp rows to a multiple of 32


def _cuda_flash(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out in q's dtype, fp32 log-sum-exp) of softmax(q kᵀ·scale) v, causal: the top-left triangle."""
    if not q.is_cuda:
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    elif _cuda_flash(q):
        out, lse = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
    else:
        out, lse = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)[:2]
        lse = lse[..., :q.shape[2]]
    return out, lse.float()


def block_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of one block given the merged `out` and `lse` of the rows of q."""
    lse = lse.contiguous()
    if not q.is_cuda:
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(dout, q, k, v, out, lse, 0.0, causal,
                                                                          scale=scale)
    no_dropout = torch.zeros(2, dtype=torch.int64, device=q.device)  # the Philox seed and offset, unused
    if _cuda_flash(q):
        return aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, None, None, q.shape[2], k.shape[2], 0.0, causal, no_dropout[0], no_dropout[1],
            scale=scale)
    padded = F.pad(lse, (0, -lse.shape[-1] % EFFICIENT_LSE_ROWS))
    return aten._scaled_dot_product_efficient_attention_backward(
        dout, q, k, v, None, out, padded, no_dropout[0], no_dropout[1], 0.0, (True, True, True, False), causal,
        scale=scale)[:3]
