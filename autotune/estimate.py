"""The cost model: per-rank peak memory and step time of a plan, closed form and vectorised.

`estimate_frame(model, job, plans, hw)` costs a DataFrame of plans (one column per PlanConfig
field) with numpy over the columns: 100,000 plans in well under two seconds. `estimate(train, hw)`
is the one-row case. Every term names its source (REFERENCE.md section in brackets); the engine's
behaviour (autotune/engine/parallel.py, autotune/engine/pipeline.py, autotune/engine/tensor_parallel.py) decides what each
plan means:

- parameters are fp32 on every path and are the optimizer's master weights (no separate master
  copy: `master_bytes` is 0); 16-bit compute uses copies: autocast's cast weights (ZeRO 0/1) or
  FSDP2's all-gathered 16-bit units (ZeRO 2/3), counted in `param_copies_bytes`;
- ZeRO 0 = DDP with gradient_as_bucket_view (no bucket copy), or under tp/pp FSDP2's replicate
  (the same whole gradients, all-reduced once per step); ZeRO 1 = that + torch
  ZeroRedundancyOptimizer, or under tp/pp engine.parallel.ShardedOptimizer (both a greedy
  whole-tensor partition of the rank's tp shards; owners broadcast the updated parameters);
  ZeRO 2/3 = FSDP2 per block + root (root never resharded), reduce in fp32; offload (ZeRO 2/3) =
  CPUOffloadPolicy: sharded params, grads and AdamW states on the host, the step on the CPU;
  offload (ZeRO 1) = HostOffloadAdamW: the partition's AdamW states and a host copy of its params
  and grads on the host, the step on the CPU, params and grads whole on the device;
- activations are the bytes measured on the engine's model (autotune.profile), per block and
  outside the blocks, for the plan's precision x cast x checkpointing x kernels, as a tp rank
  holds them (sequence parallel keeps the all-gathered linear inputs whole); the logits are
  those of the loss the engine runs (torch's under tp or pp even with kernels=triton);
- the peak is the larger of two moments: the start of a backward (states, gradients of earlier
  micro-batches or DDP's buckets, activations, logits and their gradient, gathered units) and the optimizer step
  (states with every gradient). The memory breakdown is that of the peaking moment
  (`peak_phase`); `model_states` / `step_grads_bytes` give the states at the step;
- step time is the sum of what runs on the compute stream of the first pipeline rank: dense
  matmuls (6N) at the matmul efficiency, SDPA at the FLOPs its causal flash kernels execute and
  the attention efficiency, memory-bound ops as the bytes measured on the engine's model
  (autotune.profile.measure_traffic) over HBM at the memory efficiency, AdamW + clipping as bytes,
  host dispatch per op; collectives cost latency + bytes / bus bandwidth, overlap where the engine
  overlaps them, and slow the compute they overlap (overlap_slowdown, FSDP2's copy-out). The
  factors (`factors()`) come from the hardware profile and a calibration may replace each.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from autotune.hardware import Hardware, load_hardware
from autotune.profile import (
    BLOCK_FEATURES, OUTSIDE_FEATURES, activation_coefficients, activation_key, block_features, flops_per_token,
    TRAFFIC_BLOCK_FEATURES, outside_features, tp_block_bytes, tp_outside_bytes, traffic_coefficients, traffic_key,
)
from autotune.engine.config import KERNELS, PRECISIONS, ConfigError, JobConfig, ModelConfig, PlanConfig, TrainConfig, validate_plan
from autotune.engine.files import write_atomic
from autotune.engine.model import build_model
from autotune.engine.pipeline import stage_layers

GiB = 2**30
PLAN_COLUMNS = (
    "zero_stage", "offload_optimizer", "offload_params", "micro_batch", "grad_accum", "precision",
    "activation_checkpointing", "checkpoint_every_k", "dp", "tp", "pp", "pp_schedule", "pp_virtual_stages",
    "sequence_parallel", "kernels", "compile",
)
MEMORY = ("params", "grads", "master", "optimizer", "param_copies", "activations", "logits", "comm", "context", "workspace", "allocator")
TIME = ("forward", "backward", "recompute", "optimizer", "dp_comm", "overlap", "tp_comm", "pp_bubble", "pp_comm", "offload",
        "overhead")
COMPUTE = ("matmul", "attention", "memory")  # forward + backward + recompute by kind of work
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
CUDA_CONTEXT_BYTES = 0.5 * GiB  # CUDA context with lazy loading [Fixed overheads]
NCCL_BYTES = 0.5 * GiB  # NCCL communicators and their buffers, several ranks [Fixed overheads]
FRAGMENTATION = 0.05  # allocator slack on the dynamic part (Megatron adds 5% for temporaries) [Activations]
ADAM_BYTES_PER_PARAM = 32  # fused/foreach AdamW: read p, g, m, v; write p, m, v; zero g (fp32)
CLIP_BYTES_PER_PARAM = 12  # clip_grad_norm_: read g for the norm, then g *= scale (read + write)
HOST_ADAM_BYTES_PER_S = 10e9  # CPU AdamW over host memory (ZeRO-Offload reports a few GB/s per socket)
LAUNCH_S = 5e-6  # host time to dispatch one op in eager PyTorch
DDP_BUCKET_BYTES = 25 * 2**20  # DDP's default bucket: one all-reduce each [Model states]


# --- calibration ------------------------------------------------------------------------------

@dataclass
class Calibration:
    """The model's efficiency factors. Defaults come from the hardware profile; measured probe
    results refine them (`fit_calibration`), and `changes()` says what moved."""

    matmul_efficiency: float | None = None  # achieved / peak matmul FLOP/s; None: the hardware's
    attention_efficiency: float | None = None  # achieved / peak FLOP/s of SDPA (executed FLOPs); None: the hardware's
    memory_efficiency: float | None = None  # achieved / datasheet HBM bandwidth of memory-bound ops; None: the hardware's
    overlap_slowdown: float | None = None  # compute lost while a collective runs beside it; None: the hardware's
    collective_efficiency: float = 1.0  # achieved / assumed collective bus bandwidth
    fragmentation: float = FRAGMENTATION  # allocator overhead as a fraction of the dynamic memory
    # fixed allocated bytes beyond the model's tensors: library workspaces (cuBLAS) on a GPU; on a
    # CPU, whose measure is the resident-set growth, the runtime's own arenas and buffers
    workspace_bytes: float = 0.0
    context_bytes: float | None = None  # CUDA context + NCCL; None: the defaults above
    step_overhead_s: float = 0.0  # fixed time per optimizer step (data, logging, host syncs)
    source: str = "defaults"
    records: int = 0

    def changes(self, hw: Hardware | None = None) -> dict[str, dict[str, float]]:
        """{factor: {"default": d, "calibrated": c}} for every factor a calibration moved."""
        base = Calibration()
        out = {}
        for f in ("matmul_efficiency", "attention_efficiency", "memory_efficiency", "overlap_slowdown",
                  "collective_efficiency", "fragmentation", "workspace_bytes", "context_bytes", "step_overhead_s"):
            new, old = getattr(self, f), getattr(base, f)
            if f in HARDWARE_FACTORS and hw is not None:
                old = getattr(hw, f)
            if new is not None and new != old:
                out[f] = {"default": old, "calibrated": new}
        return out

    def save(self, path: str | Path) -> None:
        write_atomic(path, json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        try:
            calib = cls(**json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise ConfigError(f"estimate.calibration: no such file {path}; write one with fit_calibration(...).save(path)")
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise ConfigError(f"estimate.calibration: {path} is not a calibration JSON ({e})")
        for name, (low, high) in CALIBRATION_RANGES.items():
            value = getattr(calib, name)
            if value is None and name in (*HARDWARE_FACTORS, "context_bytes"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ConfigError(f"estimate.calibration: {path} has {name}={value!r}; it must be a number in "
                                  f"[{low}, {high}] (refit it with fit_calibration)")
        return calib


# The values a calibration may hold: efficiencies are fractions of a peak, the rest non-negative.
CALIBRATION_RANGES = {
    "matmul_efficiency": (1e-3, 1.0), "attention_efficiency": (1e-3, 1.0), "memory_efficiency": (1e-3, 1.0),
    "overlap_slowdown": (0.0, 1.0), "collective_efficiency": (1e-3, 1.0), "fragmentation": (0.0, 10.0),
    "workspace_bytes": (0.0, float("inf")), "context_bytes": (0.0, float("inf")), "step_overhead_s": (0.0, float("inf")), "records": (0, float("inf")),
}


HARDWARE_FACTORS = ("matmul_efficiency", "attention_efficiency", "memory_efficiency", "overlap_slowdown")


def factors(hw: Hardware, calib: Calibration | None = None) -> dict[str, float]:
    """The efficiency factors the time model uses: the calibration's where it set them, else the
    hardware profile's (catalog figures, or measured by the probe)."""
    calib = calib or Calibration()
    out = {k: getattr(calib, k) if getattr(calib, k) is not None else getattr(hw, k) for k in HARDWARE_FACTORS}
    return out | {"collective_efficiency": calib.collective_efficiency, "collective_latency_s": hw.collective_latency_s}


