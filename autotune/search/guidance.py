"""The estimator's guidance of a measured search: which plan to run next, which are still worth a
trial, and when to stop.

The search (autotune.search.loop) asks a guidance object only this:

    learn(ledger)          take in what the study has measured so far
    pick(plans, measured)  the plan the estimator wants run next, or None (the sampler's turn)
    worth_running(plans)   the plans that may still beat the best measured one
    why_not(plan row)      why a plan is not worth a trial (its trial's reason)
    why_stop(plans)        why none of `plans` is worth a trial (the search's reason to stop)
    preference(plans)      an order among equally near plans (higher first)
    calibration, pool      the estimator's calibration (what a trial's share and scaling use) and
                           the candidate plans with their current estimate

`EstimatorGuidance` recalibrates the estimator on every measured trial (fit_calibration), ranks
by the recalibrated estimate and skips a plan whose optimistic estimate (x the optimism: how far
the estimate has underestimated a measured trial, at least OPTIMISM_FLOOR) cannot beat the best
measured one. `NoGuidance` is plain Optuna (search.use_estimator=false): every valid plan is worth
a trial and the sampler proposes them all.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import optuna
import pandas as pd

from autotune.config import PlannerConfig
from autotune.estimate import Calibration, estimate_frame, fit_calibration
from autotune.hardware import Hardware
from autotune.engine.config import PLAN_FIELDS
from autotune.search.candidates import objective_estimate
from autotune.search.progress import rate
from autotune.search.study import Ledger

# How much faster than its estimate a plan may still turn out: at least this, more if the
# measured trials show the calibrated estimator erring by more.
OPTIMISM_FLOOR = 1.10


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

    def preference(self, plans: pd.DataFrame) -> pd.Series:
        """A seeded random order, another for each trial of the study."""
        rng = np.random.default_rng(self.seed + len(self.study.get_trials(deepcopy=False)))
        return pd.Series(-rng.random(len(plans)), index=plans.index)


class EstimatorGuidance:
    """The calibrated estimator ranks the plans, skips the hopeless ones and says when to stop."""

    def __init__(self, pc: PlannerConfig, hw: Hardware, hw_here: Hardware, pool: pd.DataFrame, whole_here: bool):
        self.pc, self.hw, self.hw_here, self.whole_here = pc, hw, hw_here, whole_here
        self.pool = pool  # the candidates, with the current estimate (objective_est, tokens_per_s, mem_total_bytes)
        self.calibration: Optional[Calibration] = None
        self.calibrated_on = -1
        self.best: Optional[float] = None
        self.optimism = OPTIMISM_FLOOR
        self.oom_ceiling: Optional[float] = None

    def learn(self, ledger: Ledger) -> None:
        ok = ledger.ok() + ledger.ok(final=True)
        if ok and len(ok) != self.calibrated_on:
            self._recalibrate([ledger.record(t) for t in ok])
            self.calibrated_on = len(ok)
        self.best = ledger.best_value()
        self.optimism = self._optimism(ledger)
        self.oom_ceiling = self._oom_ceiling(ledger)

    def _recalibrate(self, records: list) -> None:
        # calibrate on what ran here: the plan, or its share of a larger cluster
        self.calibration = fit_calibration(
            [{**r.ran.attrs(), "step_time_s": r.probe["step_time_s"], "peak_mem_bytes": r.probe["peak_mem_bytes"]}
             for r in records],
            self.hw_here)
        est = estimate_frame(self.pc.model, self.pc.job, self.pool[list(PLAN_FIELDS)], self.hw, self.calibration)
        self.pool = self.pool.assign(objective_est=objective_estimate(est, self.pc.search.objective).to_numpy(),
                                     tokens_per_s=est["tokens_per_s"].to_numpy(),
                                     mem_total_bytes=est["mem_total_bytes"].to_numpy())

    def _optimism(self, ledger: Ledger) -> float:
        """How far the calibrated estimate has underestimated a measured trial (at least the floor)."""
        by_key = self.pool.set_index("key")["objective_est"]
        ratios = []
        for t in ledger.ok():
            est = by_key.get(ledger.record(t).claim)
            if est and t.values:
                ratios.append(t.values[0] / float(est))
        return max([OPTIMISM_FLOOR, *ratios])

    def _oom_ceiling(self, ledger: Ledger) -> Optional[float]:
        """The smallest estimated memory of a plan that ran out of memory here: plans estimated to
        need as much are not worth a trial (the estimate was too low for this device)."""
        if not self.whole_here:  # a share's estimate is not the plan's
            return None
        sizes = [r.estimate["memory"]["total_bytes"] for r in map(ledger.record, ledger.measured() + ledger.measured(True))
                 if r.status == "oom" and r.estimate]
        return min(sizes) if sizes else None

    def rank(self, plans: pd.DataFrame) -> pd.DataFrame:
        """`plans` (rows of the pool), the best estimate first."""
        return self.pool.loc[plans.index].sort_values("objective_est", ascending=False, kind="stable")

    def pick(self, plans: pd.DataFrame, measured: int) -> Optional[pd.Series]:
        """The best-estimated plan for the first third of the budget, then every other trial."""
        seeds = max(1, self.pc.search.trials // 3)
        if measured < seeds or (measured - seeds) % 2 == 0:
            return self.rank(plans).iloc[0]
        return None

    def worth_running(self, plans: pd.DataFrame) -> pd.DataFrame:
        plans = self.pool.loc[plans.index]
        if self.oom_ceiling is not None:
            plans = plans[plans["mem_total_bytes"] < self.oom_ceiling]
        if self.best is None or self.pc.search.objective == "pareto":
            return plans
        return plans[plans["objective_est"] * self.optimism >= self.best]

    def why_not(self, row: pd.Series) -> str:
        row = self.pool.loc[row.name]
        if self.oom_ceiling is not None and row["mem_total_bytes"] >= self.oom_ceiling:
            return (f"not run: estimated to need {row['mem_total_bytes'] / 2**20:,.0f} MiB, as much as a plan that "
                    "ran out of memory here")
        return (f"not run: its optimistic estimate ({self.optimism:.2f} x {rate(row['objective_est'])}) "
                f"cannot beat the best measured {rate(self.best or 0)}")

    def why_stop(self, plans: pd.DataFrame) -> str:
        plans = self.pool.loc[plans.index]
        too_big = int((plans["mem_total_bytes"] >= self.oom_ceiling).sum()) if self.oom_ceiling is not None else 0
        parts = []
        if too_big:
            parts.append(f"{too_big} need as much memory as a plan that ran out of it")
        if len(plans) > too_big:
            parts.append(f"{len(plans) - too_big} have an optimistic estimate (x{self.optimism:.2f}) below the "
                         f"best measured {rate(self.best)}")
        if len(parts) == 1:
            parts[0] = "all " + parts[0]
        return f"no plan left can beat the best measured one: of the {len(plans)} plans left, " + " and ".join(parts)

    def preference(self, plans: pd.DataFrame) -> pd.Series:
        return self.pool.loc[plans.index, "objective_est"]
