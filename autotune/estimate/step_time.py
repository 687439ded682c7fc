"""Time per optimizer step: the sum of what runs on the compute stream of the first pipeline rank
(sections of docs/formulas.md in brackets).

Dense matmuls (6N) at the matmul efficiency, SDPA at the FLOPs its causal flash kernels execute and
the attention efficiency, memory-bound ops as the bytes measured on the engine's model over HBM at
the memory efficiency, AdamW + clipping as bytes; collectives cost latency + bytes / bus bandwidth,
overlap where the engine overlaps them and slow the compute they overlap (overlap_slowdown,
FSDP2's copy-out); the pipeline bubble, offload transfers and host dispatch per op add to it. A
MoE model's routed experts compute the slots that reach the busiest expert-parallel rank, and the
all-to-alls that bring them are exposed (autotune.estimate.routing).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from autotune.engine.config import OP_CHECKPOINT_EVERY_K, JobConfig, ModelConfig
from autotune.estimate.arrays import PlanArrays
from autotune.estimate.calibration import Calibration, factors
from autotune.estimate.attention import attention_efficiency, relative_attention_efficiency
from autotune.estimate.columns import TIME
from autotune.estimate import float8
from autotune.estimate.context import ring_exchange, ring_traffic
from autotune.estimate.communication import PassCompute, data_parallel, pipeline_transfers, tensor_parallel
from autotune.estimate.gemm import block_gemms, matmul_efficiency, tile_overhead_k
from autotune.estimate.layout import HeldNumels
from autotune.estimate.routing import Routing, all_to_all_time
from autotune.estimate.traffic import micro_batch_traffic
from autotune.hardware import Hardware
from autotune.profile import block_matmuls, flops_per_token, kept_matmuls

ADAM_BYTES_PER_PARAM = 32  # fused/foreach AdamW: read p, g, m, v; write p, m, v; zero g (fp32)
CLIP_BYTES_PER_PARAM = 12  # clip_grad_norm_: read g for the norm, then g *= scale (read + write)
HOST_ADAM_BYTES_PER_S = 10e9  # CPU AdamW over host memory (ZeRO-Offload reports a few GB/s per socket)


@dataclass(frozen=True)
class MicroBatchCompute:
    """One micro-batch on the first pipeline rank's compute stream, in seconds, per plan."""

    matmul_blocks: np.ndarray  # the blocks' dense matmuls, forward
    matmul_head: np.ndarray  # the head's matmul, forward (its share of the pipeline)
    matmul_backward: np.ndarray  # the blocks' and the head's matmuls, backward (their own shapes)
    attention: np.ndarray  # SDPA forward
    memory_blocks: dict[str, np.ndarray]  # the blocks' memory-bound ops, {"fwd", "bwd"}
    memory_outside: dict[str, np.ndarray]  # the same outside the blocks (embedding, final norm, head, loss)
    ring: dict[str, np.ndarray]  # the cp ring's own memory-bound ops (merges, accumulators), {"fwd", "bwd"}
    recompute_share: dict[str, np.ndarray]  # of the blocks' forward {matmul, attention, memory}, recomputed in backward
    dispatched_ops: np.ndarray  # ops the host dispatches

    @property
    def forward(self) -> np.ndarray:
        return (self.matmul_blocks + self.matmul_head + self.attention + self.ring["fwd"] + self.memory_blocks["fwd"]
                + self.memory_outside["fwd"])

    @property
    def backward(self) -> np.ndarray:
        # SDPA's backward runs 5 matmuls of the forward's 2 (it recomputes the scores) [FlashAttention-2]
        return (self.matmul_backward + 2.5 * self.attention + self.ring["bwd"] + self.memory_blocks["bwd"]
                + self.memory_outside["bwd"])

    @property
    def recompute(self) -> np.ndarray:
        share = self.recompute_share
        return (share["matmul"] * self.matmul_blocks + share["attention"] * (self.attention + self.ring["fwd"])
                + share["memory"] * self.memory_blocks["fwd"])


