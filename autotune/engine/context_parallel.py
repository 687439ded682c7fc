"""Context parallelism (plan.cp > 1): each sequence split over cp ranks, attention by a ring.

The sequence is cut into 2 cp chunks and cp rank r holds chunks r and 2cp-1-r (`shard_sequence`):
under the causal mask the early chunk attends to little and the late one to much, so every rank
does the same attention work (the load balancing of Megatron's and torchtitan's context parallel).
Everything but attention is per token and runs on the rank's 2 chunks as on any sequence; rotary
tables and learned positions are read at the tokens' true positions (`positions`).

Attention (`RingAttention`) passes each rank's k/v around the cp ranks: at step i a rank holds the
k/v of rank r - i and attends to it while the next k/v is already on its way (forward), so the
exchange hides behind the attention of the chunk in hand. Blocks merge by their log-sum-exp, as
flash attention merges its tiles. With the two-chunk layout a step other than the first is half a
block: k/v from an earlier rank is wholly visible to both local chunks but only its first chunk is
before them; k/v from a later rank is visible only to the late local chunk (`_block`). Backward
passes the k/v round again with their gradients one step behind them: a step's k/v gradients
leave while the next step computes, and arrive back at their owner one hop after the last step. Each block is one fused attention kernel
that returns its log-sum-exp (autotune/engine/fused_attention.py), in the compute dtype with kv heads
repeated over their groups: no block's scores are ever held whole. What the ring keeps for backward
is what SDPA keeps: q, k, v (kv heads only), the output in the compute dtype and the fp32 log-sum-exp.

Gradients: each rank's loss is the mean over its own tokens, all ranks hold as many, so averaging
gradients over dp x cp ranks (the engine's `grad_mesh`) gives the mean over the whole batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from autotune.engine.fused_attention import block_backward, block_forward


def chunk_order(rank: int, cp: int) -> tuple[int, int]:
    """The two of the sequence's 2 cp chunks that cp rank `rank` holds."""
    return rank, 2 * cp - 1 - rank


def positions(seq_len: int, rank: int, cp: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The positions in the whole sequence of the local tokens of cp rank `rank` (seq_len whole)."""
    chunk = seq_len // (2 * cp)
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk, device=device) for c in chunk_order(rank, cp)])


def shard_sequence(t: torch.Tensor, rank: int, cp: int, dim: int = 1) -> torch.Tensor:
    """What cp rank `rank` holds of a whole-sequence tensor: its two chunks along `dim`."""
    chunks = t.chunk(2 * cp, dim=dim)
    return torch.cat([chunks[c] for c in chunk_order(rank, cp)], dim=dim)


class ContextShard:
    """One rank's place in its cp group, which the model's positions and attention read."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)

    def positions(self, local_len: int, device: torch.device) -> torch.Tensor:
        return positions(local_len * self.size, self.rank, self.size, device)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return RingAttention.apply(q, k, v, Ring(self.group))


def apply_cp(model: nn.Module, group: dist.ProcessGroup) -> None:
    """Point the model (positions) and every attention layer (the ring) at this rank's cp group."""
    shard = ContextShard(group)
    model.context_shard = shard
    for block in model.layers.values():
        block.attn.context_shard = shard


def _block(step: int, rank: int, cp: int, local_len: int) -> tuple[slice, slice, bool]:
    """The local queries and the visiting k/v rows that meet at ring step `step`, and whether the
    meeting is causal (step 0: the rank's own k/v, the two chunks in increasing position order)."""
    half, source = local_len // 2, (rank - step) % cp
    if step == 0:
        return slice(None), slice(None), True
    if source < rank:  # both of its chunks' first is before both of ours; its second after both
        return slice(None), slice(0, half), False
    return slice(half, None), slice(None), False  # both of its chunks are before our late chunk only


class Ring:
    """Sends a tensor to the next cp rank while receiving the previous rank's."""

    def __init__(self, group: dist.ProcessGroup):
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        self.group, self.rank, self.size = group, rank, size
        self.next = dist.get_global_rank(group, (rank + 1) % size)
        self.prev = dist.get_global_rank(group, (rank - 1) % size)

    def start(self, t: torch.Tensor, tag: int = 0) -> tuple[torch.Tensor, list]:
        """Begin the exchange; `tag` keeps two rings in flight at once (k/v, their gradients) apart."""
        t = t.contiguous()
        incoming = torch.empty_like(t)
        works = [dist.isend(t, self.next, self.group, tag), dist.irecv(incoming, self.prev, self.group, tag)]
        return incoming, works

    @staticmethod
    def finish(incoming: torch.Tensor, works: list) -> torch.Tensor:
        for work in works:
            work.wait()
        return incoming


class RingAttention(torch.autograd.Function):
    """Causal attention of q [b, heads, s, d] over k, v [b, kv heads, s, d] (grouped-query where
    fewer) whose sequence is split over the ring's ranks in the `shard_sequence` layout; returns
    [b, heads, s, d]. Each block runs in q's dtype; the merged output and the q, k, v gradients
    accumulate in fp32."""

    @staticmethod
    def forward(ctx, q, k, v, ring):
        b, h, s, d = q.shape
        group = h // k.shape[1]
        # laid out [b, s, heads, d] as SDPA's output, so the model's [b, s, heads·d] view of it is no copy
        out = torch.zeros((b, s, h, d), dtype=torch.float32, device=q.device).transpose(1, 2)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        for step in range(ring.size):
            pending = ring.start(kv) if step < ring.size - 1 else None
            qs, ks, causal = _block(step, ring.rank, ring.size, s)
            kb, vb = (t[..., ks, :].repeat_interleave(group, dim=1) for t in kv)
            block_out, block_lse = block_forward(q[..., qs, :], kb, vb, causal, d ** -0.5)
            merged = torch.logaddexp(lse[..., qs], block_lse)
            out[..., qs, :] = (out[..., qs, :] * torch.exp(lse[..., qs] - merged).unsqueeze(-1)
                               + block_out * torch.exp(block_lse - merged).unsqueeze(-1))
            lse[..., qs] = merged
            if pending is not None:
                kv = ring.finish(*pending)
        out = out.to(q.dtype)
        ctx.ring = ring
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        ring = ctx.ring
        b, h, s, d = q.shape
        group = h // k.shape[1]
        dout = grad_out.to(q.dtype).contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        grads_in_flight = None  # the k/v gradients summed so far, on their way from the previous rank
        for step in range(ring.size):
            pending = ring.start(kv) if step < ring.size - 1 else None
            qs, ks, causal = _block(step, ring.rank, ring.size, s)
            kb, vb = (t[..., ks, :].repeat_interleave(group, dim=1) for t in kv)
            dqb, dkb, dvb = block_backward(dout[..., qs, :], q[..., qs, :], kb, vb, out[..., qs, :], lse[..., qs],
                                           causal, d ** -0.5)
            dq[..., qs, :] += dqb
            dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device) if step == 0 else ring.finish(*grads_in_flight)
            for i, grad in enumerate((dkb, dvb)):  # each kv head's gradient: the sum over its group
                dkv[i][..., ks, :] += grad.unflatten(1, (k.shape[1], group)).sum(2)
            grads_in_flight = ring.start(dkv, tag=1)  # on to the next rank; after the last step, home
            if pending is not None:
                kv = ring.finish(*pending)
        dkv = ring.finish(*grads_in_flight)
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None
