"""The step's collectives: data-parallel gradients and parameters, tensor-parallel activations,
pipeline boundaries, timed by autotune.estimate.collectives, and what of them the compute cannot
hide ([Communication] in docs/formulas.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from autotune.engine.config import ModelConfig
from autotune.estimate import float8
from autotune.estimate.arrays import PlanArrays
from autotune.estimate.collectives import collective_time, send_time
from autotune.estimate.gemm import block_gemms, matmul_efficiency
from autotune.estimate.layout import HeldNumels
from autotune.hardware import Hardware
from autotune.profile import block_matmuls

DDP_BUCKET_BYTES = 25 * 2**20  # DDP's default bucket: one all-reduce each [Model states]


@dataclass(frozen=True)
class PassCompute:
    """One micro-batch's compute on the first pipeline rank's stream, per block, per plan."""

    forward: np.ndarray  # one block's forward
    backward: np.ndarray  # one block's backward, with its recompute
    last_backward: np.ndarray  # the whole last micro-batch's backward (DDP's window)


def dp_group(plans: PlanArrays, hw: Hardware) -> tuple[np.ndarray, np.ndarray]:
    """(ranks, ranks per node) of the data-parallel group the ZeRO collectives run over: mesh
    (pp, dp, tp), tp innermost; under hybrid sharding one replica's shard group (dp / dp_replicate
    consecutive dp ranks)."""
    return plans.dp_shard, np.maximum(1, np.minimum(plans.dp_shard, hw.gpus_per_node // plans.tp))


def replica_group(plans: PlanArrays, hw: Hardware) -> tuple[np.ndarray, np.ndarray]:
    """(ranks, ranks per node) of hybrid sharding's replica group: the dp_replicate ranks holding
    the same shard, one shard group (dp_shard x tp ranks) apart, so on different nodes once a shard
    group fills a node."""
    apart = plans.dp_shard * plans.tp
    return plans.dp_replicate, np.maximum(1, np.minimum(plans.dp_replicate, hw.gpus_per_node // apart))


def replica_all_reduce(nbytes, plans: PlanArrays, hw: Hardware, eff: float):
    """The all-reduce of `nbytes` (a rank's reduce-scattered gradient shards) across the replicas."""
    ranks, per_node = replica_group(plans, hw)
    return collective_time("all_reduce", nbytes, ranks, per_node, hw, eff)


def dp_collective(kind: str, dense_bytes, expert_bytes, plans: PlanArrays, hw: Hardware, eff: float):
    """One collective over the data-parallel group of a rank's dense part, and one over the edp =
    dp/ep ranks holding the same routed experts of their part (none without experts)."""
    ranks, per_node = dp_group(plans, hw)
    edp = plans.dp // plans.ep
    edp_per_node = np.maximum(1, np.minimum(edp, per_node // plans.ep))
    experts = collective_time(kind, expert_bytes, edp, edp_per_node, hw, eff)
    return (collective_time(kind, dense_bytes, ranks, per_node, hw, eff)
            + np.where(np.asarray(expert_bytes) > 0, experts, 0))


def _ddp(plans: PlanArrays, held: HeldNumels, hw: Hardware, eff: float, window: np.ndarray) -> dict:
    """ZeRO 0: the gradients all-reduced once per step in DDP's buckets (fp32, or bf16 copies under
    bf16_compress_hook: the same buckets, half the bytes), launched as they fill during the last
    backward: what outlasts that backward is exposed, and at least the last bucket."""
    grad = plans.reduce_bytes
    dense, experts = grad * (held.local - held.experts), grad * held.experts
    # a bucket holds DDP_BUCKET_BYTES of fp32 gradients whatever dtype it is reduced in
    buckets = np.maximum(np.ceil(4 * held.local / DDP_BUCKET_BYTES), 1)
    bucket = dp_collective("all_reduce", dense / buckets, experts / buckets, plans, hw, eff)
    total = buckets * bucket
    exposed = np.maximum(total - window, bucket)
    return {"exposed": exposed, "overlapped": total - np.minimum(exposed, total)}


def _fsdp(plans: PlanArrays, held: HeldNumels, hw: Hardware, eff: float, compute: PassCompute) -> dict:
    """ZeRO 1-3 (FSDP2, one unit per block and the root). Each unit's all-gather of its 16-bit
    parameters is prefetched during the previous unit's compute, and each unit's gradients are
    reduce-scattered (in the reduce dtype) during the next one's backward. So a pass waits for its
    first gather, for every unit whose collectives outlast its neighbour's compute, and a backward
    for its last reduce-scatter; the root (never resharded) is gathered and reduce-scattered once per step.
    These run over the shard group; hybrid sharding adds `_replicas`."""
    layers, m, pp = np.maximum(held.layers, 1), plans.micro_batches, plans.pp
    unit = np.maximum(held.local - held.root - held.experts, 0) / layers  # a block's dense numel
    unit_experts = held.experts / layers
    gather = dp_collective("all_gather", plans.gather_bytes * unit, plans.compute_bytes * unit_experts, plans, hw, eff)
    grad = plans.reduce_bytes
    scatter = dp_collective("reduce_scatter", grad * unit, grad * unit_experts, plans, hw, eff)
    root = (dp_collective("all_gather", plans.compute_bytes * held.root, 0, plans, hw, eff)
            + dp_collective("reduce_scatter", grad * held.root, 0, plans, hw, eff))
    # Gathers per step: ZeRO-2 once per forward; ZeRO-3 per forward and per backward. Where the sync
    # and the post-backward reshard wait for the last micro-batch (`deferred_sync`: ZeRO-1, and under
    # pp PipelineStage's nosync) nothing is resharded after a backward until the last one: ZeRO 1/2,
    # never resharded after a forward either, gather each unit once per step; ZeRO-3 once per
    # backward plus the forwards before the first backward (GPipe: one round, 1F1B: its warm-up).
    # Reduce-scatters: per micro-batch, or once per step where the sync waits for the last.
    deferred = plans.deferred_sync
    backward_gathers = np.where(plans.zero_stage == 3, m, 0)
    warmup = np.where(plans.schedule == "gpipe", 1, np.minimum(pp, m))
    forward_gathers = np.where(deferred, np.where(plans.zero_stage == 3, warmup, 1), m)
    scatters = np.where(deferred, 1, m)
    # A backward that reduce-scatters exposes each unit's gather (ZeRO-3) and reduce-scatter beyond its
    # block's backward; with the sync deferred only the last one does, the others only gather.
    gathered = np.where(plans.zero_stage == 3, gather, 0)
    reducing = layers * np.maximum(0, gathered + scatter - compute.backward)
    backward = np.where(deferred, (m - 1) * layers * np.maximum(0, gathered - compute.backward) + reducing, m * reducing)
    exposed = forward_gathers * (gather + layers * np.maximum(0, gather - compute.forward)) + backward + scatters * scatter + root
    total = layers * ((forward_gathers + backward_gathers) * gather + scatters * scatter) + root
    slack = np.maximum(0, compute.backward - gathered - scatter)
    replicas = _replicas(plans, held, hw, eff, unit + unit_experts, slack)
    exposed, total = exposed + replicas["exposed"], total + replicas["total"]
    return {"exposed": exposed, "overlapped": np.maximum(total - exposed, 0),
            "gathers": forward_gathers + backward_gathers}


def _replicas(plans: PlanArrays, held: HeldNumels, hw: Hardware, eff: float, unit: np.ndarray,
              slack: np.ndarray) -> dict[str, np.ndarray]:
    """Hybrid sharding: each unit's gradient shard all-reduced (in the reduce dtype) across the
    replicas once per step, after its reduce-scatter in the last backward
    (engine.parallel.gradient_sync), during the next unit's backward where that backward's own collectives leave it room (`slack`, per block);
    the last unit's and the root's wait."""
    shards = plans.dp_shard
    block = replica_all_reduce(plans.reduce_bytes * unit / shards, plans, hw, eff)
    root = replica_all_reduce(plans.reduce_bytes * held.root / shards, plans, hw, eff)
    layers = np.maximum(held.layers, 1)
    hybrid = plans.dp_replicate > 1
    return {"exposed": np.where(hybrid, block + layers * np.maximum(0, block - slack) + root, 0),
            "total": np.where(hybrid, layers * block + root, 0)}


def data_parallel(plans: PlanArrays, held: HeldNumels, hw: Hardware, eff: float, compute: PassCompute,
                  overlap_slowdown: float, hbm: float) -> dict[str, np.ndarray]:
    """dp_comm (exposed collectives), overlap (what overlapping costs the compute stream: NCCL's
    channels hold SMs; FSDP2 copies every gathered unit out of the all-gather buffer, read + write
    of the 16-bit params, on the compute stream) and copy_out (that copy, timed over HBM)."""
    ddp = _ddp(plans, held, hw, eff, compute.last_backward)
    fsdp = _fsdp(plans, held, hw, eff, compute)
    sharded = plans.zero_stage >= 1
    gathered = plans.gather_bytes * (held.local - held.root) + plans.compute_bytes * held.root  # float8 blocks: a byte
    copy_out = np.where(sharded, fsdp["gathers"] * 2 * gathered / hbm, 0)
    overlapped = np.where(sharded, fsdp["overlapped"], ddp["overlapped"])
    many = plans.dp > 1
    return {"dp_comm": np.where(many, np.where(sharded, fsdp["exposed"], ddp["exposed"]), 0),
            "overlap": np.where(many, overlap_slowdown * overlapped + copy_out, 0), "copy_out": copy_out}


def tensor_parallel(model: ModelConfig, seq_len: int, plans: PlanArrays, held: HeldNumels, hw: Hardware,
                    eff: float, block_matmul: np.ndarray, overlap_slowdown: float,
                    overhead_k: np.ndarray) -> dict[str, np.ndarray]:
    """tp_comm: per micro-batch 4 all-reduces of b·s·h per block (2 forward, 2 backward), 2 more for a
    recomputed block (op recomputes them too: it keeps no all-reduce or all-gather output; the
    attention core has none); with sequence parallelism the same bytes as all-gather + reduce-scatter,
    the all-gathers in float8 under tensorwise float8, which adds its scalar amax all-reduces
    [Float8]. Inside a node, not overlapped, except under async tp [Async tensor parallelism]: tp_overlap is
    what async tp costs the compute (smaller chunked GEMMs, the ring's SMs). block_matmul: one
    block's forward matmuls, one micro-batch; overhead_k: the GEMM tiles' fixed cost (gemm.tile_overhead_k)."""
    tp = plans.tp
    nbytes = plans.micro_batch * seq_len * model.d_model * plans.compute_bytes
    recomputed = np.where(plans.checkpointing == "attention", 0, plans.checkpointed(held.layers))
    passes = 2 * held.layers + recomputed  # block passes with tp collectives: forward, backward, recompute
    gathered = nbytes / plans.compute_bytes * float8.tp_gather_bytes(plans)
    float8_saving = np.where(gathered < nbytes, collective_time("all_gather", nbytes, tp, tp, hw, eff)
                             - collective_time("all_gather", gathered, tp, tp, hw, eff), 0.0)
    amaxes = float8.tp_amax_reductions(model, plans)
    amax = collective_time("all_reduce", 4, tp, tp, hw, eff) * (amaxes["fwd"] * (held.layers + recomputed)
                                                                + amaxes["bwd"] * held.layers)
    plain = passes * 2 * (collective_time("all_reduce", nbytes, tp, tp, hw, eff) - float8_saving) + amax
    pipelined = async_tp_block(model, seq_len, plans, hw, eff, block_matmul, overlap_slowdown, overhead_k)
    many = (tp > 1) * plans.micro_batches
    return {"tp_comm": many * np.where(plans.async_tp, passes * pipelined["exposed"], plain),
            "tp_overlap": many * np.where(plans.async_tp, passes * pipelined["cost"], 0)}


def async_tp_block(model: ModelConfig, seq_len: int, plans: PlanArrays, hw: Hardware, eff: float,
                   block_matmul: np.ndarray, overlap_slowdown: float, overhead_k) -> dict[str, np.ndarray]:
    """One block pass under async tp. Each of its 4 sequence-parallel collectives (C: all-gather or
    reduce-scatter of b·s·h) runs as tp - 1 ring steps beside tp chunks of its matmul group (M: q/k/v,
    wo, gate/up, down; backward their input gradients, the same FLOPs): the first chunk (all-gather)
    or the last (reduce-scatter) has no step beside it, so max(0, C - M·(tp - 1)/tp) stays exposed.
    cost: the hidden steps slow the compute by overlap_slowdown (the ring's SMs), and the GEMMs run
    on s / tp rows at their lower shape efficiency."""
    tp, tokens = plans.tp, plans.micro_batch * seq_len
    one = collective_time("all_gather", tokens * model.d_model * plans.compute_bytes, tp, tp, hw, eff)
    matmuls = dict(block_matmuls(model))
    groups = [("wq", "wk", "wv"), ("wo",), ("w_gate", "w_up"), ("w_down",)]
    total = sum(matmuls.values())
    exposed = hidden = 0.0
    for group in groups:
        group_time = block_matmul * sum(matmuls.get(name, 0) for name in group) / total
        shown = np.maximum(0.0, one - group_time * (tp - 1) / tp)
        exposed, hidden = exposed + shown, hidden + one - shown
    whole = matmul_efficiency(block_gemms(model, tp), tokens, hw.sms, overhead_k)["fwd"]
    chunked = matmul_efficiency(block_gemms(model, tp), tokens / tp, hw.sms, overhead_k)["fwd"]
    return {"exposed": exposed, "cost": overlap_slowdown * hidden + block_matmul * (whole / chunked - 1)}


def pipeline_transfers(model: ModelConfig, seq_len: int, plans: PlanArrays, hw: Hardware,
                       eff: float) -> np.ndarray:
    """One activation forward and one gradient backward per micro-batch per boundary, across nodes
    when a stage's dp x tp ranks fill a node; a tied embedding's two copies' gradients summed once
    per step in the reduce dtype (shards under ZeRO 1-3)."""
    across = (plans.world > hw.gpus_per_node) & (plans.dp * plans.tp >= hw.gpus_per_node)
    activation_bytes = plans.micro_batch * seq_len * model.d_model * plans.compute_bytes
    boundary = plans.micro_batches * 2 * send_time(activation_bytes, across, hw, eff)
    if model.tie_embeddings:
        tied_bytes = (plans.reduce_bytes * model.vocab_size * model.d_model / plans.tp
                      / np.where(plans.zero_stage >= 1, plans.dp_shard, 1))
        tied = send_time(tied_bytes, across, hw, eff)
    else:
        tied = np.zeros(plans.rows)
    return np.where(plans.pp > 1, boundary + tied, 0)
