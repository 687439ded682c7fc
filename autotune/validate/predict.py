"""Every run of a runs file held against the cost model: one table row per run the engine can
express (predicted and measured tokens/s per GPU, step time and memory, their errors, whether it
fits), and the runs it cannot express with the reason.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from autotune.engine.config import ConfigError, with_changes
from autotune.estimate import Calibration, estimate_frame, plan_frame
from autotune.estimate.columns import GiB
from autotune.hardware import Hardware
from autotune.validate.mapping import Mapped, NotExpressible, map_run
from autotune.validate.runs import Run, RunError
from autotune.validate.unfit import why_unfit

MAX_CANDIDATES = 2000  # plans tried for a run's unstated choices


@dataclass
class Validation:
    """The outcome over a runs file."""

    table: pd.DataFrame  # one row per run predicted (columns: see `_row`)
    not_expressible: list[tuple[Run, str]]  # runs the engine cannot express, and why
    malformed: list[RunError]  # rows that are not in the schema (line and field)
    frames: dict[int, pd.Series]  # the estimate_frame row of each predicted run, by line
    hardware: dict[int, Hardware] = field(default_factory=dict)  # the catalog hardware of each, by line


def _candidates(mapped: Mapped) -> list:
    """The engine's valid configs over the run's unstated choices, each list ordered from the
    source framework's default: the stated plan first, then the combinations that depart least
    from the defaults (the sum of the choices' places in their lists), at most MAX_CANDIDATES."""
    names = list(mapped.free)
    combos = itertools.product(*(range(len(mapped.free[n])) for n in names))
    ordered = sorted(itertools.islice(combos, MAX_CANDIDATES), key=sum)
    configs = [mapped.train]
    for places in ordered:
        changes = {k: v for name, i in zip(names, places) for k, v in mapped.free[name][i].items()}
        try:
            configs.append(with_changes(mapped.train, plan=changes))
        except ConfigError:
            continue
    return configs


def predict(mapped: Mapped, calib: Calibration | None = None) -> tuple[Mapped, pd.Series]:
    """The estimate of one mapped run: its stated plan, or, with unstated choices, the plan closest
    to the framework's defaults that fits (a run that ran fit; the one that needs least memory when
    none does), the choice named."""
    configs = _candidates(mapped)
    train = mapped.train
    frame = estimate_frame(train.model, train.job, plan_frame([c.plan for c in configs]), mapped.hw, calib)
    if not mapped.free:
        return mapped, frame.iloc[0]
    fits = frame["fits"].to_numpy(bool)
    best = int(np.argmax(fits)) if fits.any() else int(frame["mem_total_bytes"].to_numpy().argmin())
    chosen = configs[best].plan
    picked = []
    for name, changes in mapped.free.items():
        values = ", ".join(f"{k}={getattr(chosen, k)}" for k in changes[0])
        picked.append(f"{name} unstated: {values}")
    why = "the plan nearest the defaults that fits" if fits.any() else "none fits: the one that needs least memory"
    assumed = mapped.assumptions + [f"{'; '.join(picked)} ({why})"]
    return replace(mapped, train=configs[best], assumptions=assumed), frame.iloc[best]


def _error(predicted: float, measured: float | None) -> float:
    return predicted / measured - 1 if measured else np.nan


def _row(mapped: Mapped, est: pd.Series) -> dict:
    """The table row of one predicted run."""
    run, plan = mapped.run, mapped.train.plan
    tokens = est["tokens_per_s"] / run.gpus
    reserved = est["reserved_bytes"]
    return {
        "line": run.line, "source": run.source, "table": run.table, "model": run.model, "gpu": mapped.hw.gpu,
        "gpus": run.gpus, "seq_len": run.seq_len,
        "plan": (f"zero {plan.zero_stage}, dp {plan.dp}"
                 + (f" ({plan.dp_replicate} replicas x {plan.dp // plan.dp_replicate})" if plan.dp_replicate > 1 else "")
                 + (f" cp {plan.cp}" if plan.cp > 1 else "") + f" tp {plan.tp} pp {plan.pp}, micro_batch {plan.micro_batch} "
                 f"x {plan.grad_accum}, {plan.activation_checkpointing}"
                 + (", sp" if plan.sequence_parallel else "") + (", async tp" if plan.async_tp else "")
                 + (", compile" if plan.compile else "")
                 + (f", fp8 {plan.fp8}" if plan.fp8 != "none" else "")),
        "measured_tokens_per_s_per_gpu": mapped.tokens_per_s_per_gpu, "measured_as": mapped.tokens_source,
        "predicted_tokens_per_s_per_gpu": tokens,
        "tokens_error": _error(tokens, mapped.tokens_per_s_per_gpu),
        "measured_step_time_s": run.step_time_s, "predicted_step_time_s": est["step_time_s"],
        "step_time_error": _error(est["step_time_s"], run.step_time_s),
        "measured_peak_gib": run.peak_mem_gib, "predicted_peak_gib": reserved / GiB,
        "memory_error": _error(reserved / GiB, run.peak_mem_gib),
        "fits": bool(est["fits"]), "fit_reason": why_unfit(mapped.train, est, mapped.hw.memory_bytes),
        "assumptions": "; ".join(mapped.assumptions),
    }


def validate_runs(runs: list[Run], malformed: list[RunError] | None = None,
                  calib: Calibration | None = None) -> Validation:
    """Predict every run the engine can express; list the others with their reason."""
    rows, refused, frames, hardware = [], [], {}, {}
    for run in runs:
        try:
            mapped, est = predict(map_run(run), calib)
        except NotExpressible as e:
            refused.append((run, str(e)))
            continue
        rows.append(_row(mapped, est))
        frames[run.line], hardware[run.line] = est, mapped.hw
    return Validation(table=pd.DataFrame(rows), not_expressible=refused, malformed=list(malformed or []), frames=frames,
                      hardware=hardware)
