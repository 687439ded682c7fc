"""Async tensor parallelism (`plan.async_tp`): the tp collectives of sequence parallel overlapped with the matmuls.

Under sequence parallel each sublayer all-gathers its [b, s/tp, d] input over the sequence before the
column-parallel projections (wq/wk/wv, w_gate/w_up) and reduce-scatters the row-parallel output (wo,
w_down) back to [b, s/tp, d]: as plain collectives the matmuls wait for them. Here both are cut into
tp sequence chunks passed around the tp ring by point-to-point sends, and each chunk's matmul runs
while the next chunk is in flight (Megatron's tp-comm-overlap, torch's micro-pipeline TP):

- all-gather + matmul: a rank starts with its own chunk; at each of the tp - 1 steps it sends the
  chunk it holds to the next rank and receives the previous rank's, multiplying the held chunk
  meanwhile. Only the last chunk's matmul has nothing left to hide behind it.
- matmul + reduce-scatter: at step k a rank computes its partial product for chunk (rank + k + 1) mod
  tp, adds the running sum received from the next rank and sends it on to the previous one; at step
  tp - 1 it holds the full sum of its own chunk. The first chunk's matmul has no send to hide.

Backward is the same two patterns swapped: the input gradient of the gathered projections is a
matmul + reduce-scatter and that of a row-parallel linear an all-gather + matmul; the weight
gradients use the gathered input (saved, as sequence parallel's projections save it) and the
gathered output gradient. The same bytes cross the links as in sequence parallel.

torch's own fused ops (torch.distributed._symmetric_memory.fused_all_gather_matmul and
fused_matmul_reduce_scatter) need CUDA symmetric memory and have no autograd, and its
`_micro_pipeline_tp` pass needs torch.compile, which the engine refuses under tp
(autotune/engine/parallel.py): these Functions use torch.distributed's async send/recv, which run on
gloo and NCCL alike, so the test on the CPU checks the code the GPU runs.

`apply_async_tp` works on a block after `apply_tp` chose sequence parallel's layouts: it replaces the
attention's and MLP's input projection (`project`) and the row-parallel linears' forward; the
weights stay the same DTensors (Shard(0) column, Shard(1) row), so checkpoints and optimizers see no
difference.
"""
from __future__ import annotations

import functools
import types
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

SEQ = 1  # the sequence dimension of [b, s, d] activations


def _ring_step(send: torch.Tensor, group: dist.ProcessGroup, to: int, frm: int) -> tuple[torch.Tensor, list]:
    """Start sending `send` to group rank `to` and receiving a tensor like it from `frm`."""
    recv = torch.empty_like(send)
    ops = [dist.P2POp(dist.isend, send, group=group, group_peer=to),
           dist.P2POp(dist.irecv, recv, group=group, group_peer=frm)]
    return recv, dist.batch_isend_irecv(ops)


