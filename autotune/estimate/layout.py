"""What one rank holds: the numels of the parameters on the first and the last pipeline rank,
whole, as FSDP2 shards, as ZeRO-1 partitions and as the units FSDP2 gathers ([Model states] in
docs/formulas.md), per (dp, tp, pp, virtual stages) layout and as arrays over a plan frame.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from autotune.engine.config import ModelConfig
from autotune.engine.model import build_model
from autotune.engine.pipeline import stage_layers
from autotune.estimate.arrays import PlanArrays

_LAYOUTS: dict[tuple, dict] = {}
_SHAPES: dict[str, list] = {}


def _param_shapes(model: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    key = repr(model)
    if key not in _SHAPES:
        _SHAPES[key] = [(n, tuple(p.shape)) for n, p in build_model(model, device="meta").named_parameters()]
    return _SHAPES[key]


def _tp_local_shape(name: str, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
    """A parameter's shape on one tensor-parallel rank (autotune/engine/tensor_parallel.py)."""
    if tp == 1:
        return shape
    colwise = any(k in name for k in ("attn.wq", "attn.wk", "attn.wv", "mlp.w_gate", "mlp.w_up"))
    rowwise = any(k in name for k in ("attn.wo", "mlp.w_down"))
    if colwise or name in ("tok_emb.weight", "lm_head.weight"):
        return (math.ceil(shape[0] / tp),) + shape[1:]
    if rowwise and name.endswith("weight"):
        return (shape[0], math.ceil(shape[1] / tp))
    return shape  # norms, row-parallel biases, learned positions: replicated


class _Held(NamedTuple):
    name: str
    numel: int  # on this tp rank
    shard: int  # dp-rank 0's FSDP2 shard of it
    dims: int


def _held_on(model: ModelConfig, pp_rank: int, layers: set[int], pp: int, tp: int, dp: int) -> list[_Held]:
    """The parameters pipeline rank `pp_rank` holds (its blocks `layers`), as one tp rank holds them."""
    is_first, is_last = pp_rank == 0, pp_rank == pp - 1
    held = []
    for name, shape in _param_shapes(model):
        if name.startswith("layers."):
            if int(name.split(".")[1]) not in layers:
                continue
        elif name.startswith("pos_emb"):
            if not is_first:
                continue
        elif name.startswith("tok_emb"):
            # under pp the last stage holds a copy of a tied embedding as its head (autotune/engine/pipeline.py)
            if not (is_first or (model.tie_embeddings and is_last)):
                continue
        elif not is_last:  # final norm, lm_head
            continue
        local = _tp_local_shape(name, shape, tp)
        held.append(_Held(name, math.prod(local), math.ceil(local[0] / dp) * math.prod(local[1:]), len(local)))
    return held


def _largest_zero1_partition(held: list[_Held], dp: int) -> tuple[int, int]:
    """(numel, tensors) of the largest ZeRO-1 partition: ZeroRedundancyOptimizer._partition_parameters,
    greedy, largest first, per param group (matrices, then vectors)."""
    sizes = [0] * dp
    counts = [0] * dp
    for group in ([h for h in held if h.dims >= 2], [h for h in held if h.dims < 2]):
        for h in sorted(group, key=lambda h: h.numel, reverse=True):
            r = sizes.index(min(sizes))
            sizes[r] += h.numel
            counts[r] += 1
    r = sizes.index(max(sizes))
    return sizes[r], counts[r]


def rank_layout(model: ModelConfig, dp: int, tp: int, pp: int, v: int) -> dict[str, dict[str, int]]:
    """Numels held by the first and the last pipeline rank: whole on the rank (`local`), the FSDP2
    shard of dp-rank 0 (`shard`: ceil(dim0/dp) rows, torch.chunk), the largest ZeRO-1 partition
    (`zero1`: ZeroRedundancyOptimizer's greedy rule over the engine's two param groups, applied to
    the tp shards as engine.parallel.ShardedOptimizer does), tensor counts, and the units
    FSDP2 gathers (`block`: largest block, `root`: embeddings, final norm, head)."""
    key = (repr(model), dp, tp, pp, v)
    if key in _LAYOUTS:
        return _LAYOUTS[key]
    stages = stage_layers(model.n_layers, pp * v)
    out = {}
    for kind, pp_rank in (("first", 0), ("last", pp - 1)):
        layers = {i for k in range(v) for i in stages[pp_rank + k * pp]}
        held = _held_on(model, pp_rank, layers, pp, tp, dp)
        blocks: dict[int, int] = {}
        for h in held:
            if h.name.startswith("layers."):
                blocks[int(h.name.split(".")[1])] = blocks.get(int(h.name.split(".")[1]), 0) + h.numel
        zero1, zero1_tensors = _largest_zero1_partition(held, dp)
        out[kind] = {
            "local": sum(h.numel for h in held), "shard": sum(h.shard for h in held), "tensors": len(held),
            "zero1": zero1, "zero1_tensors": zero1_tensors, "layers": len(layers),
            "block": max(blocks.values(), default=0),
            "root": sum(h.numel for h in held if not h.name.startswith("layers.")),
        }
    _LAYOUTS[key] = out
    return out


@dataclass(frozen=True)
class HeldNumels:
    """rank_layout's figures of one pipeline rank (the first or the last), one entry per plan."""

    local: np.ndarray
    shard: np.ndarray
    tensors: np.ndarray
    zero1: np.ndarray
    zero1_tensors: np.ndarray
    layers: np.ndarray
    block: np.ndarray
    root: np.ndarray


def stage_layouts(model: ModelConfig, plans: PlanArrays) -> dict[str, HeldNumels]:
    """{"first": ..., "last": ...}: what the first and the last pipeline rank of each plan hold,
    one rank_layout per distinct (dp, tp, pp, virtual stages)."""
    packed = ((plans.dp * 4096 + plans.tp) * 4096 + plans.pp) * 4096 + plans.virtual_stages  # one int64 per layout
    keys, inverse = np.unique(packed, return_inverse=True)
    layouts = [rank_layout(model, int(k >> 36), int((k >> 24) & 4095), int((k >> 12) & 4095), int(k & 4095))
               for k in keys]
    names = [f.name for f in dataclasses.fields(HeldNumels)]
    return {kind: HeldNumels(**{name: np.array([float(lay[kind][name]) for lay in layouts])[inverse] for name in names})
            for kind in ("first", "last")}
