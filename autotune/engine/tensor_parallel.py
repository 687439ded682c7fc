"""Tensor parallelism (Megatron-style) with DTensor `parallelize_module`.

Inside each block, attention wq/wk/wv and the MLP's gate/up projections are column-parallel (each
tp rank holds n_heads/tp query heads, n_kv_heads/tp kv heads and d_ff/tp hidden units, biases
sliced with them) and wo / w_down are row-parallel, so a block costs one all-reduce forward and one
backward per sublayer. `Attention` reshapes with -1 heads, so the local head counts just work,
and grouped-query attention repeats the local kv heads (tp divides n_kv_heads: autotune/engine/config.py).

The token embedding and the LM head are sharded over the vocabulary (weight Shard(0)), not
replicated: in llama-3 they are the two largest matrices (128k x d each) and the logits
[batch, seq, vocab] are the largest activation, so replicating them would cost every tp rank the
full memory and the full head matmul. The embedding all-reduces (or, with sequence parallel,
reduce-scatters) its output; the head produces vocabulary-sharded logits and the cross-entropy is
computed on the shards under `loss_parallel()` (a max, a sum of exponentials and the target's logit
are all-reduced per token) without ever gathering the logits. The train step enters
`loss_context(plan)` around forward and backward. A tied head (gpt2) is the same Shard(0) weight
as the embedding, so tying survives sharding.

Sequence parallel (`plan.sequence_parallel`) keeps the residual stream sharded over the sequence
between the sublayers: the norms run on [b, s/tp, d] (`SequenceParallel`, weights replicated and
their gradients summed over tp by DTensor), attention and MLP all-gather their input
(`PrepareModuleInput`) and wo / w_down reduce-scatter their output; the same bytes move as in the
all-reduce, but norm activations and the residual stream take 1/tp of the memory. Async tp
(`plan.async_tp`) runs those all-gathers and reduce-scatters in sequence chunks behind the blocks'
matmuls (autotune/engine/async_tp.py).

Parameters that tp does not split (the norms without sequence parallel, gpt2 positions) stay plain
tensors: every tp rank computes the same gradient for them. Under tp, `model(tokens, targets)`
returns the loss as a plain tensor and `model(tokens)` the logits as a vocabulary-sharded DTensor.

The Triton kernels (plan.kernels=triton) take plain tensors. RoPE and SwiGLU get them anyway: the
column-parallel projections return local tensors (this rank's heads, this rank's d_ff slice), and
both kernels work per head or per element. Norms under sequence parallel get DTensors; `local_rows`
runs the kernel on this rank's rows. The fused linear cross-entropy needs the whole vocabulary, so
under tp the model takes torch's loss on the vocabulary-sharded logits (autotune/engine/model.py).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from autotune.engine.async_tp import apply_async_tp
from autotune.engine.config import PlanConfig


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool, async_tp: bool = False,
             float8: bool = False) -> nn.Module:
    """Shard a Transformer (or a pipeline stage of one: missing modules are skipped) over tp_mesh;
    async_tp (with sequence_parallel) pipelines the blocks' collectives with their matmuls; float8:
    the blocks' linears are already tensorwise float8 ones (autotune/engine/float8.py)."""
    # Layout of the residual stream between sublayers: sharded on the sequence or replicated.
    stream = Shard(1) if sequence_parallel else Replicate()
    if model.tok_emb is not None:
        parallelize_module(model.tok_emb, tp_mesh, RowwiseParallel(input_layouts=Replicate(), output_layouts=stream))
    if model.pos_emb is not None and sequence_parallel:
        # positions [s, d] are computed whole; each rank adds its slice of the sequence
        parallelize_module(
            model.pos_emb, tp_mesh, PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(0))
        )
    for block in model.layers.values():
        attn_col, attn_row, attn_in = _styles(block.attn, float8, tp_mesh, sequence_parallel)
        mlp_col, mlp_row, mlp_in = _styles(block.mlp, float8, tp_mesh, sequence_parallel)
        plan = {
            # one DTensor input per sublayer: the gradients of q, k and v (or gate and up) meet
            # as a partial sum and are all-reduced once, not once per projection
            "attn": attn_in(input_layouts=(stream, None), desired_input_layouts=(Replicate(), None), use_local_output=False),
            "attn.wq": attn_col(),
            "attn.wk": attn_col(),
            "attn.wv": attn_col(),
            "attn.wo": attn_row(output_layouts=stream),
            "mlp": mlp_in(input_layouts=(stream,), desired_input_layouts=(Replicate(),), use_local_output=False),
            "mlp.w_up": mlp_col(),
            "mlp.w_down": mlp_row(output_layouts=stream),
        }
        if block.mlp.gated:
            plan["mlp.w_gate"] = mlp_col()
        if sequence_parallel:
            plan["attn_norm"] = SequenceParallel()
            plan["mlp_norm"] = SequenceParallel()
        if async_tp:
            plan = {norm: plan[norm] for norm in ("attn_norm", "mlp_norm")}
            apply_async_tp(block, tp_mesh)
        parallelize_module(block, tp_mesh, plan)
    if model.norm is not None:
        if sequence_parallel:
            parallelize_module(model.norm, tp_mesh, SequenceParallel())
        # the head multiplies replicated hidden states by its vocabulary shard
        parallelize_module(
            model.norm, tp_mesh,
            PrepareModuleOutput(output_layouts=stream, desired_output_layouts=Replicate(), use_local_output=False),
        )
        if model.lm_head is not None:
            # the head is applied as F.linear(h, weight) (it may be tied), so only its weight is sharded
            model.lm_head.weight = nn.Parameter(distribute_tensor(model.lm_head.weight, tp_mesh, [Shard(0)]))
        model.register_forward_hook(_local_loss)
    return model


