"""What the engine runs of a plan on the target hardware, and the nearest plan that fits."""
from __future__ import annotations

import dataclasses
import itertools

from autotune.engine.config import ConfigError, PlanConfig, TrainConfig, validate_plan
from autotune.estimate.calibration import Calibration
from autotune.estimate.columns import GiB
from autotune.estimate.frame import estimate_frame
from autotune.estimate.result import plan_frame
from autotune.hardware import Hardware


def check_engine_supports(plan: PlanConfig, hw: Hardware) -> None:
    """autotune.engine.parallel.check_supported for the target hardware: a catalog GPU has CUDA even when
    this machine has none, so the engine's "needs CUDA" checks (Triton, cuDNN) hold for it."""
    from autotune.engine.parallel import check_supported

    check_supported(plan, cuda=hw.device == "cuda")


def fit_suggestion(train: TrainConfig, hw: Hardware, calib: Calibration | None = None) -> str:
    """The fastest nearby plan that fits (and that the engine runs), as the overrides that reach it
    ("" if none does)."""
    plan, batch_per_rank = train.plan, train.job.global_batch // train.plan.dp
    options = {
        "activation_checkpointing": sorted({plan.activation_checkpointing, "full"}),
        "zero_stage": list(range(plan.zero_stage, 4)),
        # every micro-batch that divides the rank's share: smaller saves activations
        "micro_batch": [mb for mb in range(1, batch_per_rank + 1) if batch_per_rank % mb == 0][:12],
        "precision": sorted({plan.precision, "bf16"}),
        "offload_optimizer": sorted({plan.offload_optimizer, True}),
    }
    variants = []
    for values in itertools.product(*options.values()):
        variant = dataclasses.replace(plan, **dict(zip(options, values)), grad_accum=None)
        if variant.offload_optimizer and variant.zero_stage == 0:
            continue
        try:
            validate_plan(variant, train.model, train.job)
            check_engine_supports(variant, hw)
        except ConfigError:
            continue
        variants.append(variant)
    if not variants:
        return ""
    frame = estimate_frame(train.model, train.job, plan_frame(variants), hw, calib)
    ok = frame[frame["fits"]]
    if ok.empty:
        return ""
    best = ok.sort_values("tokens_per_s", ascending=False).iloc[0]
    edits = [f"plan.{k}={best[k]}".replace("True", "true").replace("False", "false")
             for k in options if best[k] != getattr(plan, k)]
    return f"{' '.join(edits)} ({best['mem_total_bytes'] / GiB:.2f} GiB, {best['tokens_per_s']:,.0f} tokens/s)"