def _traffic(model: ModelConfig, b: np.ndarray, s: int, prec: np.ndarray, autocast: np.ndarray, kern: np.ndarray,
             loss_kern: np.ndarray, tp: np.ndarray, sp: np.ndarray) -> dict[str, np.ndarray]:
    """Memory-bound bytes of one micro-batch per block and outside the blocks (forward, backward)
    and op counts, from the traffic measured on the engine's model for each row's precision, cast
    and kernels; the outside (embedding, final norm, head and loss) follows the loss actually run.
    A block is as a tp rank holds it; sequence parallel runs its hidden-width ops (norms, residual
    adds) on s/tp rows."""
    coefs = traffic_coefficients(model)
    fb, fo = block_features(model, b, s, tp), outside_features(model, b, s)
    xb = np.stack([np.broadcast_to(fb[k], b.shape) for k in TRAFFIC_BLOCK_FEATURES], axis=1)
    xo = np.stack([np.broadcast_to(fo[k], b.shape) for k in OUTSIDE_FEATURES], axis=1)
    combos = [(p_, cast, kn) for p_ in PRECISIONS for cast in ("params", "autocast") for kn in KERNELS]
    fits = [coefs[traffic_key(*c)] for c in combos]
    # one integer per row names its (precision, cast, kernels): tables indexed by it, no masks
    prec_code = np.select([prec == p_ for p_ in PRECISIONS], range(len(PRECISIONS)), 0)
    cast_code = (prec_code * 2 + autocast.astype(int)) * len(KERNELS)
    block = cast_code + np.select([kern == kn for kn in KERNELS], range(len(KERNELS)), 0)
    outside = cast_code + np.select([loss_kern == kn for kn in KERNELS], range(len(KERNELS)), 0)
    out = {}
    hidden = np.array([k in ("tok", "h") for k in TRAFFIC_BLOCK_FEATURES])
    shard = np.where(sp, 1 - 1 / tp, 0.0)
    for ph in ("fwd", "bwd"):
        coef = np.array([[f[f"block_{ph}"][k] for k in TRAFFIC_BLOCK_FEATURES] for f in fits])[block]
        out[f"block_{ph}"] = np.einsum("ij,ij->i", coef, xb) - shard * np.einsum("ij,ij->i", coef[:, hidden], xb[:, hidden])
        out[f"outside_{ph}"] = np.einsum("ij,ij->i", np.array([[f[f"outside_{ph}"][k] for k in OUTSIDE_FEATURES] for f in fits])[outside], xo)
    out["block_ops"] = np.array([f["ops"]["block_fwd"] + f["ops"]["block_bwd"] for f in fits])[block]
    out["block_fwd_ops"] = np.array([f["ops"]["block_fwd"] for f in fits])[block]
    out["outside_ops"] = np.array([f["ops"]["outside_fwd"] + f["ops"]["outside_bwd"] for f in fits])[outside]
    return out


# --- what one rank holds ------------------------------------------------------------------------

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


def rank_layout(model: ModelConfig, dp: int, tp: int, pp: int, v: int) -> dict[str, dict[str, int]]:
    """Numels held by the first and the last pipeline rank: whole on the rank (`local`), the FSDP2
    shard of dp-rank 0 (`shard`: ceil(dim0/dp) rows, torch.chunk), the largest ZeRO-1 partition
    (`zero1`: ZeroRedundancyOptimizer's greedy rule over the engine's two param groups, applied to
    the tp shards as engine.parallel.ShardedOptimizer does), tensor counts, and the units
    FSDP2 gathers (`block`: largest block, `root`: embeddings, final norm, head)."""
    key = (repr(model), dp, tp, pp, v)
    if key in _LAYOUTS:
        return _LAYOUTS[key]
    named = _param_shapes(model)
    stages = stage_layers(model.n_layers, pp * v)
    out = {}
    for kind, pp_rank in (("first", 0), ("last", pp - 1)):
        layers = {i for k in range(v) for i in stages[pp_rank + k * pp]}
        is_first, is_last = pp_rank == 0, pp_rank == pp - 1
        held, blocks = [], {}
        for name, shape in named:
            if name.startswith("layers."):
                i = int(name.split(".")[1])
                if i not in layers:
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
            numel = math.prod(local)
            shard = math.ceil(local[0] / dp) * math.prod(local[1:])
            held.append((name, numel, shard, len(local)))
            if name.startswith("layers."):
                blocks[int(name.split(".")[1])] = blocks.get(int(name.split(".")[1]), 0) + numel
        sizes = [0] * dp  # ZeroRedundancyOptimizer._partition_parameters: greedy, largest first, per group
        counts = [0] * dp
        for group in ([h for h in held if h[3] >= 2], [h for h in held if h[3] < 2]):
            for _, numel, _, _ in sorted(group, key=lambda h: h[1], reverse=True):
                r = sizes.index(min(sizes))
                sizes[r] += numel
                counts[r] += 1
        r = sizes.index(max(sizes))
        out[kind] = {
            "local": sum(h[1] for h in held), "shard": sum(h[2] for h in held), "tensors": len(held),
            "zero1": sizes[r], "zero1_tensors": counts[r], "layers": len(layers),
            "block": max(blocks.values(), default=0),
            "root": sum(h[1] for h in held if not h[0].startswith("layers.")),
        }
    _LAYOUTS[key] = out
    return out


