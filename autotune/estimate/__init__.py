"""The cost model: per-rank peak memory and step time of a plan, closed form and vectorised.

`estimate_frame(model, job, plans, hw)` costs a DataFrame of plans (one column per PlanConfig
field) with numpy over the columns: 100,000 plans in well under two seconds. `estimate(train, hw)`
is the one-row case. Every term names its source (sections of docs/formulas.md in brackets); the
engine's behaviour (autotune/engine/parallel.py, autotune/engine/pipeline.py,
autotune/engine/tensor_parallel.py) decides what each plan means:

- parameters are fp32 on every path and are the optimizer's master weights (no separate master
  copy: `master_bytes` is 0); 16-bit compute uses copies: autocast's cast weights (ZeRO 0) or
  FSDP2's all-gathered 16-bit units (ZeRO 1-3), counted in `param_copies_bytes`;
- ZeRO 0 = DDP with gradient_as_bucket_view (no bucket copy), or under tp/pp FSDP2's replicate
  (the same whole gradients, all-reduced once per step); ZeRO 1-3 = FSDP2 per block + root (root
  never resharded), reduce in fp32, params, grads and AdamW states sharded; ZeRO 1 keeps the units
  gathered and the gradients unsharded in fp32 until the last micro-batch, which reduce-scatters
  them (the sync deferred: Megatron's distributed optimizer; every ZeRO stage under pp), ZeRO 2
  reduce-scatters every micro-batch, ZeRO 3 also frees the units after forward; offload =
  CPUOffloadPolicy: sharded params, grads and AdamW states on the host, the step on the CPU;
- activations are the bytes measured on the engine's model (autotune.profile), per block and
  outside the blocks, for the plan's precision x cast x checkpointing x kernels, as a tp rank
  holds them (sequence parallel keeps the all-gathered linear inputs whole); the logits are
  those of the loss the engine runs (torch's under tp or pp even with kernels=triton);
- the peak is the larger of two moments: the start of a backward (states, gradients of earlier
  micro-batches or DDP's buckets, activations, logits and their gradient, gathered units) and the
  optimizer step (states with every gradient). The memory breakdown is that of the peaking moment
  (`peak_phase`); `model_states` / `step_grads_bytes` give the states at the step;
- step time is the sum of what runs on the compute stream of the first pipeline rank: dense
  matmuls (6N) at the matmul efficiency, SDPA at the FLOPs its causal flash kernels execute and
  the attention efficiency, memory-bound ops as the bytes measured on the engine's model
  (autotune.profile.measure_traffic) over HBM at the memory efficiency, AdamW + clipping as bytes,
  host dispatch per op; collectives cost latency + bytes / bus bandwidth, overlap where the engine
  overlaps them, and slow the compute they overlap (overlap_slowdown, FSDP2's copy-out). The
  factors (`factors()`) come from the hardware profile and a calibration may replace each;
- a mixture-of-experts model's routed experts are held E/ep per rank (plan.ep) and data-parallel
  over the dp/ep ranks holding the same experts; their matmuls, activations and traffic are the
  slots that reach the busiest expert-parallel rank (the router's load imbalance), and the
  all-to-alls that bring them are exposed ([Mixture of experts]).

The parts, each a module of this package:

- arrays: a plan frame's columns as one typed bundle (PlanArrays), what every other part reads;
- layout: what one rank holds (rank_layout), per pipeline stage and plan;
- routing: a MoE plan's routed slots: the imbalance, the busiest rank's load, the all-to-alls;
- activations, traffic: the measured bytes saved for backward and moved by memory-bound ops, per plan;
- memory: per-stage memory at the two moments, the peak, and whether the plan fits;
- step_time: compute, communication, overlap, pipeline, offload and overhead;
- calibration: the factors, their defaults and their fit to probe runs (Calibration, factors,
  fit_calibration, fit_memory_slack);
- frame: estimate_frame, which puts them together; columns: the names of its parts;
- result: Estimate, one plan's estimate, and its forms (a frame row, JSON, flat table columns);
- suggest: what the engine runs of a plan on the target hardware, and the nearest plan that fits;
- cli: `autotune estimate`.

The names below are loaded when first used, so that a module of this package that needs no torch
(columns, which the reports read) is imported without it.
"""
import importlib

_HOME = {
    "CALIBRATION_RANGES": "calibration",
    "FRAGMENTATION": "calibration",
    "HARDWARE_FACTORS": "calibration",
    "Calibration": "calibration",
    "factors": "calibration",
    "fit_calibration": "calibration",
    "fit_memory_slack": "calibration",
    "measured_imbalance": "calibration",
    "load_calibration": "cli",
    "resolve_world": "cli",
    "COMPUTE": "columns",
    "MEMORY": "columns",
    "TIME": "columns",
    "GiB": "columns",
    "flat_estimate": "columns",
    "estimate_frame": "frame",
    "rank_layout": "layout",
    "Estimate": "result",
    "estimate": "result",
    "plan_frame": "result",
    "check_engine_supports": "suggest",
    "fit_suggestion": "suggest",
}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'autotune.estimate' has no attribute {name!r}")
    return getattr(importlib.import_module(f"autotune.estimate.{_HOME[name]}"), name)
