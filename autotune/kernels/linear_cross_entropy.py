"""The LM head and the cross-entropy fused in chunks of tokens: the full [tokens, vocab] logits never exist.

loss = mean over tokens whose target is not ignore_index of (logsumexp(h @ W^T) - logit[target]);
when every target is ignored the loss is 0 and the gradients are zero (not NaN).

How (the Liger-Kernel approach): the forward walks the tokens in chunks of about
`tokens / ceil(vocab / hidden)` rows, so one chunk of logits is about as large as the hidden states.
For each chunk, a torch matmul gives the logits [chunk, vocab] (in the compute dtype); a Triton
kernel, one program per row, computes the row's logsumexp with an online max in fp32, the row's
loss, and overwrites the logits in place with the gradient of the mean loss with respect to them,
(softmax - onehot) / n_valid; two more torch matmuls turn that into this chunk's rows of
d hidden (= dlogits @ W) and its contribution to d W (+= dlogits^T @ h; the cross-chunk sum is
kept in the compute dtype, like Liger, so that it costs vocab x hidden elements and no more).
The gradients are therefore computed during the forward; the backward only scales them by the
incoming gradient. Saved for backward: exactly those two gradients, d hidden [tokens, hidden]
and d W [vocab, hidden] in the compute dtype (each only when its input requires grad); the
backward may run once (retain_graph through this loss raises).

Under autocast, hidden and weight are cast to the autocast dtype, as F.linear would be.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from autotune.kernels._common import LazyKernel, cdiv, check_float, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

MAX_BLOCK_V = 4096  # vocabulary entries one program holds at once; a row loops over blocks of this size


def _cross_entropy_kernel(LOGITS, TARGETS, LOSS, vocab, ignore_index, scale,
                          BLOCK_V: tl.constexpr, WRITE_GRAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    LOGITS += row * vocab
    cols = tl.arange(0, BLOCK_V)
    target = tl.load(TARGETS + row)
    valid = target != ignore_index
    # logsumexp with a running max, in fp32
    running_max = float("-inf")
    sum_exp = 0.0
    for start in range(0, vocab, BLOCK_V):
        x = tl.load(LOGITS + start + cols, mask=start + cols < vocab, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        sum_exp = sum_exp * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        running_max = new_max
    lse = running_max + tl.log(sum_exp)
    target_logit = tl.load(LOGITS + tl.where(valid, target, 0)).to(tl.float32)
    tl.store(LOSS + row, tl.where(valid, lse - target_logit, 0.0))
    if WRITE_GRAD:  # d loss / d logits = (softmax - onehot) * scale, zero on ignored rows
        for start in range(0, vocab, BLOCK_V):
            mask = start + cols < vocab
            x = tl.load(LOGITS + start + cols, mask=mask, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(start + cols == target, 1.0, 0.0)
            grad = tl.where(valid, grad * scale, 0.0)
            tl.store(LOGITS + start + cols, grad.to(LOGITS.dtype.element_ty), mask=mask)


_kernel = LazyKernel(_cross_entropy_kernel)


def chunk_rows(tokens: int, vocab: int, hidden: int) -> int:
    """Tokens per chunk: one chunk of logits is about the size of the hidden states."""
    return max(1, cdiv(tokens, cdiv(vocab, hidden)))


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                n_valid: int, grad_enabled: bool) -> torch.Tensor:
        device_type = hidden.device.type
        compute = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        h = hidden.reshape(-1, hidden.shape[-1]).to(compute)
        w = weight.to(compute)
        t = targets.reshape(-1).contiguous()
        tokens, vocab = h.shape[0], w.shape[0]
        # needs_input_grad stays True under no_grad: without grad mode (evaluation) only the loss is made
        need_h, need_w = (grad_enabled and needed for needed in ctx.needs_input_grad[:2])
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(w) if need_w else None
        loss_rows = torch.empty(tokens, dtype=torch.float32, device=h.device)
        scale = 1.0 / max(n_valid, 1)
        block_v = min(triton.next_power_of_2(vocab), MAX_BLOCK_V)
        chunk = chunk_rows(tokens, vocab, h.shape[1])
        with torch.autocast(device_type, enabled=False):
            for start in range(0, tokens, chunk):
                end = min(start + chunk, tokens)
                logits = h[start:end] @ w.T
                _kernel[(end - start,)](logits, t[start:end], loss_rows[start:end], vocab, ignore_index, scale,
                                        BLOCK_V=block_v, WRITE_GRAD=need_h or need_w, num_warps=8)
                if need_h:  # logits now hold d loss / d logits
                    torch.mm(logits, w, out=grad_h[start:end])
                if need_w:
                    grad_w.addmm_(logits.T, h[start:end])
        ctx.save_for_backward(grad_h, grad_w)
        ctx.shapes_dtypes = (hidden.shape, hidden.dtype, weight.dtype)
        ctx.used = False
        return loss_rows.sum() * scale

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        if ctx.used:
            raise RuntimeError("linear_cross_entropy's backward ran twice: its gradients are made in the forward "
                               "and scaled in place once; do not retain_graph through it")
        ctx.used = True
        grad_h, grad_w = ctx.saved_tensors
        hidden_shape, hidden_dtype, weight_dtype = ctx.shapes_dtypes
        if grad_h is not None:
            grad_h = grad_h.mul_(grad_loss).to(hidden_dtype).view(hidden_shape)
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_loss).to(weight_dtype)
        return grad_h, grad_w, None, None, None, None


@torch.compiler.disable  # under torch.compile the kernels run as they are, between compiled graphs
def _linear_cross_entropy_triton(hidden, weight, targets, ignore_index, n_valid):
    return LinearCrossEntropyFunction.apply(hidden, weight, targets, ignore_index, n_valid, torch.is_grad_enabled())


def linear_cross_entropy_torch(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               ignore_index: int = -100) -> torch.Tensor:
    """The reference: full logits in fp32 (or higher), mean over non-ignored targets, 0 when all are ignored."""
    logits = F.linear(hidden, weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index,
                            reduction="sum")
    return total / (targets != ignore_index).sum().clamp(min=1)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, impl: str = "auto") -> torch.Tensor:
    """Mean cross-entropy (fp32 scalar) of logits hidden [..., h] @ weight[vocab, h]^T against targets [...].

    impl "auto" (Triton on CUDA), "triton" or "torch". Targets must be ids in [0, vocab) or ignore_index.
    """
    check_float("hidden", hidden)
    check_float("weight", weight)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [vocab, {hidden.shape[-1]}] for hidden {tuple(hidden.shape)}, "
                         f"got {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
        raise TypeError(f"hidden and weight must have one dtype, got {hidden.dtype} and {weight.dtype}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 or int32 token ids, got {targets.dtype}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets must have shape {tuple(hidden.shape[:-1])} (hidden without its last dim), "
                         f"got {tuple(targets.shape)}")
    valid = targets != ignore_index
    out_of_range, n_valid = torch.stack([(valid & ((targets < 0) | (targets >= weight.shape[0]))).sum(),
                                         valid.sum()]).tolist()
    if out_of_range:
        raise ValueError(f"{out_of_range} targets are outside [0, {weight.shape[0]}) and not ignore_index "
                         f"({ignore_index})")
    if use_triton(impl, hidden, weight, targets, contiguous=False):  # torch ops lay out what the kernel reads
        return _linear_cross_entropy_triton(hidden, weight, targets, ignore_index, n_valid)
    return linear_cross_entropy_torch(hidden, weight, targets, ignore_index)
