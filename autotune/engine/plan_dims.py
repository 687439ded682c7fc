"""Checks of the plan's parallel dimensions and kernels: tensor and sequence parallelism, pipeline
stages, hybrid sharding, float8, context parallelism, async tp and the attention kernel (each
violation one ConfigError that says what to change; autotune.engine.config.validate_plan calls them)."""
from __future__ import annotations

import math

from autotune.engine.config import ConfigError, JobConfig, ModelConfig, PlanConfig


def validate_tp(p: PlanConfig, model: ModelConfig) -> None:
    """Tensor parallelism splits the heads (q and kv alike) and the MLP's width evenly."""
    if p.tp == 1:
        return
    if model.n_heads % p.tp or model.kv_heads % p.tp:
        raise ConfigError(
            f"plan.tp={p.tp} must divide model.n_heads={model.n_heads} and "
            f"model.n_kv_heads={model.kv_heads}; try a tp that divides {math.gcd(model.n_heads, model.kv_heads)}"
        )
    if model.d_ff % p.tp:
        raise ConfigError(f"plan.tp={p.tp} must divide model.d_ff={model.d_ff}")


def validate_sequence_parallel(p: PlanConfig, job: JobConfig) -> None:
    """Sequence parallelism shards the tp group's tokens: it needs tp and a sequence tp divides."""
    if p.sequence_parallel and p.tp == 1:
        raise ConfigError("plan.sequence_parallel needs plan.tp > 1")
    if p.sequence_parallel and job.seq_len % p.tp:
        raise ConfigError(f"plan.sequence_parallel needs job.seq_len={job.seq_len} divisible by plan.tp={p.tp}")


def validate_pipeline(p: PlanConfig, model: ModelConfig) -> None:
    """pp x pp_virtual_stages stages of whole blocks; virtual stages only under the interleaved schedule."""
    stages = p.pp * p.pp_virtual_stages
    if stages > model.n_layers:
        raise ConfigError(
            f"plan.pp={p.pp} x plan.pp_virtual_stages={p.pp_virtual_stages} = {stages} stages "
            f"exceeds model.n_layers={model.n_layers}"
        )
    if p.pp_schedule == "interleaved_1f1b" and p.pp > 1 and p.pp_virtual_stages < 2:
        raise ConfigError("plan.pp_schedule=interleaved_1f1b needs plan.pp_virtual_stages >= 2")
    if p.pp_schedule != "interleaved_1f1b" and p.pp_virtual_stages != 1:
        raise ConfigError(f"plan.pp_virtual_stages={p.pp_virtual_stages} needs plan.pp_schedule=interleaved_1f1b")


def validate_attention(p: PlanConfig) -> None:
    """cuDNN's fused attention runs 16-bit inputs only."""
    if p.attention == "cudnn" and p.precision == "fp32":
        raise ConfigError("plan.attention=cudnn runs 16-bit attention only: set plan.precision=bf16 (or fp16) "
                          "or plan.attention=sdpa")


def validate_dp_replicate(p: PlanConfig) -> None:
    """Hybrid sharding: dp_replicate groups of dp / dp_replicate ranks, each sharding ZeRO 1-3's states."""
    if p.dp_replicate < 1:
        raise ConfigError(f"plan.dp_replicate={p.dp_replicate} must be at least 1 (1: no hybrid sharding)")
    if p.dp_replicate == 1:
        return
    if p.dp % p.dp_replicate:
        divisors = [d for d in range(1, p.dp + 1) if p.dp % d == 0]
        raise ConfigError(f"plan.dp_replicate={p.dp_replicate} must divide plan.dp={p.dp}; try one of {divisors}")
    if p.zero_stage == 0:
        raise ConfigError(
            f"plan.dp_replicate={p.dp_replicate} shards ZeRO 1-3 states within groups, but plan.zero_stage=0 "
            "shards nothing; use plan.zero_stage=1, 2 or 3, or plan.dp_replicate=1"
        )
    if p.ep > 1:
        raise ConfigError(
            f"plan.dp_replicate={p.dp_replicate} with plan.ep={p.ep}: the engine does not combine hybrid "
            "sharding with expert parallelism; use plan.dp_replicate=1 or plan.ep=1"
        )


def validate_fp8(p: PlanConfig) -> None:
    """Float8 linears compute beside bf16 everything else (whole or tensor-parallel weights)."""
    if p.fp8 == "none":
        return
    if p.precision != "bf16":
        raise ConfigError(f"plan.fp8={p.fp8} runs the rest of the model in bf16: set plan.precision=bf16 "
                          f"(not {p.precision}) or plan.fp8=none")


def validate_cp(p: PlanConfig, job: JobConfig) -> None:
    """Context parallelism: 2 cp equal chunks of every sequence, two to a rank, beside dp and tp."""
    if p.cp < 1:
        raise ConfigError(f"plan.cp={p.cp} must be at least 1 (1: no context parallelism)")
    if p.cp == 1:
        return
    if job.seq_len % (2 * p.cp):
        fits = [c for c in range(1, job.seq_len // 2 + 1) if job.seq_len % (2 * c) == 0][:8]
        raise ConfigError(f"plan.cp={p.cp} cuts job.seq_len={job.seq_len} into 2 x cp = {2 * p.cp} equal chunks "
                          f"(load-balanced causal attention); use a seq_len divisible by {2 * p.cp} or cp in {fits}")
    for key, other in (("ep", "expert parallelism"), ("dp_replicate", "hybrid sharding")):
        if getattr(p, key) > 1:
            raise ConfigError(f"plan.cp={p.cp} with plan.{key}={getattr(p, key)}: the engine does not combine context "
                              f"parallelism with {other}; use plan.{key}=1 or plan.cp=1")
    if p.sequence_parallel and (job.seq_len // p.cp) % p.tp:
        raise ConfigError(f"plan.sequence_parallel with plan.cp={p.cp} needs a rank's job.seq_len / cp = "
                          f"{job.seq_len // p.cp} tokens divisible by plan.tp={p.tp}")


def validate_async_tp(p: PlanConfig) -> None:
    """Async tp pipelines sequence parallel's all-gathers and reduce-scatters with the blocks' matmuls."""
    if not p.async_tp:
        return
    if p.tp == 1 or not p.sequence_parallel:
        raise ConfigError(f"plan.async_tp overlaps the collectives of tensor parallelism with sequence parallel, but "
                          f"plan.tp={p.tp}, plan.sequence_parallel={p.sequence_parallel}; set plan.tp > 1 and "
                          "plan.sequence_parallel=true, or plan.async_tp=false")
    if p.fp8 != "none":
        raise ConfigError(f"plan.async_tp with plan.fp8={p.fp8}: the engine's pipelined projections multiply in "
                          "bf16; use plan.fp8=none or plan.async_tp=false")
