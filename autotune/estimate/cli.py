"""`autotune estimate`: the predicted memory and step time of one plan, as a table or JSON."""
from __future__ import annotations

import argparse
import json

from autotune.engine.config import ConfigError, TrainConfig, validate_plan
from autotune.engine.model import count_active_params
from autotune.estimate.calibration import Calibration
from autotune.estimate.columns import GiB
from autotune.estimate.frame import estimate_frame
from autotune.estimate.result import Estimate, plan_frame
from autotune.estimate.suggest import check_engine_supports, fit_suggestion
from autotune.hardware import Hardware, load_hardware


def resolve_world(cfg, overrides: list[str]) -> str:
    """dp x cp x tp x pp must equal the cluster's GPUs: when the user set none of dp, cp, tp, pp,
    dp fills the cluster; otherwise a mismatch is an error that says what to set."""
    plan, n_gpus = cfg.train.plan, cfg.cluster.n_gpus
    if plan.world_size == n_gpus:
        return ""
    set_keys = {o.split("=", 1)[0].lstrip("+") for o in overrides}
    others = plan.cp * plan.tp * plan.pp
    if "plan.dp" not in set_keys and n_gpus % others == 0:
        plan.dp = n_gpus // others
        plan.grad_accum = None
        validate_plan(plan, cfg.train.model, cfg.train.job)
        return f"plan.dp={plan.dp}: fills the cluster's {n_gpus} GPUs (cp={plan.cp} x tp={plan.tp} x pp={plan.pp})"
    hint = f"plan.dp={n_gpus // others}" if n_gpus % others == 0 else "a cp x tp x pp that divides it"
    raise ConfigError(
        f"plan.dp={plan.dp} x plan.cp={plan.cp} x plan.tp={plan.tp} x plan.pp={plan.pp} = {plan.world_size} but cluster "
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


def _print_table(est: Estimate, row, train: TrainConfig, hw: Hardware, note: str, calib_path: str | None) -> None:
    plan, model = train.plan, train.model
    active = f" ({count_active_params(model):,} active per token)" if model.n_experts else ""
    print(f"{model.name}: {est.params:,} params{active} on {hw.n_gpus} x {hw.gpu} "
          f"({'measured' if hw.measured else 'catalog'}), {hw.memory_bytes / GiB:.2f} GiB each")
    print(f"plan: zero {plan.zero_stage}, {plan.precision}, micro_batch {plan.micro_batch} x grad_accum {plan.grad_accum}, "
          f"dp {plan.dp} tp {plan.tp} pp {plan.pp}" + (f" ep {plan.ep}" if model.n_experts else "")
          + (f" cp {plan.cp} ({train.job.seq_len // plan.cp} tokens of each sequence a rank)" if plan.cp > 1 else "")
          + (f" (hybrid sharding: {plan.dp_replicate} replicas of {plan.dp // plan.dp_replicate})"
             if plan.dp_replicate > 1 else "")
          + f", checkpointing {plan.activation_checkpointing}, kernels {plan.kernels}"
          + (", offload" if (plan.offload_optimizer or plan.offload_params) else ""))
    if model.n_experts:
        print(f"experts: {model.n_experts // plan.ep} of {model.n_experts} per rank in each of {len(model.moe_layers)} "
              f"MoE layers, {model.experts_per_token} per token; router imbalance {row['expert_imbalance']:.2f} "
              f"(most tokens per expert over the mean), the busiest rank computes {row['expert_load']:.2f}x its share")
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
    if cfg.cluster.gpu == "auto":  # this machine: the engine's own speed in the plan's precision
        from autotune.device_prior import with_engine_prior

        hw = with_engine_prior(hw, cfg.model, cfg.job.seq_len, [str(cfg.plan.precision)])
    note = resolve_world(cfg, overrides)
    check_engine_supports(cfg.train.plan, hw)
    calib = load_calibration(cfg)
    row = estimate_frame(cfg.train.model, cfg.train.job, plan_frame([cfg.train.plan]), hw, calib).iloc[0]
    est = Estimate.from_row(row, cfg.train, hw, calib)
    if not est.fits:
        est.to_fit = fit_suggestion(cfg.train, hw, calib)
    if args.json:
        print(json.dumps(est.to_dict() | {"note": note, "active_params": count_active_params(cfg.train.model)}))
    else:
        _print_table(est, row, cfg.train, hw, note, getattr(getattr(cfg, "estimate", None), "calibration", None))
    return 0
