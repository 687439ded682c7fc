"""The estimator's guidance of a measured search: which plan to run next, which are still worth a
trial, and when to stop.

The search (autotune.search.loop) asks a guidance object only this:

    learn(ledger)          take in what the study has measured so far
    pick(plans, measured)  the plan the estimator wants run next, or None (the sampler's turn)
    worth_running(plans)   the plans that may still beat the best measured one
    why_not(plan row)      why a plan is not worth a trial (its trial's reason)
    why_stop(plans)        why none of `plans` is worth a trial (the search's reason to stop)
    preference(plans)      an order among equally near plans (higher first)
    summary()              what the trials taught the estimate, for search.json (None: nothing)
    calibration, pool      the estimator's calibration (what a trial's share and scaling use) and
                           the candidate plans with their current estimate

`EstimatorGuidance` ranks by the estimate corrected by what the trials measured, factor by factor
(autotune.belief: a posterior over the scale of each part of the step time, e.g. compute in bf16,
recompute, offload, tp communication). It never lets an estimate veto plans it has no evidence
about: a plan's optimistic bound grows with every factor no measured trial has pinned down, so a
plan is skipped only when even that bound cannot beat the best measured one; and before the search
stops early, each value of each major dimension (`DIMENSIONS`) that has a candidate has been
measured once, at its best-estimated plan. `NoGuidance` is plain Optuna (search.use_estimator=false):
every valid plan is worth a trial and the sampler proposes them all.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import optuna
import pandas as pd

from autotune.belief import Belief, factors_of, fit_belief, parts_matrix, prior_belief
from autotune.config import PlannerConfig
from autotune.estimate import Calibration, estimate_frame, fit_calibration, measured_imbalance
from autotune.hardware import Hardware
from autotune.plans import PLAN_FIELDS, plans_frame
from autotune.search.progress import rate
from autotune.search.record import TrialRecord
from autotune.search.study import Ledger

# The major dimensions of a plan: before the search stops early, each value of each that has a
# candidate has been measured at least once (at its best-estimated plan).
DIMENSIONS = {
    "precision": lambda f: f["precision"].astype(str),
    "ZeRO stage": lambda f: f["zero_stage"].astype(int).astype(str),
    "offload": lambda f: np.where(f["offload_params"].astype(bool), "params",
                                  np.where(f["offload_optimizer"].astype(bool), "optimizer", "none")),
    "activation checkpointing": lambda f: f["activation_checkpointing"].astype(str),
    "kernels": lambda f: f["kernels"].astype(str),
    "float8": lambda f: f["fp8"].astype(str),
    "tensor parallel": lambda f: np.where(f["tp"] > 1, "tp > 1", "tp = 1"),
    "pipeline parallel": lambda f: np.where(f["pp"] > 1, "pp > 1", "pp = 1"),
    "expert parallel": lambda f: np.where(f["ep"] > 1, "ep > 1", "ep = 1"),
    "hybrid sharding": lambda f: np.where(f["dp_replicate"] > 1, "dp_replicate > 1", "dp_replicate = 1"),
    "context parallel": lambda f: np.where(f["cp"] > 1, "cp > 1", "cp = 1"),
}


class NoGuidance:
    """Plain Optuna: no estimate ranks, skips or stops anything."""

    calibration: Optional[Calibration] = None

    def __init__(self, pool: pd.DataFrame, seed: int, study: optuna.Study):
        self.pool, self.seed, self.study = pool, seed, study

    def learn(self, ledger: Ledger) -> None:
        pass

    def pick(self, plans: pd.DataFrame, measured: int) -> Optional[pd.Series]:
        return None

    def worth_running(self, plans: pd.DataFrame) -> pd.DataFrame:
        return plans

    def why_not(self, row: pd.Series) -> str:
        return "not run"

    def why_stop(self, plans: pd.DataFrame) -> str:
        return ""

    def summary(self) -> Optional[dict]:
        return None

    def preference(self, plans: pd.DataFrame) -> pd.Series:
        """A seeded random order, another for each trial of the study."""
        rng = np.random.default_rng(self.seed + len(self.study.get_trials(deepcopy=False)))
        return pd.Series(-rng.random(len(plans)), index=plans.index)


class EstimatorGuidance:
    """The estimate, corrected factor by factor by the measured trials, ranks the plans, skips those
    whose optimistic bound cannot win, asks for each dimension's values to be measured once, and
    says when to stop."""

    def __init__(self, pc: PlannerConfig, hw: Hardware, hw_here: Hardware, pool: pd.DataFrame, whole_here: bool):
        self.pc, self.hw, self.hw_here, self.whole_here = pc, hw, hw_here, whole_here
        self.pool = pool.copy()  # the candidates; their current belief in columns step_*, objective_*
        self.factors = factors_of(pool)
        self.parts = parts_matrix(pool, self.factors)
        self.values = pd.DataFrame({dim: value(pool) for dim, value in DIMENSIONS.items()}, index=pool.index)
        self.calibration: Optional[Calibration] = None  # what a share's scaling uses
        self.routing = Calibration()  # a MoE model's router imbalance, once a trial measured it
        self.belief: Belief = prior_belief(self.factors)
        self.covered: set[tuple[str, str]] = set()
        self.best: Optional[float] = None
        self.oom_ceiling: Optional[float] = None
        self._parts_of: dict[int, np.ndarray] = {}  # a trial's parts, by trial number
        self._believe()

    def learn(self, ledger: Ledger) -> None:
        measured = ledger.measured() + ledger.measured(final=True)
        ok = [ledger.record(t) for t in measured if ledger.record(t).status == "ok"]
        if ok and not self.whole_here:  # a share is scaled to its plan by the calibrated estimator
            self.calibration = fit_calibration(
                [{**r.ran.attrs(), "step_time_s": r.probe["step_time_s"], "peak_mem_bytes": r.probe["peak_mem_bytes"],
                  "moe": r.probe.get("moe")} for r in ok], self.hw_here)
        self._learn_imbalance(ok)
        # every trial that timed steps teaches the belief, a pruned one too (its few steps, wider)
        timed = [(t.number, ledger.record(t)) for t in measured if step_time(ledger.record(t)) is not None]
        if len(timed) != self.belief.trials:
            parts = np.stack([self._trial_parts(number, r) for number, r in timed])
            seconds = np.array([step_time(r) for _, r in timed])
            self.belief = fit_belief(self.factors, parts, seconds, np.array([spread(r) for _, r in timed]))
            self._believe()
        if measured:
            seen = plans_frame([ledger.record(t).plan for t in measured])
            self.covered = {(dim, str(v)) for dim, value in DIMENSIONS.items() for v in value(seen)}
        self.best = ledger.best_value()
        self.oom_ceiling = self._oom_ceiling(ledger)

    def _learn_imbalance(self, ok: list[TrialRecord]) -> None:
        """A MoE model's router as the probe measured it: the candidates' and the trials' parts are
        estimated again with its imbalance (it moves the experts' work and all-to-alls of ep plans)
        and the belief is fitted again on them."""
        imbalance = measured_imbalance([r.probe for r in ok])
        if imbalance is None or imbalance == self.routing.moe_imbalance:
            return
        self.routing = Calibration(moe_imbalance=imbalance)
        self.parts = parts_matrix(estimate_frame(self.pc.model, self.pc.job, self.pool[list(PLAN_FIELDS)], self.hw,
                                                 self.routing), self.factors)
        self._parts_of.clear()
        self.belief = prior_belief(self.factors)  # fitted below, on the new parts

    def _trial_parts(self, number: int, record: TrialRecord) -> np.ndarray:
        """What ran in a trial (the plan, or its share), in the factors' parts of its estimate."""
        if number not in self._parts_of:
            ran = record.ran.train
            frame = estimate_frame(ran.model, ran.job, plans_frame([ran.plan]), self.hw_here, self.routing)
            self._parts_of[number] = parts_matrix(frame, self.factors)[0]
        return self._parts_of[number]

    def _believe(self) -> None:
        """The pool's step time as the belief has it: mean, spread, optimistic bound, and the
        objective at the mean (`objective_est`) and at the bound (`objective_best_case`)."""
        mean, sd = self.belief.predict(self.parts)
        fastest = self.belief.optimistic(self.parts)
        tokens = self.pc.job.global_batch * self.pc.job.seq_len
        per = (self.pool["dp"] * self.pool["tp"] * self.pool["pp"]).to_numpy() if self.pc.search.objective == "cost" else 1
        self.pool["step_mean_s"], self.pool["step_sd_s"], self.pool["step_best_case_s"] = mean, sd, fastest
        self.pool["objective_est"] = tokens / mean / per
        self.pool["objective_best_case"] = tokens / fastest / per

    def _oom_ceiling(self, ledger: Ledger) -> Optional[float]:
        """The smallest estimated memory of a plan that ran out of memory here: plans estimated to
        need as much are not worth a trial (the estimate was too low for this device)."""
        if not self.whole_here:  # a share's estimate is not the plan's
            return None
        sizes = [r.estimate["memory"]["total_bytes"] for r in map(ledger.record, ledger.measured() + ledger.measured(True))
                 if r.status == "oom" and r.estimate]
        return min(sizes) if sizes else None

    def unmeasured(self, plans: pd.DataFrame) -> pd.DataFrame:
        """For each (dimension, value) of `plans` no trial has measured: its best-estimated plan of
        those new in the fewest other values, so that a trial varies one unmeasured thing where it
        can and the belief can tell which factor its surprise belongs to."""
        values = self.values.loc[plans.index]
        new = sum(~values[dim].astype(str).map(lambda v, d=dim: (d, v) in self.covered) for dim in DIMENSIONS)
        rows = []
        for dim in DIMENSIONS:
            for value, group in plans.groupby(values[dim]):
                if (dim, str(value)) not in self.covered:
                    least_new = group.index[new[group.index] == new[group.index].min()]
                    best = self.pool.loc[least_new, "objective_est"].idxmax()
                    rows.append({"dimension": dim, "value": str(value), "plan": best})
        return pd.DataFrame(rows, columns=["dimension", "value", "plan"])

    def pick(self, plans: pd.DataFrame, measured: int) -> Optional[pd.Series]:
        """A dimension's unmeasured value first: of the values' best-estimated plans, the one with
        the most to gain (the highest optimistic bound: what the estimate knows least about); then
        the best-estimated plan every other trial, the sampler proposing in between (snapped to
        plans worth running), so a structure the factors miss can still be found."""
        todo = self.unmeasured(plans)
        if len(todo):
            explore = self.pool.loc[todo["plan"].unique()]
            return explore.sort_values(["objective_best_case", "objective_est"], ascending=False, kind="stable").iloc[0]
        return self.rank(plans).iloc[0] if measured % 2 == 0 else None

    def rank(self, plans: pd.DataFrame) -> pd.DataFrame:
        """`plans` (rows of the pool), the best estimate first."""
        return self.pool.loc[plans.index].sort_values("objective_est", ascending=False, kind="stable")

    def worth_running(self, plans: pd.DataFrame) -> pd.DataFrame:
        """Plans that may fit and whose optimistic bound beats the best measured one, and the best
        plan of each dimension value not measured yet."""
        plans = self.pool.loc[plans.index]
        if self.oom_ceiling is not None:
            plans = plans[plans["mem_total_bytes"] < self.oom_ceiling]
        if self.best is None or self.pc.search.objective == "pareto":
            return plans
        explore = plans.index.isin(self.unmeasured(plans)["plan"])
        return plans[(plans["objective_best_case"] >= self.best) | explore]

    def why_not(self, row: pd.Series) -> str:
        row = self.pool.loc[row.name]
        if self.oom_ceiling is not None and row["mem_total_bytes"] >= self.oom_ceiling:
            return (f"not run: estimated to need {row['mem_total_bytes'] / 2**20:,.0f} MiB, as much as a plan that "
                    "ran out of memory here")
        return (f"not run: even at its optimistic bound ({rate(row['objective_best_case'])}; estimate "
                f"{rate(row['objective_est'])}) it cannot beat the best measured {rate(self.best or 0)}")

    def why_stop(self, plans: pd.DataFrame) -> str:
        plans = self.pool.loc[plans.index]
        too_big = int((plans["mem_total_bytes"] >= self.oom_ceiling).sum()) if self.oom_ceiling is not None else 0
        parts = []
        if too_big:
            parts.append(f"{too_big} need as much memory as a plan that ran out of it")
        if len(plans) > too_big:
            parts.append(f"{len(plans) - too_big} have an optimistic bound below the best measured {rate(self.best)}")
        if len(parts) == 1:
            parts[0] = "all " + parts[0]
        return (f"no plan left can beat the best measured one: every dimension's values were measured, and of the "
                f"{len(plans)} plans left, " + " and ".join(parts))

    def preference(self, plans: pd.DataFrame) -> pd.Series:
        return self.pool.loc[plans.index, "objective_est"]

    def summary(self) -> dict:
        """What the trials taught the estimate (for search.json and report.md): per factor its
        prior, fitted value, spread and trials; the factors whose prior was wrong; the dimension
        values of the candidates that no trial measured."""
        todo = self.unmeasured(self.pool)
        return {"factors": self.belief.table(), "wrong_priors": [r["factor"] for r in self.belief.surprises()],
                "unmeasured": [f"{d}={v}" for d, v in zip(todo["dimension"], todo["value"])],
                "moe_imbalance": self.routing.moe_imbalance}


def step_time(record: TrialRecord) -> Optional[float]:
    """What a trial measured of its step time here: the probe's median, or for a pruned trial the
    median of the steps it ran; None when it timed none."""
    if record.status == "ok":
        return float(record.probe["step_time_s"])
    if record.status == "pruned" and record.step_times_s:
        return float(np.median(record.step_times_s))
    return None


def spread(record: TrialRecord) -> float:
    """The standard error of a trial's median step time, from its measured steps' times (a single
    step's: half its time, for want of a second)."""
    times = np.asarray(record.step_times_s or [], dtype=float)
    if len(times) < 2:
        return 0.5 * float(times[0]) if len(times) else 0.0
    return float(1.2533 * np.std(times, ddof=1) / np.sqrt(len(times)))
