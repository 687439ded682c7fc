"""`estimate_frame`: the cost model over a DataFrame of plans, vectorised with numpy over its columns."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from autotune.engine.config import JobConfig, ModelConfig
from autotune.estimate.activations import saved_bytes
from autotune.estimate.arrays import PlanArrays
from autotune.estimate.calibration import Calibration
from autotune.estimate.columns import COMPUTE, MEMORY, TIME
from autotune.estimate.layout import stage_layouts
from autotune.estimate.memory import peak_memory
from autotune.estimate.routing import expert_routing
from autotune.estimate.step_time import step_time
from autotune.hardware import Hardware, check_fp8
from autotune.profile import flops_per_token


def estimate_frame(model: ModelConfig, job: JobConfig, plans: pd.DataFrame, hw: Hardware,
                   calib: Calibration | None = None) -> pd.DataFrame:
    """The plans with their estimate: mem_<component>_bytes, mem_total_bytes, time_<component>_s,
    step_time_s, compute_<kind>_s, tokens_per_s, mfu, fits, reason; host_bytes, peak_stage (first |
    last pipeline stage), peak_phase, step_grads_bytes, allocated_bytes (the total less the CUDA
    context: what max_memory_allocated shows), reserved_bytes (that plus the caching allocator's
    rounding: what max_memory_reserved shows), the parts fit_calibration scales (matmul_s,
    memory_bound_s), and for a MoE model its routing (expert_imbalance: the most slots an expert gets
    over the mean; expert_load: the slots the busiest expert-parallel rank computes over its own)."""
    calib = calib or Calibration()
    cp = plans["cp"].to_numpy() if "cp" in plans else np.ones(len(plans), dtype=np.int64)
    if len(np.unique(cp)) > 1:  # one estimate per rank's sequence length, back in the frame's order
        parts = [estimate_frame(model, job, plans.iloc[np.flatnonzero(cp == c)], hw, calib) for c in np.unique(cp)]
        order = np.argsort(np.concatenate([np.flatnonzero(cp == c) for c in np.unique(cp)]), kind="stable")
        return pd.concat(parts).iloc[order]
    arrays = PlanArrays.of(plans, job)
    check_fp8(hw, np.unique(arrays.fp8))
    # Under context parallelism a rank runs every per-token part (matmuls, memory-bound ops, saved
    # activations, tp and pp traffic) on its seq_len / cp tokens; its attention and the k/v ring see
    # the whole sequence (step_time, [Context parallelism] in docs/formulas.md).
    local = dataclasses.replace(job, seq_len=job.seq_len // int(cp[0])) if len(cp) else job
    layouts = stage_layouts(model, arrays)
    routing = expert_routing(model, arrays, local.seq_len, calib)
    saved = saved_bytes(model, arrays, local.seq_len, routing, hw.device)
    memory = peak_memory(model, local.seq_len, arrays, layouts, saved, hw, calib)
    time = step_time(model, local, arrays, layouts["first"], hw, calib, routing)
    tokens_per_s = job.global_batch * job.seq_len / time.total

    out = plans.copy()
    for k in MEMORY:
        out[f"mem_{k}_bytes"] = memory.parts[k]
    out["mem_total_bytes"] = memory.total
    for k in TIME:
        out[f"time_{k}_s"] = time.parts[k]
    out["step_time_s"] = time.total
    for k in COMPUTE:
        out[f"compute_{k}_s"] = time.compute[k]
    out["matmul_s"] = out["compute_matmul_s"]  # the part that scales with the matmul efficiency (fit_calibration)
    out["memory_bound_s"] = time.memory_bound  # everything timed over HBM (fit_calibration)
    out["tokens_per_s"] = tokens_per_s
    out["mfu"] = tokens_per_s * flops_per_token(model, job.seq_len)["total"] / (arrays.world * time.peak_flops)
    out["fits"] = memory.fits
    out["host_bytes"] = memory.host_bytes  # host memory per node that offload needs
    out["peak_stage"] = memory.stage
    out["peak_phase"] = memory.phase  # backward (start of a backward) | optimizer (the step)
    out["step_grads_bytes"] = memory.step_grads  # gradients held at the optimizer step (model states)
    out["allocated_bytes"] = memory.allocated
    out["reserved_bytes"] = memory.reserved  # allocated plus the caching allocator's rounding [Peak memory]
    out["reason"] = memory.reason
    if model.moe_layers:
        out["expert_imbalance"] = routing.imbalance
        out["expert_load"] = routing.arrived
    return out