def _styles(sublayer: nn.Module, float8: bool, tp_mesh: DeviceMesh, sequence_parallel: bool) -> tuple[type, type, type]:
    """(column-parallel, row-parallel, input-preparing) styles of a sublayer: torchao's float8 ones
    where its linears are all tensorwise float8 (autotune.engine.float8.tp_styles), else torch's."""
    if float8:
        from autotune.engine.float8 import tp_styles

        gloo = torch.distributed.get_backend(tp_mesh.get_group()) == "gloo"
        styles = tp_styles(sublayer, gloo_gather=gloo and sequence_parallel)
        if styles is not None:
            return styles
    return ColwiseParallel, RowwiseParallel, PrepareModuleInput


def _local_loss(module: nn.Module, args, output):
    """The loss leaves the model as a plain scalar tensor (identical on every tp rank); logits stay a
    vocabulary-sharded DTensor."""
    if isinstance(output, DTensor) and output.ndim == 0:
        return output.to_local()
    return output


def loss_context(plan: PlanConfig) -> contextlib.AbstractContextManager:
    """Enter around forward and backward: cross-entropy on vocabulary-sharded logits under tp."""
    return loss_parallel() if plan.tp > 1 else contextlib.nullcontext()


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy (fp32) of logits [b, s, vocab], plain or vocabulary-sharded (inside
    `loss_context`), as a plain scalar tensor."""
    loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
    return loss.to_local() if isinstance(loss, DTensor) else loss


def local_rows(kernel: Callable[..., torch.Tensor], x: torch.Tensor, *params: torch.Tensor | None,
               **kwargs) -> torch.Tensor:
    """`kernel(x, *params, **kwargs)` for a kernel that takes plain tensors and works row by row over
    the last dimension (the Triton norms), where x may be a DTensor sharded over other dimensions
    (the residual stream under sequence parallel) and the params (weight, bias or None) replicated.

    The kernel runs on this rank's rows and its output has x's placements. Each parameter enters as
    its local copy, and the gradient computed from this rank's rows alone is a partial sum over the
    ranks holding the other rows: it leaves as `Partial`, summed over tp where it is used, as
    DTensor's own norm ops leave it.
    """
    if not isinstance(x, DTensor):
        return kernel(x, *params, **kwargs)
    for placement in x.placements:
        if placement.is_partial() or (placement.is_shard() and placement.dim % x.ndim == x.ndim - 1):
            raise ValueError(f"local_rows needs whole rows: x is {x.placements}, its last dim must not be "
                             "sharded or partial")
    grad_placements = [Partial() if placement.is_shard() else Replicate() for placement in x.placements]
    local = []
    for p in params:
        if p is not None and not (isinstance(p, DTensor) and p.device_mesh == x.device_mesh
                                  and all(pl.is_replicate() for pl in p.placements)):
            raise ValueError(f"local_rows needs parameters replicated on x's mesh {x.device_mesh}, got "
                             f"{p.placements if isinstance(p, DTensor) else 'a plain tensor'}")
        local.append(None if p is None else p.to_local(grad_placements=grad_placements))
    y = kernel(x.to_local(), *local, **kwargs)
    return DTensor.from_local(y, x.device_mesh, x.placements, shape=x.shape, stride=x.stride())