# --- the vectorised model ---------------------------------------------------------------------

def _col(plans: pd.DataFrame, name: str, default: Any) -> np.ndarray:
    if name in plans:
        return plans[name].to_numpy()
    return np.full(len(plans), default)


def _in_flight(sched: np.ndarray, pp: np.ndarray, m: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Micro-batches whose activations the first stage holds at once [Activations, Pipeline]:
    GPipe all m; 1F1B min(p, m); interleaved min(p, m)·(1 + (p−1)/(p·v)); no pipeline: 1."""
    one_f = np.minimum(pp, m).astype(float)
    n = np.where(sched == "gpipe", m, np.where(sched == "interleaved_1f1b", one_f * (1 + (pp - 1) / (pp * v)), one_f))
    return np.where(pp > 1, n, 1.0)


def estimate_frame(model: ModelConfig, job: JobConfig, plans: pd.DataFrame, hw: Hardware,
                   calib: Calibration | None = None) -> pd.DataFrame:
    """The plans with their estimate: mem_<component>_bytes, mem_total_bytes, time_<component>_s,
    step_time_s, tokens_per_s, mfu, fits, reason; and peak_stage (first|last pipeline stage),
    allocated_bytes (the total less the CUDA context: what max_memory_allocated shows), matmul_s."""
    calib = calib or Calibration()
    n = len(plans)
    z = _col(plans, "zero_stage", 0).astype(np.int64)
    offload = (_col(plans, "offload_optimizer", False).astype(bool) | _col(plans, "offload_params", False).astype(bool)) & (z >= 2)
    # ZeRO-1 offload is engine.parallel.HostOffloadAdamW: fp32 params and grads stay on the device,
    # the rank's partition has host copies of both plus its AdamW states, and the step runs there
    host_adam = _col(plans, "offload_optimizer", False).astype(bool) & (z == 1)
    b = _col(plans, "micro_batch", 1).astype(np.int64)
    dp = _col(plans, "dp", 1).astype(np.int64)
    tp = _col(plans, "tp", 1).astype(np.int64)
    pp = _col(plans, "pp", 1).astype(np.int64)
    v = _col(plans, "pp_virtual_stages", 1).astype(np.int64)
    ga = pd.to_numeric(pd.Series(_col(plans, "grad_accum", None)), errors="coerce").to_numpy()
    m = np.where(np.isnan(ga), job.global_batch // np.maximum(b * dp, 1), ga).astype(np.int64)
    prec = _col(plans, "precision", "fp32").astype(str)
    ckpt = _col(plans, "activation_checkpointing", "none").astype(str)
    every_k = _col(plans, "checkpoint_every_k", 2).astype(np.int64)
    sched = _col(plans, "pp_schedule", "1f1b").astype(str)
    sp = _col(plans, "sequence_parallel", False).astype(bool)
    kern = _col(plans, "kernels", "torch").astype(str)
    # The fused linear cross-entropy needs the whole head on one rank: under tp (vocabulary-sharded
    # head, loss_parallel) and pp (the schedule's loss_fn on the last stage's logits) the engine
    # computes torch's loss whatever plan.kernels says (autotune/engine/model.py, autotune/engine/pipeline.py).
    loss_kern = np.where((kern == "triton") & (tp == 1) & (pp == 1), "triton", "torch")
    s = job.seq_len
    h, V = model.d_model, model.vocab_size
    beta = np.select([prec == "fp32"], [4], 2).astype(float)  # compute dtype bytes
    autocast = (prec != "fp32") & (z < 2)  # engine.parallel.autocast: ZeRO 0/1; FSDP2 MixedPrecisionPolicy for 2/3
    world = dp * tp * pp
    ddp_buckets = (z <= 1) & (dp > 1) & (tp == 1) & (pp == 1)  # engine.parallel.apply_ddp

    # What each rank holds: one layout per distinct (dp, tp, pp, v)
    packed = ((dp * 4096 + tp) * 4096 + pp) * 4096 + v  # one int64 key per (dp, tp, pp, v)
    keys, inverse = np.unique(packed, return_inverse=True)
    uniq = np.stack([keys >> 36, (keys >> 24) & 4095, (keys >> 12) & 4095, keys & 4095], axis=1)
    lay = {kind: {k: np.empty(len(uniq)) for k in ("local", "shard", "tensors", "zero1", "zero1_tensors", "layers", "block", "root")}
           for kind in ("first", "last")}
    for i, (d_, t_, p_, v_) in enumerate(uniq):
        got = rank_layout(model, int(d_), int(t_), int(p_), int(v_))
        for kind in lay:
            for k in lay[kind]:
                lay[kind][k][i] = got[kind][k]
    lay = {kind: {k: a[inverse] for k, a in d.items()} for kind, d in lay.items()}

    # Measured activation coefficients for each row's (precision, cast, checkpointing, kernels)
    coefs = activation_coefficients(model)
    fb, fo = block_features(model, b, s, tp), outside_features(model, b, s)  # a block as a tp rank holds it
    act = {k: np.zeros(n) for k in ("none_tok", "none_hidden", "none_P", "full_tok", "full_hidden", "full_P",
                                    "out_tok", "out_hidden", "out_V", "out_P")}
    is_prec = {p_: prec == p_ for p_ in PRECISIONS}
    for p_ in PRECISIONS:
        for cast in ("autocast", "params"):
            for kn in KERNELS:
                same = is_prec[p_] & (autocast == (cast == "autocast"))
                rows = same & (kern == kn)
                if rows.any():
                    for mode in ("none", "full"):
                        c = coefs[activation_key(p_, cast, mode, kn)]["block"]
                        act[f"{mode}_tok"][rows] = sum(c[k] * fb[k][rows] for k in BLOCK_FEATURES if k != "P")
                        act[f"{mode}_hidden"][rows] = c["tok"] * fb["tok"][rows] + c["h"] * fb["h"][rows]
                        act[f"{mode}_P"][rows] = c["P"] * fb["P"][rows]
                    c = coefs[activation_key(p_, cast, "none", kn)]["outside"]
                    act["out_tok"][rows] = sum(c[k] * fo[k][rows] for k in OUTSIDE_FEATURES if k not in ("V", "P"))
                    act["out_hidden"][rows] = c["h"] * fo["h"][rows]
                # The head and loss save the V terms (logits) and the P term (head gradient or cast
                # head) of the loss actually run; the per-token terms (the final norm, and the hidden
                # states the head saves or the fused loss's d hidden, of one size) follow plan.kernels.
                rows = same & (loss_kern == kn)
                if rows.any():
                    c = coefs[activation_key(p_, cast, "none", kn)]["outside"]
                    act["out_V"][rows] = c["V"] * fo["V"][rows]
                    act["out_P"][rows] = c["P"] * fo["P"][rows]

    # What a tp rank's block saves (autotune.profile.tp_block_bytes): the fit at its features;
    # sequence parallel shards the hidden-width part except the two all-gathered linear inputs.
    # (Korthikanti et al.'s (10 + 24/t)/34 fits fp32 but not bf16, whose norms keep fp32 parts;
    # their 1/t assumes Megatron's re-gather in backward, which DTensor's linears do not do.)
    plain = tp_block_bytes(act["none_tok"], act["none_hidden"], b, s, h, beta, tp, sp)
    checkpointed = tp_block_bytes(act["full_tok"], act["full_hidden"], b, s, h, beta, tp, sp, checkpointed=True)
    outside_tok = tp_outside_bytes(act["out_tok"], act["out_hidden"], b, s, h, beta, tp, sp)
    flops = flops_per_token(model, s)

    total = {}
    parts_by_stage = {}
    for kind in ("first", "last"):
        L = lay[kind]
        layers = L["layers"]
        # checkpointed blocks on this rank: engine.parallel.checkpointed_blocks (full: all,
        # selective: every k-th from block 0), spread evenly over the stages
        n_ck = np.where(ckpt == "full", layers, np.where(ckpt == "selective", np.ceil(layers / every_k), 0))
        inflight = _in_flight(sched, pp, m, v) if kind == "first" else np.ones(n)
        holds_head = (pp == 1) | (kind == "last")
        mem = {}
        # Model states [Model states]: fp32 params are the master weights; grads fp32 (reduce_dtype fp32)
        persistent = np.where(z >= 2, L["shard"], L["local"])
        mem["params"] = np.where(offload, 0, 4 * persistent)
        # Two moments can peak. At the start of a backward the gradients are those of the earlier
        # micro-batches (the step sets them to None): DDP accumulates them whole in place, FSDP2
        # reduce-scatters every micro-batch (engine.parallel.gradient_sync) into its fp32 shards.
        # At the optimizer step the activations are gone and every gradient exists.
        step_grads = np.where(offload, 0, 4 * persistent)
        # Under pp, torch's pipeline stages turn FSDP2's gradient sync and post-backward reshard off
        # until the last micro-batch (PipelineStage.backward_maybe_with_nosync): the stage's
        # gradients accumulate unsharded in fp32 (the reduce dtype) and ZeRO-3 keeps its blocks
        # gathered after the first micro-batch's backward, as ZeRO-2 does.
        pp_fsdp = (pp > 1) & (z >= 2)
        # DDP's gradients are views of its buckets, which exist from its first step on (ZeRO 0/1
        # without tp or pp): all of them, through every backward
        mem["grads"] = np.where((m > 1) | ddp_buckets, np.where(pp_fsdp, 4 * L["local"], step_grads), 0)
        mem["master"] = np.zeros(n)
        opt_numel = np.where(z == 1, L["zero1"], persistent)
        opt_tensors = np.where(z == 1, L["zero1_tensors"], L["tensors"])
        # AdamW exp_avg + exp_avg_sq fp32, plus one fp32 `step` scalar per parameter tensor
        mem["optimizer"] = np.where(offload | host_adam, 0, 8 * opt_numel + 4 * opt_tensors)
        # 16-bit compute copies: autocast's cast weights are saved for backward (measured P term);
        # FSDP2 ZeRO-2 keeps every unit gathered from forward to backward; ZeRO-3 the root plus the
        # current and the prefetched block [Model states, FSDP2 derived]
        autocast_copies = (act["none_P"] * (layers - n_ck) + act["full_P"] * n_ck + np.where(n_ck > 0, act["none_P"], 0)) / tp * inflight
        mem["param_copies"] = np.select(
            [(z == 2) | (pp_fsdp & (m > 1)), z == 3], [beta * L["local"], beta * (L["root"] + 2 * L["block"])], autocast_copies,
        )
        # Activations [Activations]: measured bytes per block; checkpointed blocks keep their input,
        # and backward recomputes one block's full set at a time
        per_mb = plain * (layers - n_ck) + checkpointed * n_ck + np.where(n_ck > 0, plain, 0)
        mem["activations"] = per_mb * inflight + np.where(holds_head, outside_tok, 0)
        # Logits and loss [Activations]: what the head and loss save, plus (unfused) the fp32
        # gradient of the logits while the saved log-probabilities still live (their 16-bit cast
        # comes after those are freed), vocab-sharded by tp
        logits_grad = np.where(loss_kern == "torch", b * s * V * 4, 0)
        mem["logits"] = np.where(holds_head, (act["out_V"] + act["out_P"] + logits_grad) / tp, 0)
        # Communication buffers: FSDP2 reduce-scatter input of one block during backward (its 16-bit
        # grads and their fp32 cast; the root's comes last, when the activations are gone);
        # pipeline send/recv of one micro-batch's boundary activations
        mem["comm"] = np.where(z >= 2, L["block"] * (beta + np.where(beta < 4, 4, 0)), 0) + np.where(pp > 1, 2 * b * s * h * beta, 0)
        ctx = calib.context_bytes if calib.context_bytes is not None else (CUDA_CONTEXT_BYTES if hw.device == "cuda" else 0.0)
        mem["context"] = np.full(n, ctx) + np.where((world > 1) & (hw.device == "cuda") & (calib.context_bytes is None), NCCL_BYTES, 0)
        dynamic = mem["param_copies"] + mem["activations"] + mem["logits"] + mem["comm"]
        mem["workspace"] = np.full(n, calib.workspace_bytes)
        mem["allocator"] = calib.fragmentation * dynamic
        backward = sum(mem.values())
        at_step = mem["params"] + mem["master"] + mem["optimizer"] + step_grads + mem["context"] + mem["workspace"]
        step_peaks = at_step > backward
        for k in ("param_copies", "activations", "logits", "comm", "allocator"):
            mem[k] = np.where(step_peaks, 0, mem[k])
        mem["grads"] = np.where(step_peaks, step_grads, mem["grads"])
        mem["step_grads"] = step_grads
        mem["phase"] = np.where(step_peaks, "optimizer", "backward")
        parts_by_stage[kind] = mem
        total[kind] = np.maximum(backward, at_step)
    last_peaks = total["last"] > total["first"]
    mem = {k: np.where(last_peaks, parts_by_stage["last"][k], parts_by_stage["first"][k])
           for k in (*MEMORY, "step_grads", "phase")}
    mem_total = np.where(last_peaks, total["last"], total["first"])
    allocated = mem_total - mem["context"]
    F = lay["first"]  # host copies of params and grads, AdamW states (+ HostOffloadAdamW's step scalars)
    host_bytes = np.select([offload, host_adam], [16 * F["shard"], 16 * F["zero1"] + 4 * F["zero1_tensors"]], 0) * hw.gpus_per_node

    # --- time per optimizer step [FLOPs and MFU, Communication] -------------------------------
    # One micro-batch on the first pipeline rank, as the sum of what runs on its compute stream:
    # dense matmuls at the achieved matmul rate, SDPA at its own rate, and the memory-bound ops
    # (norms, activations, rotary, residual adds, casts, the loss over the vocabulary) as the bytes
    # they move, measured on the engine's model (autotune.profile.measure_traffic), over HBM.
    f = factors(hw, calib)
    peak = np.select([prec == "bf16", prec == "fp16"], [hw.peak_flops["bf16"], hw.peak_flops["fp16"]], hw.peak_flops["fp32"])
    achieved = peak * f["matmul_efficiency"]
    hbm = hw.hbm_bytes_per_s * f["memory_efficiency"]
    L = lay["first"]
    layers = L["layers"]
    n_ck = np.where(ckpt == "full", layers, np.where(ckpt == "selective", np.ceil(layers / every_k), 0))
    rec_share = n_ck / np.maximum(layers, 1)  # of the blocks' forward, recomputed in backward
    tok = b * s
    head_weights = V * h
    mm_block = 2 * tok * (flops["matmul_params"] - head_weights) / model.n_layers * layers / tp / achieved
    mm_head = 2 * tok * head_weights / pp / tp / achieved
    # SDPA's flash kernels skip the masked half of the causal s x s scores: forward 2 matmuls of
    # b·a·s²·d/2 each, backward 5 (it recomputes the scores) [FlashAttention-2]. MFU still counts
    # the full 12·L·a·d·s (the convention of flops_per_token).
    att_fwd = 2 * b * s * s * model.n_heads * model.head_dim * layers / tp / (peak * f["attention_efficiency"])
    traffic = _traffic(model, b, s, prec, autocast, kern, loss_kern, tp, sp)
    mem_block = {p_: traffic[f"block_{p_}"] * layers / hbm for p_ in ("fwd", "bwd")}
    mem_out = {p_: traffic[f"outside_{p_}"] / pp / tp / hbm for p_ in ("fwd", "bwd")}
    fwd_mb = mm_block + mm_head + att_fwd + mem_block["fwd"] + mem_out["fwd"]
    bwd_mb = 2 * (mm_block + mm_head) + 2.5 * att_fwd + mem_block["bwd"] + mem_out["bwd"]
    rec_mb = rec_share * (mm_block + att_fwd + mem_block["fwd"])
    t = {}
    t["forward"] = m * fwd_mb
    t["backward"] = m * bwd_mb
    t["recompute"] = m * rec_mb
    compute = t["forward"] + t["backward"] + t["recompute"]
    opt_numel = np.where(z == 1, L["zero1"], np.where(z >= 2, L["shard"], L["local"]))
    opt_bytes = (ADAM_BYTES_PER_PARAM + (CLIP_BYTES_PER_PARAM if job.optimizer.grad_clip > 0 else 0)) * opt_numel
    t["optimizer"] = np.where(offload | host_adam, ADAM_BYTES_PER_PARAM * opt_numel / HOST_ADAM_BYTES_PER_S, opt_bytes / hbm)
    # data parallel: the dp group spans nodes once tp x dp exceeds a node (mesh pp, dp, tp). Each
    # collective costs its latency plus its bytes over the bus bandwidth [Communication].
    # Across nodes NCCL runs one ring per NIC: each of the group's ranks on a node drives its own
    # port, so the ring's bus bandwidth is the per-GPU network figure times those ranks (at most
    # the node's links) [Communication].
    inside = tp * dp <= hw.gpus_per_node
    per_node = np.maximum(1, np.minimum(dp, hw.gpus_per_node // tp))
    bw_dp = np.where(inside, hw.intra_node_bytes_per_s,
                     np.minimum(hw.intra_node_bytes_per_s, hw.inter_node_bytes_per_s * per_node)) * calib.collective_efficiency
    alpha_dp = np.where(inside, hw.collective_latency_s, 2 * hw.collective_latency_s)
    ring = (dp - 1) / dp
    buckets = np.ceil(4 * L["local"] / DDP_BUCKET_BYTES)
    units = layers + 1  # FSDP2 units: one per block, and the root
    allreduce = 2 * ring * 4 * L["local"] / bw_dp + buckets * alpha_dp  # fp32 gradients, once per step (no_sync until the last)
    zero1_gather = np.where(z == 1, ring * 4 * L["local"] / bw_dp + alpha_dp, 0)  # updated partitions broadcast
    gather = ring * beta * L["local"] / bw_dp + units * alpha_dp  # FSDP2 all-gather of 16-bit params
    scatter = ring * 4 * L["local"] / bw_dp + units * alpha_dp  # reduce-scatter in fp32
    # ZeRO-3 gathers each unit for every forward and backward. Under pp the stages keep units gathered
    # from a backward to the next forward (no reshard after backward until the step's end): one
    # gather per backward plus the forwards that run before the first backward (all of them in
    # GPipe, the pp warm-up forwards in 1F1B). ZeRO-2 gathers once per forward.
    gathers = np.where(z == 3, np.where(pp > 1, np.where(sched == "gpipe", m + 1, m + np.minimum(pp, m)), 2 * m), m)
    # reduce-scatter per micro-batch, or once per step under pp (its stages skip the sync until the last)
    fsdp = gathers * gather + np.where(pp > 1, 1, m) * scatter
    # exposed after overlap: DDP overlaps the last backward; FSDP2 overlaps forward and backward
    # but waits for the first unit's gather
    overlapped = np.where(z <= 1, np.minimum(allreduce, bwd_mb), np.minimum(fsdp, t["forward"] + t["backward"]))
    exposed = np.where(z <= 1, allreduce - overlapped + zero1_gather, fsdp - overlapped + gather / units)
    t["dp_comm"] = np.where(dp > 1, exposed, 0)
    # Overlap is not free: while a collective runs, its NCCL channels hold SMs the compute stream
    # loses (overlap_slowdown); and FSDP2 copies every gathered unit out of the all-gather buffer
    # on the compute stream (read + write of the 16-bit params per gather).
    copy_out = np.where(z >= 2, gathers * 2 * beta * L["local"] / hbm, 0)
    t["overlap"] = np.where(dp > 1, f["overlap_slowdown"] * overlapped + copy_out, 0)
    # tensor parallel: 4 all-reduces of b·s·h per block per micro-batch (2 forward, 2 backward),
    # 2 more for a recomputed block; the same volume as gather + scatter with sp [Communication]
    bw_tp = hw.intra_node_bytes_per_s * calib.collective_efficiency
    tp_bytes = 2 * (tp - 1) / tp * b * s * h * beta
    t["tp_comm"] = np.where(tp > 1, m * (4 * layers + 2 * n_ck) * (tp_bytes / bw_tp + hw.collective_latency_s), 0)
    # pipeline: bubble (p−1)/v of one micro-batch's work [Communication]; one activation forward
    # and one gradient backward per micro-batch per boundary
    t["pp_bubble"] = np.where(pp > 1, (pp - 1) / v * (fwd_mb + bwd_mb + rec_mb), 0)
    bw_pp = np.where(world <= hw.gpus_per_node, hw.intra_node_bytes_per_s, hw.inter_node_bytes_per_s) * calib.collective_efficiency
    # a tied embedding's two copies (first and last stage) sum their fp32 gradients (shards under
    # ZeRO 2/3) once per step: a two-rank all-reduce moves the bytes once each way
    tied = 4 * V * h / tp / np.where(z >= 2, dp, 1) / bw_pp if model.tie_embeddings else np.zeros(n)
    t["pp_comm"] = np.where(pp > 1, m * 2 * (b * s * h * beta / bw_pp + hw.collective_latency_s) + tied, 0)
    # offload: sharded fp32 params up and their gradients down, per micro-batch (ZeRO-3 twice)
    # HostOffloadAdamW (ZeRO-1): its partition's params and grads down, params up, once per step
    moves = np.where(z == 3, 2 * m, m) * 4 * L["shard"] + 4 * L["shard"]
    moves = np.where(host_adam, 12 * L["zero1"], moves)
    t["offload"] = np.where(offload | host_adam, moves / hw.host_device_bytes_per_s, 0)
    # eager PyTorch: the host dispatches every op the engine's model runs (counted with the traffic),
    # counted in full (a bound: large kernels hide it behind the GPU's work)
    ops_mb = traffic["block_ops"] * layers + traffic["outside_ops"] / pp + rec_share * traffic["block_fwd_ops"] * layers
    launches = m * ops_mb * LAUNCH_S if hw.device == "cuda" else np.zeros(n)
    t["overhead"] = launches + calib.step_overhead_s
    step = sum(t.values())
    tokens_per_s = job.global_batch * s / step
    mfu = tokens_per_s * flops["total"] / (world * peak)

    capacity = hw.memory_bytes
    fits_gpu = mem_total <= capacity
    fits_host = (hw.host_memory_bytes <= 0) | (host_bytes <= hw.host_memory_bytes)
    fits = fits_gpu & fits_host
    out = plans.copy()
    for k in MEMORY:
        out[f"mem_{k}_bytes"] = mem[k]
    out["mem_total_bytes"] = mem_total
    for k in TIME:
        out[f"time_{k}_s"] = t[k]
    out["step_time_s"] = step
    # compute by kind, over forward, backward and recompute (they sum to those three)
    out["compute_matmul_s"] = m * (3 * (mm_block + mm_head) + rec_share * mm_block)
    out["compute_attention_s"] = m * (3.5 + rec_share) * att_fwd
    out["compute_memory_s"] = compute - out["compute_matmul_s"] - out["compute_attention_s"]
    out["matmul_s"] = out["compute_matmul_s"]  # the part that scales with the matmul efficiency (fit_calibration)
    # everything timed over HBM, which scales with the memory efficiency (fit_calibration)
    out["memory_bound_s"] = out["compute_memory_s"] + np.where(offload | host_adam, 0, t["optimizer"]) + np.where(dp > 1, copy_out, 0)
    out["tokens_per_s"] = tokens_per_s
    out["mfu"] = mfu
    out["fits"] = fits
    out["host_bytes"] = host_bytes  # host memory per node that offload needs
    out["peak_stage"] = np.where(last_peaks, "last", "first")
    out["peak_phase"] = mem["phase"]  # backward (start of a backward) | optimizer (the step)
    out["step_grads_bytes"] = mem["step_grads"]  # gradients held at the optimizer step (model states)
    out["allocated_bytes"] = allocated
    out["reason"] = _reasons(fits_gpu, fits_host, mem, mem_total, capacity, host_bytes, hw.host_memory_bytes)
    return out


def _reasons(fits_gpu, fits_host, mem, total, capacity, host_bytes, host_capacity) -> np.ndarray:
    reason = np.full(len(total), "fits", dtype=object)
    gib = lambda x: pd.Series(np.round(x / GiB, 2)).astype(str).to_numpy(dtype=object)  # noqa: E731
    over = np.flatnonzero(~fits_gpu)  # the text is built for these rows only
    if len(over):
        parts = np.stack([mem[k][over] for k in MEMORY])
        top = np.argmax(parts, axis=0)
        reason[over] = ("needs " + gib(total[over]) + f" GiB per GPU, has {capacity / GiB:.2f} GiB (largest: "
                        + np.array(MEMORY, dtype=object)[top] + " " + gib(parts[top, np.arange(len(over))]) + " GiB)")
    host = np.flatnonzero(fits_gpu & ~fits_host)
    if len(host):
        reason[host] = "offload needs " + gib(host_bytes[host]) + f" GiB of host memory per node, has {host_capacity / GiB:.1f} GiB"
    return reason


# --- one plan ---------------------------------------------------------------------------------

@dataclass
class Estimate:
    params: int
    memory: dict[str, int]
    time: dict[str, float]
    step_time_s: float
    tokens_per_s: float
    mfu: float
    fits: bool
    reason: str
    peak_stage: str = "first"  # the pipeline rank that peaks: first | last
    peak_phase: str = "backward"  # when it peaks: backward (start of a backward) | optimizer (the step)
    model_states: dict[str, int] = field(default_factory=dict)  # params, grads, master, optimizer at the step
    allocated_bytes: int = 0  # what torch.cuda.max_memory_allocated would show (no context)
    host_bytes: int = 0  # host memory per node that offload needs (params, grads, AdamW states)
    flops_per_token: float = 0.0
    compute: dict[str, float] = field(default_factory=dict)  # forward + backward + recompute by kind: matmul, attention, memory
    factors: dict[str, float] = field(default_factory=dict)  # the efficiency factors the time model used
    calibration: dict[str, dict[str, float]] = field(default_factory=dict)
    to_fit: str = ""  # for a plan that does not fit: the changes that would make it fit

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def plan_frame(plans: list[PlanConfig]) -> pd.DataFrame:
    return pd.DataFrame([{k: getattr(p, k) for k in PLAN_COLUMNS} for p in plans])


def estimate(train: TrainConfig, hw: Hardware, calib: Calibration | None = None) -> Estimate:
    """The estimate of one plan: `estimate_frame` on a one-row frame, so the two agree exactly."""
    row = estimate_frame(train.model, train.job, plan_frame([train.plan]), hw, calib).iloc[0]
    return _from_row(row, train, hw, calib)


def _from_row(row: pd.Series, train: TrainConfig, hw: Hardware, calib: Calibration | None) -> Estimate:
    from autotune.engine.model import count_params

    memory = {f"{k}_bytes": int(row[f"mem_{k}_bytes"]) for k in MEMORY}
    memory["total_bytes"] = int(row["mem_total_bytes"])
    return Estimate(
        params=count_params(train.model), memory=memory, time={f"{k}_s": float(row[f"time_{k}_s"]) for k in TIME},
        step_time_s=float(row["step_time_s"]), tokens_per_s=float(row["tokens_per_s"]), mfu=float(row["mfu"]),
        fits=bool(row["fits"]), reason=str(row["reason"]), peak_stage=str(row["peak_stage"]),
        peak_phase=str(row["peak_phase"]), host_bytes=int(row["host_bytes"]),
        model_states={"params_bytes": memory["params_bytes"], "grads_bytes": int(row["step_grads_bytes"]),
                      "master_bytes": memory["master_bytes"], "optimizer_bytes": memory["optimizer_bytes"]},
        allocated_bytes=int(row["allocated_bytes"]), flops_per_token=flops_per_token(train.model, train.job.seq_len)["total"],
        compute={f"{k}_s": float(row[f"compute_{k}_s"]) for k in COMPUTE}, factors=factors(hw, calib),
        calibration=(calib or Calibration()).changes(hw),
    )


def check_engine_supports(plan: PlanConfig, hw: Hardware) -> None:
    """autotune.engine.parallel.check_supported for the target hardware: a catalog GPU has CUDA even when
    this machine has none, so the engine's "Triton needs CUDA here" check does not apply to it."""
    from autotune.profile import temporary_env
    from autotune.engine.parallel import check_supported

    if hw.device == "cuda":
        with temporary_env("TRITON_INTERPRET", "1"):
            check_supported(plan)
    else:
        check_supported(plan)


def fit_suggestion(train: TrainConfig, hw: Hardware, calib: Calibration | None = None) -> str:
    """The fastest nearby plan that fits (and that the engine runs), as the overrides that reach it
    ("" if none does)."""
    p = train.plan
    options = {
        "activation_checkpointing": sorted({p.activation_checkpointing, "full"}),
        "zero_stage": list(range(p.zero_stage, 4)),
        # every micro-batch that divides the rank's share: smaller saves activations
        "micro_batch": [mb for mb in range(1, train.job.global_batch // p.dp + 1) if (train.job.global_batch // p.dp) % mb == 0][:12],
        "precision": sorted({p.precision, "bf16"}),
        "offload_optimizer": sorted({p.offload_optimizer, True}),
    }
    variants = []
    for values in itertools.product(*options.values()):
        q = dataclasses.replace(p, **dict(zip(options, values)), grad_accum=None)
        if q.offload_optimizer and q.zero_stage == 0:
            continue
        try:
            validate_plan(q, train.model, train.job)
            check_engine_supports(q, hw)
        except ConfigError:
            continue
        variants.append(q)
    if not variants:
        return ""
    frame = estimate_frame(train.model, train.job, plan_frame(variants), hw, calib)
    ok = frame[frame["fits"]]
    if ok.empty:
        return ""
    best = ok.sort_values("tokens_per_s", ascending=False).iloc[0]
    edits = [f"plan.{k}={best[k]}".replace("True", "true").replace("False", "false")
             for k in options if best[k] != getattr(p, k)]
    return f"{' '.join(edits)} ({best['mem_total_bytes'] / GiB:.2f} GiB, {best['tokens_per_s']:,.0f} tokens/s)"


# --- calibration from measured probes -----------------------------------------------------------

def fit_calibration(records: list[dict], hw: Hardware | None = None) -> Calibration:
    """Efficiency factors fitted to probe results: records of {"model", "job", "plan"} (dicts) with
    the measured "step_time_s" and "peak_mem_bytes" (torch.cuda.max_memory_allocated).

    Memory: measured = static + workspace + (1 + fragmentation)·dynamic, least squares in both when
    the records' dynamic bytes differ enough to tell them apart; else one of them takes the rest:
    fragmentation on a GPU (the caching allocator's slack grows with what it holds), the workspace
    on a CPU (its measure, the resident-set growth, carries the runtime's fixed buffers).
    Time: measured = k·(matmul time) + other terms + overhead, least squares in k and overhead;
    matmul_efficiency = default/k. With dp/tp communication in at least three records, the
    collective efficiency is fitted the same way (exposed communication taken as linear). The
    memory-bound and attention parts get their own scale (memory_efficiency, attention_efficiency)
    when the records tell them apart from the others (more records than unknowns, and the
    columns far from collinear: plans of one sequence length cannot separate attention from matmuls).
    """
    from autotune.engine.config import build_train_config

    if not records:
        raise ConfigError("fit_calibration needs at least one probe record")
    if hw is None:
        from autotune.hardware import probe_local
        hw = probe_local()
    base = Calibration()
    rows = []
    for r in records:
        cfg = build_train_config({"model": r["model"], "job": r["job"], "plan": r["plan"]})
        row = estimate_frame(cfg.model, cfg.job, plan_frame([cfg.plan]), hw, base).iloc[0]
        rows.append((row, float(r["step_time_s"]), float(r["peak_mem_bytes"])))
    dyn = np.array([sum(row[f"mem_{k}_bytes"] for k in ("param_copies", "activations", "logits", "comm")) for row, _, _ in rows])
    static = np.array([sum(row[f"mem_{k}_bytes"] for k in ("params", "grads", "master", "optimizer")) for row, _, _ in rows])
    frag, workspace = fit_memory_slack(dyn, np.array([p for _, _, p in rows]) - static - dyn, hw.device)

    part = lambda key: np.array([row[key] for row, _, _ in rows])  # noqa: E731
    parts = {"matmul": part("compute_matmul_s"), "memory": part("memory_bound_s"),
             "attention": part("compute_attention_s"), "comm": part("time_dp_comm_s") + part("time_tp_comm_s")}
    y = np.array([t for _, t, _ in rows])
    # A per-step overhead is told apart from the matmul scale only by plans whose compute differs;
    # records of one shape (the first trials often are) fit the scale alone, through the origin.
    cols = {"matmul": parts["matmul"]}
    if len(rows) >= 3 and np.ptp(parts["matmul"]) > 0.2 * parts["matmul"].mean():
        cols["overhead"] = np.ones(len(rows))
    for name in ("memory", "attention"):
        trial = cols | {name: parts[name]}
        x = np.stack(list(trial.values()), axis=1)
        norm = np.linalg.norm(x, axis=0)
        if len(rows) > len(trial) and norm.min() > 0 and np.linalg.cond(x / norm) < IDENTIFIABLE_COND:
            cols = trial
    if (parts["comm"] > 0).sum() >= 3:
        cols["comm"] = parts["comm"]
    target = y - (part("step_time_s") - sum(parts[k] for k in cols if k != "overhead"))
    coef = dict(zip(cols, np.linalg.lstsq(np.stack(list(cols.values()), axis=1), target, rcond=None)[0]))

    def refit(name: str, default: float) -> float | None:
        """default / scale, or None (keep the hardware's) when unfitted or within 1% of it."""
        if name not in coef or abs(coef[name] - 1) < 0.01:
            return None
        return float(np.clip(default / max(coef[name], 1e-3), 0.01, 1.0))

    return Calibration(
        matmul_efficiency=float(np.clip(hw.matmul_efficiency / max(float(coef["matmul"]), 1e-3), 0.01, 1.0)),
        memory_efficiency=refit("memory", hw.memory_efficiency),
        attention_efficiency=refit("attention", hw.attention_efficiency),
        collective_efficiency=float(np.clip(1.0 / max(coef["comm"], 1e-3), 0.01, 1.0)) if "comm" in coef else 1.0,
        fragmentation=frag, workspace_bytes=workspace, step_overhead_s=max(float(coef.get("overhead", 0.0)), 0.0), source="fit", records=len(records),
    )


def fit_memory_slack(dynamic: np.ndarray, rest: np.ndarray, device: str) -> tuple[float, float]:
    """(fragmentation, workspace_bytes) with rest ≈ workspace + fragmentation·dynamic, both >= 0
    and fragmentation at most 1 (see fit_calibration)."""
    if len(rest) >= 3 and np.ptp(dynamic) > 0.2 * dynamic.mean():  # the two can be told apart
        (workspace, frag), *_ = np.linalg.lstsq(np.stack([np.ones_like(dynamic), dynamic], axis=1), rest, rcond=None)
        if workspace >= 0 and 0 <= frag <= 1:
            return float(frag), float(workspace)
    if device == "cpu":  # the fixed part takes the rest, over the default slack
        return FRAGMENTATION, float(max(np.mean(rest - FRAGMENTATION * dynamic), 0.0))
    return float(np.clip(np.dot(dynamic, rest) / max(np.dot(dynamic, dynamic), 1.0), 0.0, 1.0)), 0.0


# The condition number (columns scaled to unit length) below which two time parts are told apart
IDENTIFIABLE_COND = 30.0


# --- CLI --------------------------------------------------------------------------------------

def resolve_world(cfg, overrides: list[str]) -> str:
    """dp x tp x pp must equal the cluster's GPUs [DESIGN]: when the user set none of dp, tp, pp,
    dp fills the cluster; otherwise a mismatch is an error that says what to set."""
    plan, n_gpus = cfg.train.plan, cfg.cluster.n_gpus
    if plan.world_size == n_gpus:
        return ""
    set_keys = {o.split("=", 1)[0].lstrip("+") for o in overrides}
    if "plan.dp" not in set_keys and n_gpus % (plan.tp * plan.pp) == 0:
        plan.dp = n_gpus // (plan.tp * plan.pp)
        plan.grad_accum = None
        validate_plan(plan, cfg.train.model, cfg.train.job)
        return f"plan.dp={plan.dp}: fills the cluster's {n_gpus} GPUs (tp={plan.tp} x pp={plan.pp})"
    hint = f"plan.dp={n_gpus // (plan.tp * plan.pp)}" if n_gpus % (plan.tp * plan.pp) == 0 else "a tp x pp that divides it"
    raise ConfigError(
        f"plan.dp={plan.dp} x plan.tp={plan.tp} x plan.pp={plan.pp} = {plan.world_size} but cluster "
        f"{cfg.cluster.name!r} has {n_gpus} GPUs; set {hint}"
    )


def load_calibration(cfg) -> Calibration | None:
    path = getattr(getattr(cfg, "estimate", None), "calibration", None)
    return Calibration.load(path) if path else None


def _size(n: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:9.2f} {unit}"
    return f"{n:9.0f} B  "


def _print_table(est: Estimate, train: TrainConfig, hw: Hardware, note: str, calib_path: str | None) -> None:
    p = train.plan
    print(f"{train.model.name}: {est.params:,} params on {hw.n_gpus} x {hw.gpu} "
          f"({'measured' if hw.measured else 'catalog'}), {hw.memory_bytes / GiB:.2f} GiB each")
    print(f"plan: zero {p.zero_stage}, {p.precision}, micro_batch {p.micro_batch} x grad_accum {p.grad_accum}, "
          f"dp {p.dp} tp {p.tp} pp {p.pp}, checkpointing {p.activation_checkpointing}, kernels {p.kernels}"
          + (", offload" if (p.offload_optimizer or p.offload_params) else ""))
    if note:
        print(f"note: {note}")
    print(f"\nmemory per GPU (peak: {est.peak_stage} pipeline stage, at the {est.peak_phase} phase)")
    for k, val in est.memory.items():
        if k != "total_bytes":
            print(f"  {k[:-6]:14s} {_size(val)}")
    print(f"  {'total':14s} {_size(est.memory['total_bytes'])}   of {hw.memory_bytes / GiB:.2f} GiB")
    print("\ntime per step")
    for k, val in est.time.items():
        print(f"  {k[:-2]:14s} {val * 1e3:12.3f} ms")
    print(f"  {'total':14s} {est.step_time_s * 1e3:12.3f} ms")
    print("  forward + backward + recompute by kind: " + ", ".join(
        f"{k[:-2]} {v * 1e3:.3f} ms" for k, v in est.compute.items()))
    print("  factors: " + ", ".join(f"{k} {v:.3g}" for k, v in est.factors.items()))
    print(f"\ntokens/s {est.tokens_per_s:,.0f}   MFU {est.mfu:.1%}   FLOPs/token {est.flops_per_token:.4g}")
    if est.calibration:
        print(f"calibration {calib_path}: " + ", ".join(
            f"{k} {v['default']:.4g} -> {v['calibrated']:.4g}" for k, v in est.calibration.items()))
    print(f"fits: {'yes' if est.fits else 'NO'} ({est.reason})")
    if not est.fits:
        print(f"would fit with: {est.to_fit or 'no nearby plan fits; add GPUs or choose a smaller model'}")


def cli(argv: list[str]) -> int:
    from autotune.config import planner_config

    parser = argparse.ArgumentParser(prog="autotune estimate", description="predicted memory and step time of one plan")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args, overrides = parser.parse_known_args(argv)
    cfg = planner_config(overrides)
    hw = load_hardware(cfg.cluster)
    note = resolve_world(cfg, overrides)
    check_engine_supports(cfg.train.plan, hw)
    calib = load_calibration(cfg)
    est = estimate(cfg.train, hw, calib)
    if not est.fits:
        est.to_fit = fit_suggestion(cfg.train, hw, calib)
    if args.json:
        print(json.dumps(est.to_dict() | {"note": note}))
    else:
        _print_table(est, cfg.train, hw, note, getattr(getattr(cfg, "estimate", None), "calibration", None))
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
