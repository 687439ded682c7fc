"""What one rank holds: the numels of the parameters on the first and the last pipeline rank,
whole, as FSDP2 shards and as the units FSDP2 gathers ([Model states] in docs/formulas.md), per
(dp, tp, pp, virtual stages, ep) layout and as arrays over a plan frame.

Under expert parallelism (autotune/engine/parallel.py, apply_ep) a MoE layer's routed experts are
cut over the ep ranks of a group (E/ep each, dim 0) and are data-parallel over the dp/ep ranks
holding the same experts (edp): FSDP2 shards them there, apart from everything else, which stays
data-parallel over all dp ranks.

Under hybrid sharding (plan.dp_replicate) FSDP2 shards over one replica's dp / dp_replicate
ranks: `stage_layouts` lays each plan out over those (its `dp` is the shard group's size).
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
    numel: int  # on this tp rank (of a routed expert tensor: this ep rank's experts)
    shard: int  # dp-rank 0's FSDP2 shard of it
    expert: bool  # a routed expert tensor: data-parallel over the edp ranks only


def is_expert(name: str) -> bool:
    """Whether a parameter is one of a MoE layer's routed-expert tensors ([E, ., .], dim 0 the expert)."""
    return ".mlp.experts." in name


def _held_on(model: ModelConfig, pp_rank: int, layers: set[int], pp: int, tp: int, dp: int, ep: int) -> list[_Held]:
    """The parameters pipeline rank `pp_rank` holds (its blocks `layers`), as one tp rank and one
    ep rank hold them."""
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
        expert = is_expert(name)
        local = (shape[0] // ep,) + shape[1:] if expert else _tp_local_shape(name, shape, tp)
        ranks = dp // ep if expert else dp  # FSDP2 shards dim 0 of the local tensor over these
        held.append(_Held(name, math.prod(local), math.ceil(local[0] / ranks) * math.prod(local[1:]), expert))
    return held


def rank_layout(model: ModelConfig, dp: int, tp: int, pp: int, v: int, ep: int = 1) -> dict[str, dict[str, int]]:
    """Numels held by the first and the last pipeline rank: whole on the rank (`local`), the FSDP2
    shard of dp-rank 0 (`shard`: ceil(dim0/dp) rows, torch.chunk; routed experts: ceil(dim0/(dp/ep))
    of the rank's E/ep), tensor counts, the units FSDP2 gathers (`block`: largest
    block, its experts included; `root`: embeddings, final norm, head), and the routed experts'
    part of `local` (`experts`)."""
    key = (repr(model), dp, tp, pp, v, ep)
    if key in _LAYOUTS:
        return _LAYOUTS[key]
    stages = stage_layers(model.n_layers, pp * v)
    out = {}
    for kind, pp_rank in (("first", 0), ("last", pp - 1)):
        layers = {i for k in range(v) for i in stages[pp_rank + k * pp]}
        held = _held_on(model, pp_rank, layers, pp, tp, dp, ep)
        blocks: dict[int, int] = {}
        for h in held:
            if h.name.startswith("layers."):
                blocks[int(h.name.split(".")[1])] = blocks.get(int(h.name.split(".")[1]), 0) + h.numel
        out[kind] = {
            "local": sum(h.numel for h in held), "shard": sum(h.shard for h in held), "tensors": len(held),
            "layers": len(layers),
            "block": max(blocks.values(), default=0),
            "root": sum(h.numel for h in held if not h.name.startswith("layers.")),
            "experts": sum(h.numel for h in held if h.expert),
        }
    _LAYOUTS[key] = out
    return out


@dataclass(frozen=True)
class HeldNumels:
    """rank_layout's figures of one pipeline rank (the first or the last), one entry per plan."""

    local: np.ndarray
    shard: np.ndarray
    tensors: np.ndarray
    layers: np.ndarray
    block: np.ndarray
    root: np.ndarray
    experts: np.ndarray


def stage_layouts(model: ModelConfig, plans: PlanArrays) -> dict[str, HeldNumels]:
    """{"first": ..., "last": ...}: what the first and the last pipeline rank of each plan hold,
    one rank_layout per distinct (sharding dp, tp, pp, virtual stages, ep); the sharding ranks are
    all dp ranks, or one replica's under hybrid sharding."""
    packed = np.zeros(plans.rows, dtype=np.int64)
    for column in (plans.dp_shard, plans.tp, plans.pp, plans.virtual_stages, plans.ep):  # 12 bits each: one int64 per layout
        packed = packed * 4096 + column
    keys, inverse = np.unique(packed, return_inverse=True)
    layouts = [rank_layout(model, *(int(k >> shift) & 4095 for shift in (48, 36, 24, 12)), ep=int(k & 4095))
               for k in keys]
    names = [f.name for f in dataclasses.fields(HeldNumels)]
    return {kind: HeldNumels(**{name: np.array([float(lay[kind][name]) for lay in layouts])[inverse] for name in names})
            for kind in ("first", "last")}