def all_gather_apply(shard: torch.Tensor, fn: Callable[[torch.Tensor], Sequence[torch.Tensor]],
                     group: dist.ProcessGroup) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(the gathered input, [fn's outputs on it]) for `shard` [b, s/tp, ...] gathered over the sequence:
    fn runs on each chunk while the next one travels the ring."""
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    chunks: list[torch.Tensor | None] = [None] * tp
    outs: list[Sequence[torch.Tensor] | None] = [None] * tp
    held = shard.contiguous()
    for step in range(tp):
        index = (rank - step) % tp
        pending = _ring_step(held, group, (rank + 1) % tp, (rank - 1) % tp) if step < tp - 1 else None
        chunks[index], outs[index] = held, fn(held)
        if pending is not None:
            held, works = pending
            for work in works:
                work.wait()
    gathered = torch.cat(chunks, dim=SEQ)
    return gathered, [torch.cat([out[i] for out in outs], dim=SEQ) for i in range(len(outs[0]))]


def apply_reduce_scatter(partial: Callable[[int, int], torch.Tensor], seq_len: int,
                         group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's sequence chunk of the sum over tp ranks of a [b, seq_len, ...] product, where
    `partial(start, stop)` is this rank's term on the sequence positions [start, stop): each chunk's
    term is computed while the running sum of the previous one travels the ring."""
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    size = seq_len // tp
    acc, pending = None, None
    for step in range(tp):
        index = (rank + step + 1) % tp
        term = partial(index * size, (index + 1) * size)
        if pending is not None:
            received, works = pending
            for work in works:
                work.wait()
            term = term + received
        acc = term.contiguous()
        pending = _ring_step(acc, group, (rank - 1) % tp, (rank + 1) % tp) if step < tp - 1 else None
    return acc


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matmuls run in: autocast's where it is on (ZeRO 0 in 16 bits), else x's. The
    Functions cast to it themselves, so their backward (which runs outside autocast) matches."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _cast(tensors, dtype: torch.dtype) -> list:
    return [None if t is None else t.to(dtype) for t in tensors]


class AllGatherLinears(torch.autograd.Function):
    """[F.linear(gather(x), w_i, b_i)] for a sequence-sharded x: the column-parallel projections of one
    sublayer share one pipelined all-gather."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, n: int, *params: torch.Tensor | None):
        dtype = _compute_dtype(x)
        x, *params = _cast((x, *params), dtype)  # gathered in the compute dtype, as autocast would multiply it
        weights, biases = params[:n], params[n:]
        gathered, outs = all_gather_apply(
            x, lambda chunk: [F.linear(chunk, w, b) for w, b in zip(weights, biases)], group)
        ctx.save_for_backward(gathered, *weights)
        ctx.group, ctx.has_bias = group, [b is not None for b in biases]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        gathered, *weights = ctx.saved_tensors
        grad_x = apply_reduce_scatter(
            lambda i, j: sum(g[:, i:j] @ w for g, w in zip(grads, weights)), gathered.shape[SEQ], ctx.group)
        flat_x = gathered.flatten(0, -2)
        grad_w = [g.flatten(0, -2).t() @ flat_x for g in grads]
        grad_b = [g.flatten(0, -2).sum(0) if has else None for g, has in zip(grads, ctx.has_bias)]
        return (grad_x, None, None, *grad_w, *grad_b)


class LinearReduceScatter(torch.autograd.Function):
    """reduce_scatter(F.linear(x, w)) over the sequence: a row-parallel linear's partial sums, pipelined."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, group: dist.ProcessGroup):
        x, weight = _cast((x, weight), _compute_dtype(x))
        ctx.save_for_backward(x, weight)
        ctx.group = group
        return apply_reduce_scatter(lambda i, j: F.linear(x[:, i:j], weight), x.shape[SEQ], group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_full, (grad_x,) = all_gather_apply(grad, lambda chunk: [chunk @ weight], ctx.group)
        grad_w = grad_full.flatten(0, -2).t() @ x.flatten(0, -2)
        return grad_x, grad_w, None


def _local(param: torch.Tensor | None) -> torch.Tensor | None:
    return None if param is None else param.to_local()


def all_gather_linears(x: torch.Tensor, linears: Sequence[nn.Linear], group: dist.ProcessGroup) -> list[torch.Tensor]:
    """The `project` of a sublayer under async tp: x this rank's [b, s/tp, d] of the residual stream
    (a DTensor sharded on the sequence, as the sequence-parallel norm leaves it), the linears
    column-parallel (Shard(0)); returns their local outputs [b, s, out/tp], as ColwiseParallel does."""
    local = x.to_local() if isinstance(x, DTensor) else x
    weights = [_local(lin.weight) for lin in linears]
    biases = [_local(lin.bias) for lin in linears]
    return list(AllGatherLinears.apply(local, group, len(linears), *weights, *biases))


def _reduce_scatter_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A row-parallel linear's forward under async tp: local [b, s, in/tp] in, this rank's [b, s/tp, d]
    of the sum out (a local tensor, as RowwiseParallel returns). The replicated bias is added to this
    rank's rows, so its gradient from them is a partial sum over tp."""
    y = LinearReduceScatter.apply(x, self.weight.to_local(), self.weight.device_mesh.get_group())
    if self.bias is not None:
        y = y + self.bias.to_local(grad_placements=[Partial()]).to(y.dtype)
    return y


def _shard(linear: nn.Linear, mesh: DeviceMesh, dim: int) -> None:
    """The linear's weight sharded on dim, its bias sharded with the output features (column) or
    replicated (row), as ColwiseParallel / RowwiseParallel shard them."""
    linear.weight = nn.Parameter(distribute_tensor(linear.weight, mesh, [Shard(dim)]))
    if linear.bias is not None:
        layout = Shard(0) if dim == 0 else Replicate()
        linear.bias = nn.Parameter(distribute_tensor(linear.bias, mesh, [layout]))


def apply_async_tp(block: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shard a block's attention and MLP linears over tp_mesh and run them with pipelined collectives
    (the block's norms are sequence-parallel: `apply_tp` does them)."""
    for sublayer, column, row in ((block.attn, ("wq", "wk", "wv"), "wo"),
                                  (block.mlp, ("w_gate", "w_up") if block.mlp.gated else ("w_up",), "w_down")):
        for name in column:
            _shard(getattr(sublayer, name), tp_mesh, 0)
        _shard(getattr(sublayer, row), tp_mesh, 1)
        sublayer.project = functools.partial(all_gather_linears, group=tp_mesh.get_group())
        linear = getattr(sublayer, row)
        linear.forward = types.MethodType(_reduce_scatter_forward, linear)