@dataclass(frozen=True)
class StepTime:
    """The time of one optimizer step per plan, by part (TIME) and by kind of compute work."""

    parts: dict[str, np.ndarray]
    total: np.ndarray
    compute: dict[str, np.ndarray]  # forward + backward + recompute by kind: matmul, attention, memory
    memory_bound: np.ndarray  # everything timed over HBM, which scales with the memory efficiency
    peak_flops: np.ndarray  # the peak FLOP/s of each plan's precision (MFU's denominator)


def micro_batch_compute(model: ModelConfig, seq_len: int, plans: PlanArrays, held: HeldNumels, hw: Hardware,
                        efficiency: dict[str, float], routing: Routing) -> MicroBatchCompute:
    """Dense matmuls at the achieved matmul rate of their shapes [Matmul shapes], SDPA at its own
    rate, and the memory-bound ops (norms, activations, rotary, residual adds, casts, the loss over
    the vocabulary) as the bytes they move over HBM [FLOPs and MFU]. The routed experts' matmuls
    are those of the slots that reach the busiest expert-parallel rank."""
    tp, pp, layers = plans.tp, plans.pp, held.layers
    # a local device's measured slowdown of the engine's compute in this precision and kernels
    peak = _peak_flops(plans, hw) / compute_scale(plans, hw)
    achieved = peak * efficiency["matmul_efficiency"]
    hbm = hw.hbm_bytes_per_s * efficiency["memory_efficiency"] / compute_scale(plans, hw)
    tokens = plans.micro_batch * seq_len
    head_weights = model.vocab_size * model.d_model
    flops = flops_per_token(model, seq_len)
    # per token, over all blocks: the weights every rank computes its own tokens with, and the routed
    # experts' (k per token), which compute the slots that reach the rank
    per_token = flops["matmul_params"] - head_weights - flops["expert_params"] * (1 - routing.arrived)
    # SDPA's flash kernels skip the masked half of the causal s x s scores: forward 2 matmuls of
    # b·a·s²·d/2 each [FlashAttention-2]. MFU still counts the full 12·L·a·d·s (flops_per_token).
    # SDPA's kernel (or cuDNN's, plan.attention) at its rate for this sequence length, head width and
    # heads on the rank [Attention]
    attention_rate = (relative_attention_efficiency(plans.micro_batch * model.n_heads / tp, seq_len, model.head_dim,
                                                    hw.sms, hw.tensor_flops_per_clock)
                      * attention_efficiency(plans.cudnn_attention, efficiency["attention_efficiency"], hw))
    # Under context parallelism seq_len is the rank's S / cp queries, which see S / 2 keys on
    # average, as every query does: the rank does 1/cp of the sequence's attention [Context parallelism]
    attention = (2 * plans.micro_batch * seq_len * seq_len * plans.cp * model.n_heads * model.head_dim * layers / tp
                 / (peak * attention_rate))
    traffic = micro_batch_traffic(model, plans, seq_len, routing)
    casts = float8.cast_traffic(model, plans, seq_len)
    # float8 linears: their share of the blocks' matmul time, at the float8 GEMM rate [Float8]
    converted = float8.converted_share(model, per_token)
    rates = float8.rate_ratio(plans, hw, efficiency["matmul_efficiency"])
    blocks_rate = {phase: 1 - converted + converted / rates[phase] for phase in ("fwd", "bwd")}
    recompute_share = _recompute_share(model, plans, layers, traffic)
    overhead_k = gemm_tile_overhead(plans, hw)
    block = matmul_efficiency(block_gemms(model, tp), tokens, hw.sms, overhead_k)
    head = matmul_efficiency([(model.d_model, model.vocab_size / tp)], tokens, hw.sms, overhead_k)
    block_flops = 2 * tokens * per_token / model.n_layers * layers / tp
    head_flops = 2 * tokens * head_weights / pp / tp
    return MicroBatchCompute(
        matmul_blocks=block_flops * blocks_rate["fwd"] / (achieved * block["fwd"]),
        matmul_head=head_flops / (achieved * head["fwd"]),
        matmul_backward=2 * (block_flops * blocks_rate["bwd"] / block["bwd"] + head_flops / head["bwd"]) / achieved,
        attention=attention,
        memory_blocks={phase: (traffic[f"block_{phase}"] + casts[phase]) * layers / hbm for phase in ("fwd", "bwd")},
        memory_outside={phase: traffic[f"outside_{phase}"] / pp / tp / hbm for phase in ("fwd", "bwd")},
        # the ring's merges and accumulators [Context parallelism]: recomputed with its attention
        ring={phase: bytes_ * layers / hbm for phase, bytes_ in ring_traffic(model, seq_len, plans).items()},
        recompute_share=recompute_share,
        # eager PyTorch: the host dispatches every op the engine's model runs (counted with the traffic)
        dispatched_ops=((traffic["block_ops"] + casts["ops"]) * layers + traffic["outside_ops"] / pp
                        + recompute_share["memory"] * (traffic["block_fwd_ops"] + casts["fwd_ops"]) * layers),
    )


