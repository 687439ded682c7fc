"""A plan frame as one typed bundle of numpy columns: what every part of the cost model reads.

The frame has one column per PlanConfig field (autotune.plans.PLAN_FIELDS); a missing column takes
the plan's default. Built in one place (`PlanArrays.of`), together with what the engine makes of
the fields (grad_accum from the global batch, which loss runs, how 16-bit compute is applied).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from autotune.engine.config import JobConfig


def _column(plans: pd.DataFrame, name: str, default: Any) -> np.ndarray:
    if name in plans:
        return plans[name].to_numpy()
    return np.full(len(plans), default)


@dataclass(frozen=True)
class PlanArrays:
    """One entry per plan of the frame, in its order."""

    rows: int
    zero_stage: np.ndarray
    fsdp_offload: np.ndarray  # ZeRO 1-3 offload (CPUOffloadPolicy): params, grads and AdamW states on the host
    # FSDP2's gradient sync and post-backward reshard off until a step's last micro-batch: ZeRO-1
    # (engine.parallel.gradient_sync), and ZeRO 1-3 under pp (the pipeline stages do it)
    deferred_sync: np.ndarray
    micro_batch: np.ndarray
    micro_batches: np.ndarray  # per optimizer step on each rank: grad_accum, or global_batch / (micro_batch·dp)
    # the ranks that reduce gradients and shard ZeRO's states together: dp, times cp under context
    # parallelism (their micro-batches are parts of the same sequences: engine.parallel.grad_mesh)
    dp: np.ndarray
    cp: np.ndarray  # context parallelism: ranks each sequence is split over (each holding seq_len / cp tokens)
    tp: np.ndarray
    pp: np.ndarray
    ep: np.ndarray  # expert parallelism: dp ranks per group that split each MoE layer's experts
    dp_replicate: np.ndarray  # hybrid sharding: replicas, each of dp / dp_replicate ranks sharding ZeRO 1-3's states
    virtual_stages: np.ndarray
    schedule: np.ndarray
    sequence_parallel: np.ndarray
    async_tp: np.ndarray  # sequence parallel's collectives pipelined behind the matmuls
    precision: np.ndarray
    compute_bytes: np.ndarray  # bytes per element of the compute dtype (float)
    # bytes per element of a gradient in the data-parallel reductions (and a tied embedding's sum
    # under pp): 4, or 2 under plan.reduce_dtype=bf16 (engine.parallel.reduce_dtype)
    reduce_bytes: np.ndarray
    autocast: np.ndarray  # 16-bit compute through autocast (ZeRO 0) rather than 16-bit copies (FSDP2)
    checkpointing: np.ndarray
    every_k: np.ndarray
    kernels: np.ndarray
    cudnn_attention: np.ndarray  # plan.attention=cudnn: cuDNN's fused attention rather than SDPA's FlashAttention-2
    loss_kernels: np.ndarray  # the loss the engine runs: "triton" only where its fused loss can
    world: np.ndarray
    compiled: np.ndarray  # plan.compile: inductor fuses the blocks' memory-bound ops (estimate.fusion, the float8 casts)
    compiled_loss: np.ndarray  # plan.compile_loss where the engine compiles torch's loss (engine.parallel.apply_compile)
    fp8: np.ndarray  # the float8 recipe of the blocks' linears: none | tensorwise | rowwise
    fp8_gather: np.ndarray  # FSDP2 gathers the float8 linears' weights in float8 (tensorwise, ZeRO 1-3)
    gather_bytes: np.ndarray  # bytes per element of a gathered block unit (the compute dtype, or float8's 1)
    ddp_buckets: np.ndarray  # ZeRO-0's gradients in DDP's buckets (engine.parallel.apply_ddp; FSDP2's replicate under tp, pp, ep)

    @classmethod
    def of(cls, plans: pd.DataFrame, job: JobConfig) -> "PlanArrays":
        zero = _column(plans, "zero_stage", 0).astype(np.int64)
        offload_optimizer = _column(plans, "offload_optimizer", False).astype(bool)
        micro_batch = _column(plans, "micro_batch", 1).astype(np.int64)
        data_dp = _column(plans, "dp", 1).astype(np.int64)
        cp = _column(plans, "cp", 1).astype(np.int64)
        dp = data_dp * cp
        tp = _column(plans, "tp", 1).astype(np.int64)
        pp = _column(plans, "pp", 1).astype(np.int64)
        ep = _column(plans, "ep", 1).astype(np.int64)
        grad_accum = pd.to_numeric(pd.Series(_column(plans, "grad_accum", None)), errors="coerce").to_numpy()
        precision = _column(plans, "precision", "fp32").astype(str)
        kernels = _column(plans, "kernels", "torch").astype(str)
        fp8 = _column(plans, "fp8", "none").astype(str)
        compute_bytes = np.select([precision == "fp32"], [4], 2).astype(float)
        fp8_gather = (fp8 == "tensorwise") & (zero >= 1)  # autotune.engine.float8.fp8_all_gather
        return cls(
            rows=len(plans),
            zero_stage=zero,
            fsdp_offload=(offload_optimizer | _column(plans, "offload_params", False).astype(bool)) & (zero >= 1),
            deferred_sync=(zero == 1) | ((zero >= 2) & (pp > 1)),
            micro_batch=micro_batch,
            micro_batches=np.where(np.isnan(grad_accum), job.global_batch // np.maximum(micro_batch * data_dp, 1),
                                   grad_accum).astype(np.int64),
            dp=dp, cp=cp, tp=tp, pp=pp, ep=ep, dp_replicate=_column(plans, "dp_replicate", 1).astype(np.int64),
            virtual_stages=_column(plans, "pp_virtual_stages", 1).astype(np.int64),
            schedule=_column(plans, "pp_schedule", "1f1b").astype(str),
            sequence_parallel=_column(plans, "sequence_parallel", False).astype(bool),
            async_tp=_column(plans, "async_tp", False).astype(bool),
            precision=precision,
            compute_bytes=compute_bytes,
            reduce_bytes=np.where(_column(plans, "reduce_dtype", "fp32").astype(str) == "bf16", 2.0, 4.0),
            autocast=(precision != "fp32") & (zero == 0),  # engine.parallel.autocast; FSDP2 MixedPrecisionPolicy for 1-3
            checkpointing=_column(plans, "activation_checkpointing", "none").astype(str),
            every_k=_column(plans, "checkpoint_every_k", 2).astype(np.int64),
            kernels=kernels,
            cudnn_attention=_column(plans, "attention", "sdpa").astype(str) == "cudnn",
            # The fused linear cross-entropy needs the whole head on one rank: under tp (vocabulary-sharded
            # head, loss_parallel) and pp (the schedule's loss_fn on the last stage's logits) the engine
            # computes torch's loss whatever plan.kernels says (autotune/engine/model.py, autotune/engine/pipeline.py).
            loss_kernels=np.where((kernels == "triton") & (tp == 1) & (pp == 1), "triton", "torch"),
            world=dp * tp * pp,
            compiled=_column(plans, "compile", False).astype(bool),
            compiled_loss=(_column(plans, "compile", False).astype(bool) & _column(plans, "compile_loss", True).astype(bool)
                           & (kernels == "torch") & (tp == 1) & (pp == 1)),
            fp8=fp8, fp8_gather=fp8_gather, gather_bytes=np.where(fp8_gather, 1.0, compute_bytes),
            ddp_buckets=(zero == 0) & (dp > 1) & (tp == 1) & (pp == 1) & (ep == 1),
        )

    @property
    def dp_shard(self) -> np.ndarray:
        """The ranks FSDP2 shards over: all dp ranks, or under hybrid sharding one replica's."""
        return self.dp // self.dp_replicate

    @property
    def fp8_any(self) -> bool:
        return bool(np.any(self.fp8 != "none"))

    def checkpointed(self, layers: np.ndarray) -> np.ndarray:
        """Checkpointed blocks among a rank's `layers` (engine.parallel.checkpointed_blocks: full, op,
        attention: all, in whole or in part; selective: every k-th from block 0), spread evenly over
        the stages."""
        return np.where(np.isin(self.checkpointing, ("full", "op", "attention")), layers,
                        np.where(self.checkpointing == "selective", np.ceil(layers / self.every_k), 0))
