"""Running one trial: what of the plan runs here, its probe, the measurement carried to the whole
plan, and the trial's record.

The probe is a hook: `TrialRunner(..., probe=fn)` with `fn` called as autotune.runner.run_probe is
(see autotune/search/__init__.py for the contract a fake probe must keep).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import optuna
from optuna.trial import TrialState

from autotune.config import PlannerConfig
from autotune.engine.config import PlanConfig, TrainConfig, with_changes
from autotune.estimate import Calibration, estimate
from autotune.hardware import Hardware
from autotune.local_share import AS_IS, share_here
from autotune.runner import ProbeRun, run_probe
from autotune.search.record import Ran, Scaled, TrialRecord
from autotune.search.study import HEARTBEAT_S, Ledger

ProbeFn = Callable[..., ProbeRun]  # the signature of autotune.runner.run_probe


def objective_measured(metrics: dict[str, Any], world: int, objective: str) -> float | list[float]:
    """The study's value(s) of a measured run: tokens/s, tokens per GPU-second, or (pareto) both
    tokens/s and peak memory."""
    tps = float(metrics["tokens_per_s"])
    if objective == "cost":
        return tps / world
    if objective == "pareto":
        return [tps, float(metrics["peak_mem_bytes"])]
    return tps


def same_share(ledger: Ledger, ran: Ran, steps: int) -> Optional[optuna.trial.FrozenTrial]:
    """A trial that measured exactly the share `ran` (plan, job and model that ran here) for as many
    steps, without error; None if there is none."""
    for t in ledger.trials:
        r = ledger.record(t)
        if (t.state == TrialState.COMPLETE and r.status == "ok" and r.steps == steps and r.reused is None
                and r.ran is not None and r.ran.train == ran.train):
            return t
    return None


class TrialRunner:
    """Runs the trials of one search process on at most `cap` ranks here."""

    def __init__(self, pc: PlannerConfig, run_dir: Path, hw: Hardware, hw_here: Hardware, cap: int,
                 probe: ProbeFn = run_probe):
        self.pc, self.s, self.run_dir, self.hw, self.hw_here, self.cap = pc, pc.search, run_dir, hw, hw_here, cap
        self.probe = probe

    def run(self, study: optuna.Study, trial: optuna.Trial, plan: PlanConfig, *, final: bool, source: str,
            calibration: Optional[Calibration], ledger: Ledger) -> tuple[TrialRecord, float]:
        """Run `plan` as `trial` (claimed already), tell the study, and return the record and the
        seconds the probe took (0 when a share measured before was reused)."""
        steps = self.s.final_steps if final else self.s.probe_steps
        train = with_changes(self.pc.train, plan=plan)
        share = share_here(train, self.cap, self.pc.cluster.gpus_per_node, self.hw_here, calibration)
        est_here = estimate(share.train, self.hw_here, calibration)
        # the estimator carries what ran here to the whole plan (1 when they are the same)
        est_full = estimate(train, self.hw, calibration) if share.kind != AS_IS else est_here
        scale = (est_full.step_time_s / est_here.step_time_s, est_full.memory["total_bytes"] / est_here.memory["total_bytes"])
        # `estimate` is the plan's (what the scaled measurement is compared with); `ran` what ran here
        ran = Ran(share.train, share.kind, share.note, est_here.to_dict() if share.kind != AS_IS else None)
        record = TrialRecord(plan=train.plan, estimate=est_full.to_dict(), final=final, source=source, ran=ran,
                             steps=steps)
        record.write(trial, "plan", "estimate", "final", "source", "ran")
        # plans that differ only in what the estimator models (the pipeline schedule, say) run
        # the same share: measure it once and scale it for each
        same = same_share(ledger, ran, steps) if share.kind != AS_IS else None
        if same is not None:
            record.reused = same.number
            record.step_times_s = ledger.record(same).step_times_s
            run = ProbeRun("ok", ledger.record(same).probe, f"not rerun: trial {same.number} measured the same share", 0.0)
        else:
            run = self._probe(trial, share.train, train, steps, final, scale[0])
            record.step_times_s = [float(r["step_time_s"]) for r in run.steps if int(r["step"]) >= self.s.warmup_steps]
        self._tell(study, trial, record, run, train, scale)
        return record, run.wall_s

    def _probe(self, trial: optuna.Trial, here: TrainConfig, train: TrainConfig, steps: int, final: bool,
               time_scale: float) -> ProbeRun:
        """The probe on `here`, reporting to the pruner as its steps come in, and beating the heart."""
        tokens_per_step = train.job.global_batch * train.job.seq_len
        world = train.plan.world_size
        step_times: list[float] = []
        last_beat = [time.monotonic()]

        def on_progress(step: int, step_time_s: float) -> bool:
            step_times.append(step_time_s)
            measured = step_times[self.s.warmup_steps:]
            if final or self.s.objective == "pareto" or not measured or len(measured) >= steps:
                return False  # finalists run to the end; a finished trial is a result, not a prune
            value = tokens_per_step / (float(np.median(measured)) * time_scale)
            value /= world if self.s.objective == "cost" else 1
            trial.report(value, len(measured))
            return bool(trial.should_prune())

        def on_poll() -> None:
            if time.monotonic() - last_beat[0] > HEARTBEAT_S:
                trial.set_user_attr("heartbeat", time.time())
                last_beat[0] = time.monotonic()

        return self.probe(here, self.run_dir / "trials" / f"{trial.number}", steps=steps,
                          warmup=self.s.warmup_steps, timeout_s=self.s.trial_timeout_s,
                          memory_cap_bytes=self.s.trial_memory_cap_bytes, on_progress=on_progress,
                          on_poll=on_poll, log_path=self.run_dir / "logs" / f"trial-{trial.number}.log")

    def _tell(self, study: optuna.Study, trial: optuna.Trial, record: TrialRecord, run: ProbeRun, train: TrainConfig,
              scale: tuple[float, float]) -> None:
        """Record what `run` measured (scaled to the plan when a share ran) and tell the study."""
        record.probe, record.status, record.reason = run.metrics, run.status, run.reason
        if run.status == "ok":
            result = run.metrics
            if record.ran.kind != AS_IS:
                step = run.metrics["step_time_s"] * scale[0]
                record.scaled = Scaled(time_scale=scale[0], mem_scale=scale[1], step_time_s=step,
                                       tokens_per_s=train.job.global_batch * train.job.seq_len / step,
                                       peak_mem_bytes=run.metrics["peak_mem_bytes"] * scale[1],
                                       measured=f"{record.ran.kind}: {record.ran.note}")
                result = {"step_time_s": record.scaled.step_time_s, "tokens_per_s": record.scaled.tokens_per_s,
                          "peak_mem_bytes": record.scaled.peak_mem_bytes}
            record.write(trial, "probe", "status", "reason", "steps", "step_times_s", "scaled", "reused")
            study.tell(trial, objective_measured(result, train.plan.world_size, self.s.objective))
            return
        record.write(trial, "probe", "status", "reason", "steps", "step_times_s", "reused")
        study.tell(trial, state=TrialState.PRUNED if run.status == "pruned" else TrialState.FAIL)