def _recompute_share(model: ModelConfig, plans: PlanArrays, layers: np.ndarray,
                     traffic: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What share of the blocks' forward matmuls, attention and memory-bound ops (and dispatched ops,
    as the memory-bound share) backward recomputes [Activations]: full and selective the checkpointed
    blocks' all; op every block's memory-bound ops and the matmuls whose outputs it does not keep
    (engine.parallel.op_policy; SDPA's output is kept); attention each block's SDPA and the memory-bound
    ops of its core (traffic's block_fwd_core)."""
    whole = plans.checkpointed(layers) / np.maximum(layers, 1)
    mode = plans.checkpointing
    matmuls = block_matmuls(model)
    recomputed = {k: sum(f for name, f in matmuls if name not in kept_matmuls(model, k)) / sum(f for _, f in matmuls)
                  for k in OP_CHECKPOINT_EVERY_K}
    op_matmul = np.select([plans.every_k == k for k in recomputed], list(recomputed.values()), 0.0)
    core = traffic["block_fwd_core"] / np.maximum(traffic["block_fwd"], 1e-30)
    return {
        "matmul": np.select([mode == "op", mode == "attention"], [op_matmul, 0.0], whole),
        "attention": np.select([mode == "op", mode == "attention"], [0.0, 1.0], whole),
        "memory": np.select([mode == "op", mode == "attention"], [1.0, core], whole),
    }


def gemm_tile_overhead(plans: PlanArrays, hw: Hardware) -> np.ndarray:
    """Each plan's GEMM tile fixed cost in steps of K ([Matmul shapes]): its compute dtype's output
    written at the hardware's achieved HBM rate against its achieved matmul rate (the profile's, not
    a calibration's: a calibrated scale multiplies the matmul time, shapes and all)."""
    return tile_overhead_k(plans.compute_bytes, _peak_flops(plans, hw) * hw.matmul_efficiency,
                           hw.hbm_bytes_per_s * hw.memory_efficiency)


def compute_scale(plans: PlanArrays, hw: Hardware) -> np.ndarray:
    """What each plan's modelled compute is multiplied by: `hw.compute_scale` of its precision and
    kernels (measured on the engine's own block for a local device [Calibration]), else 1."""
    scale = np.ones(plans.rows)
    for key, value in hw.compute_scale.items():
        precision, kernels = key.split("/")
        scale = np.where((plans.precision == precision) & (plans.kernels == kernels), value, scale)
    return scale


def _peak_flops(plans: PlanArrays, hw: Hardware) -> np.ndarray:
    return np.select([plans.precision == "bf16", plans.precision == "fp16"],
                     [hw.peak_flops["bf16"], hw.peak_flops["fp16"]], hw.peak_flops["fp32"])


def _optimizer(job: JobConfig, plans: PlanArrays, held: HeldNumels, hbm: float) -> np.ndarray:
    """AdamW (+ gradient clipping) over the rank's optimizer share, as bytes over HBM, or on the
    host when offloaded."""
    numel = np.where(plans.zero_stage >= 1, held.shard, held.local)
    device_bytes = (ADAM_BYTES_PER_PARAM + (CLIP_BYTES_PER_PARAM if job.optimizer.grad_clip > 0 else 0)) * numel
    return np.where(plans.fsdp_offload, ADAM_BYTES_PER_PARAM * numel / HOST_ADAM_BYTES_PER_S, device_bytes / hbm)


def _bubble(plans: PlanArrays, micro: MicroBatchCompute) -> np.ndarray:
    """The pipeline bubble, (p−1)/v of one micro-batch's work on the first rank [Pipeline]."""
    return np.where(plans.pp > 1, (plans.pp - 1) / plans.virtual_stages * (micro.forward + micro.backward + micro.recompute), 0)


def _offload(plans: PlanArrays, held: HeldNumels, hw: Hardware) -> np.ndarray:
    """Host-device transfers of CPUOffloadPolicy: the sharded fp32 params up for each all-gather,
    per micro-batch (ZeRO-3 twice), once per step where the sync waits for the last micro-batch
    (ZeRO-1, and ZeRO-2 under pp: gathered once), and their gradients down once per step."""
    per_step = np.where(plans.zero_stage == 3, 2 * plans.micro_batches, plans.micro_batches)
    per_step = np.where(plans.deferred_sync & (plans.zero_stage < 3), 1, per_step)
    moves = per_step * 4 * held.shard + 4 * held.shard
    return np.where(plans.fsdp_offload, moves / hw.host_device_bytes_per_s, 0)


def step_time(model: ModelConfig, job: JobConfig, plans: PlanArrays, held: HeldNumels, hw: Hardware,
              calib: Calibration, routing: Routing) -> StepTime:
    """The step time of each plan on its first pipeline rank (`held`)."""
    efficiency = factors(hw, calib)
    hbm = hw.hbm_bytes_per_s * efficiency["memory_efficiency"]
    micro = micro_batch_compute(model, job.seq_len, plans, held, hw, efficiency, routing)
    micro_batches = plans.micro_batches  # per optimizer step
    parts = {"forward": micro_batches * micro.forward, "backward": micro_batches * micro.backward,
             "recompute": micro_batches * micro.recompute, "optimizer": _optimizer(job, plans, held, hbm)}
    layers = np.maximum(held.layers, 1)
    block_forward = micro.matmul_blocks + micro.attention + micro.ring["fwd"] + micro.memory_blocks["fwd"]
    per_block = PassCompute(forward=block_forward / layers, backward=(micro.backward + micro.recompute) / layers,
                            last_backward=micro.backward)
    collective = efficiency["collective_efficiency"]
    dp = data_parallel(plans, held, hw, collective, per_block, efficiency["overlap_slowdown"], hbm)
    parts["dp_comm"], parts["overlap"] = dp["dp_comm"], dp["overlap"]
    tp = tensor_parallel(model, job.seq_len, plans, held, hw, collective, micro.matmul_blocks / layers,
                         efficiency["overlap_slowdown"], gemm_tile_overhead(plans, hw))
    parts["tp_comm"], parts["overlap"] = tp["tp_comm"], parts["overlap"] + tp["tp_overlap"]
    parts["cp_comm"] = micro_batches * ring_exchange(model, job.seq_len, plans, held.layers, micro.attention,
                                                     micro.recompute_share["attention"], hw, collective)
    parts["ep_comm"] = all_to_all_time(model, job.seq_len, plans, routing, held.layers, hw, collective)
    parts["pp_bubble"] = _bubble(plans, micro)
    parts["pp_comm"] = pipeline_transfers(model, job.seq_len, plans, hw, collective)
    parts["offload"] = _offload(plans, held, hw)
    # host dispatch counted in full (a bound: large kernels hide it behind the GPU's work; on a CPU
    # the host does both) [Fixed overheads]
    parts["overhead"] = micro_batches * micro.dispatched_ops * hw.dispatch_s + calib.step_overhead_s
    compute = parts["forward"] + parts["backward"] + parts["recompute"]
    # compute by kind, over forward, backward and recompute (they sum to those three)
    matmul = micro_batches * (micro.matmul_blocks + micro.matmul_head + micro.matmul_backward
                              + micro.recompute_share["matmul"] * micro.matmul_blocks)
    attention = micro_batches * (3.5 + micro.recompute_share["attention"]) * micro.attention
    memory = compute - matmul - attention
    return StepTime(
        parts=parts, total=sum(parts[k] for k in TIME),
        compute={"matmul": matmul, "attention": attention, "memory": memory},
        memory_bound=(memory + np.where(plans.fsdp_offload, 0, parts["optimizer"])
                      + np.where(plans.dp > 1, dp["copy_out"], 0)),
        peak_flops=_peak_flops(plans, hw),
    )
