"""Every run of a runs file held against the cost model: one table row per run the engine can
express (predicted and measured tokens/s per GPU, step time and memory, their errors, whether it
fits), and the runs it cannot express with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from autotune.engine.config import with_changes
from autotune.estimate import Calibration, estimate_frame, plan_frame
from autotune.estimate.columns import GiB
from autotune.validate.mapping import Mapped, NotExpressible, map_run
from autotune.validate.runs import Run, RunError

# What an unstated activation checkpointing is taken as: the least of these the engine fits in
# (the run ran, so it fit); the row says which.
CHECKPOINTING_LADDER = (("none", 2), ("selective", 2), ("full", 2))


@dataclass
class Validation:
    """The outcome over a runs file."""

    table: pd.DataFrame  # one row per run predicted (columns: see `_row`)
    not_expressible: list[tuple[Run, str]]  # runs the engine cannot express, and why
    malformed: list[RunError]  # rows that are not in the schema (line and field)
    frames: dict[int, pd.Series]  # the estimate_frame row of each predicted run, by line


def _estimate(mapped: Mapped, calib: Calibration | None) -> pd.Series:
    train = mapped.train
    return estimate_frame(train.model, train.job, plan_frame([train.plan]), mapped.hw, calib).iloc[0]


def _least_checkpointing(mapped: Mapped, calib: Calibration | None) -> tuple[Mapped, pd.Series]:
    """For a run whose checkpointing the source did not state: the least of CHECKPOINTING_LADDER
    that fits (else the last), with the assumption named."""
    for mode, every_k in CHECKPOINTING_LADDER:
        train = with_changes(mapped.train, plan={"activation_checkpointing": mode, "checkpoint_every_k": every_k})
        candidate = replace(mapped, train=train)
        row = _estimate(candidate, calib)
        if row["fits"]:
            break
    assumed = [a for a in mapped.assumptions if not a.startswith("activation checkpointing unstated")]
    assumed.append(f"activation checkpointing unstated: {mode}, the least that fits")
    return replace(candidate, assumptions=assumed), row


def predict(mapped: Mapped, calib: Calibration | None = None) -> tuple[Mapped, pd.Series]:
    """The estimate of one mapped run (its checkpointing chosen when unstated)."""
    if any(a.startswith("activation checkpointing unstated") for a in mapped.assumptions):
        return _least_checkpointing(mapped, calib)
    return mapped, _estimate(mapped, calib)


def _error(predicted: float, measured: float | None) -> float:
    return predicted / measured - 1 if measured else np.nan


def _row(mapped: Mapped, est: pd.Series) -> dict:
    """The table row of one predicted run."""
    run, plan = mapped.run, mapped.train.plan
    tokens = est["tokens_per_s"] / run.gpus
    reserved = est["reserved_bytes"] if "reserved_bytes" in est else est["mem_total_bytes"] - est["mem_context_bytes"]
    return {
        "line": run.line, "source": run.source, "table": run.table, "model": run.model, "gpu": mapped.hw.gpu,
        "gpus": run.gpus, "seq_len": run.seq_len,
        "plan": (f"zero {plan.zero_stage}, dp {plan.dp} tp {plan.tp} pp {plan.pp}, micro_batch {plan.micro_batch} "
                 f"x {plan.grad_accum}, {plan.activation_checkpointing}"
                 + (", sp" if plan.sequence_parallel else "") + (", compile" if plan.compile else "")),
        "measured_tokens_per_s_per_gpu": mapped.tokens_per_s_per_gpu, "measured_as": mapped.tokens_source,
        "predicted_tokens_per_s_per_gpu": tokens,
        "tokens_error": _error(tokens, mapped.tokens_per_s_per_gpu),
        "measured_step_time_s": run.step_time_s, "predicted_step_time_s": est["step_time_s"],
        "step_time_error": _error(est["step_time_s"], run.step_time_s),
        "measured_peak_gib": run.peak_mem_gib, "predicted_peak_gib": reserved / GiB,
        "memory_error": _error(reserved / GiB, run.peak_mem_gib),
        "fits": bool(est["fits"]), "fit_reason": str(est["reason"]),
        "assumptions": "; ".join(mapped.assumptions),
    }


def validate_runs(runs: list[Run], malformed: list[RunError] | None = None,
                  calib: Calibration | None = None) -> Validation:
    """Predict every run the engine can express; list the others with their reason."""
    rows, refused, frames = [], [], {}
    for run in runs:
        try:
            mapped, est = predict(map_run(run), calib)
        except NotExpressible as e:
            refused.append((run, str(e)))
            continue
        rows.append(_row(mapped, est))
        frames[run.line] = est
    return Validation(table=pd.DataFrame(rows), not_expressible=refused, malformed=list(malformed or []), frames=frames)
