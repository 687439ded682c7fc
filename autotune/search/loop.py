"""The measured search: short trials while they are worth it (explore), the finalists' longer
reruns (finals), and the answer (result). See autotune/search/__init__.py for the whole story."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Optional

import optuna
import pandas as pd
from optuna.trial import TrialState

from autotune.belief import RELATIVE_NOISE
from autotune.config import PlannerConfig
from autotune.engine.config import PlanConfig
from autotune.hardware import Hardware
from autotune.local_share import capacity
from autotune.plans import plan_from_row, plan_key, plan_label
from autotune.runner import run_probe
from autotune.search.guidance import EstimatorGuidance, NoGuidance, spread
from autotune.search.progress import Progress
from autotune.search.proposals import Asked, Proposals, search_space
from autotune.search.record import TrialRecord
from autotune.search.study import FINAL, Ledger, claim, close_unrun, fail_stale_trials, make_pruner, make_sampler
from autotune.search.trial import ProbeFn, TrialRunner

MAX_PROPOSALS = 50  # sampler proposals in a row that are not runnable before the search gives up


class Search:
    """One search process working on one study (several may share it). `probe` runs a trial's probe
    (autotune.runner.run_probe, or a test's fake with its signature)."""

    def __init__(self, pc: PlannerConfig, run_dir: Path, name: str, hw: Hardware, frame: pd.DataFrame,
                 storage: Any, probe: ProbeFn = run_probe):
        self.pc, self.s = pc, pc.search
        # A trial runs on at most `cap` ranks here (the GPUs of the cluster's kind on this
        # machine); of a larger plan it runs a share and the estimator models the rest.
        cap = capacity(pc.cluster, pc.search)
        hw_here = dataclasses.replace(hw, nodes=1, gpus_per_node=cap)
        directions = ["maximize", "minimize"] if self.s.objective == "pareto" else ["maximize"]
        space = search_space(frame)
        self.study = optuna.create_study(study_name=name, storage=storage, directions=directions,
                                         sampler=make_sampler(self.s, space), pruner=make_pruner(self.s),
                                         load_if_exists=True)
        self.proposals = Proposals(self.study, space, frame.iloc[0], pc.job)
        if self.s.use_estimator:
            # every plan that fits: the estimate ranks them, it does not drop any unmeasured
            self.guidance = EstimatorGuidance(pc, hw, hw_here, frame[frame["fits"].astype(bool)],
                                              whole_here=pc.cluster.n_gpus <= cap)
        else:
            self.guidance = NoGuidance(frame, self.s.seed, self.study)
        self.runner = TrialRunner(pc, run_dir, hw, hw_here, cap, probe)
        self.progress = Progress(self.s)
        self.stopped = ""

    def ledger(self) -> Ledger:
        return Ledger(self.study)

    def explore(self) -> None:
        """Run short trials until the budget is spent or nothing left is worth running."""
        skips = 0
        while True:
            fail_stale_trials(self.study)
            ledger = self.ledger()
            if ledger.spent() >= self.s.trials:
                self.stopped = f"search.trials={self.s.trials} trials run"
                return
            self.guidance.learn(ledger)
            asked = self.next_trial(ledger)
            if asked is None:
                return
            before = len(ledger.measured())
            self.run_trial(asked)
            skips = skips + 1 if len(self.ledger().measured()) == before else 0
            if skips > 4 * self.s.trials:  # claims keep losing races: the others are covering it
                self.stopped = "other search processes hold the remaining plans"
                return

    def next_trial(self, ledger: Ledger) -> Optional[Asked]:
        """The next trial to run and its plan; None when nothing left is worth running."""
        pool = self.guidance.pool
        rest = pool[~pool["key"].isin(ledger.claimed_keys(final=False))]
        if rest.empty:
            self.stopped = "every candidate plan has been run"
            return None
        worth = self.guidance.worth_running(rest)
        if worth.empty:
            self.stopped = self.guidance.why_stop(rest)
            return None
        pick = self.guidance.pick(worth, len(ledger.measured()))
        if pick is not None:
            self.proposals.queue(plan_from_row(pick), "estimate")
        worth_keys, rest_keys = set(worth["key"]), set(rest["key"])
        # A proposal that is not a plan worth running is closed and its nearest candidate queued;
        # with several workers on one study another may take that queued trial first, so ask again.
        for _ in range(MAX_PROPOSALS):
            asked = self.proposals.ask()
            key = plan_key(asked.plan)
            if asked.final or key in worth_keys:
                return asked
            if key in rest_keys:
                why = self.guidance.why_not(rest[rest["key"] == key].iloc[0])
                close_unrun(self.study, asked.trial, TrialRecord(plan=asked.plan, status="skipped", reason=why, source=asked.source),
                            TrialState.PRUNED, claim_key=key)
            else:
                why = ("proposal is not a candidate (invalid, does not fit, dominated or already run); "
                       "the nearest candidate still to run was queued instead")
                close_unrun(self.study, asked.trial, TrialRecord(plan=asked.plan, status="skipped", reason=why, source=asked.source),
                            TrialState.FAIL)
            # every trial's params are the plan it ran: the replacement is a trial of its own
            near = self.proposals.nearest(asked.plan, worth, self.guidance.preference(worth))
            self.proposals.queue(plan_from_row(near), "sampler (nearest)")
        self.stopped = f"{MAX_PROPOSALS} proposals in a row were not plans worth running"
        return None

    def run_trial(self, asked: Asked) -> None:
        """Claim the plan of `asked` and run it, or close the trial when another process has it."""
        key = (FINAL if asked.final else "") + plan_key(asked.plan)
        why_not = claim(self.study, asked.trial, key)
        if why_not:
            close_unrun(self.study, asked.trial, TrialRecord(plan=asked.plan, status="skipped", reason=why_not, source=asked.source),
                        TrialState.FAIL)
            return
        record, seconds = self.runner.run(self.study, asked.trial, asked.plan, final=asked.final, source=asked.source,
                                          calibration=self.guidance.calibration, ledger=self.ledger())
        if seconds:
            self.progress.timed(seconds)
        ledger = self.ledger()
        self.progress.trial_done(asked.trial.number, record.status, record.plan, asked.final, done=ledger.spent(),
                                 finals_done=len(ledger.measured(final=True)), best=ledger.best_value(),
                                 exploring=not self.stopped)

    def finals(self) -> None:
        """Rerun with search.final_steps the short trials whose interval overlaps the best one's
        (at most search.finalists of them; none when the best stands clear of the rest), once,
        whoever gets there first."""
        # every process must rank the same finished short runs, or each would pick its own finalists
        deadline = time.monotonic() + self.s.trial_timeout_s
        while self.s.finalists and self.ledger().others_running() and time.monotonic() < deadline:
            time.sleep(1.0)
        ledger = self.ledger()
        for plan in finalists(ledger, ledger.ok(), self.s.finalists):
            for _ in range(3):  # a queued trial of another process may come out first: run it, retry
                fail_stale_trials(self.study)  # a finalist whose process was killed is free again
                if plan_key(plan) in self.ledger().claimed_keys(final=True):
                    break
                self.proposals.queue(plan, "finalist")
                self.run_trial(self.proposals.ask())

    def result(self) -> dict[str, Any]:
        """The chosen plan (best long run, else best short run), whether it is within noise of the
        runner-up, how well short runs ranked the finalists, and what the trials taught the estimate."""
        ledger = self.ledger()
        finals = {ledger.record(t).claim.removeprefix(FINAL): t for t in ledger.ok(final=True)}
        shorts = {ledger.record(t).claim: t for t in ledger.ok()}
        pairs = [(shorts[k].values[0], f.values[0]) for k, f in finals.items() if k in shorts]
        tau = kendall_tau([p[0] for p in pairs], [p[1] for p in pairs])
        pool = sorted(list(finals.values()) or list(shorts.values()), key=lambda t: -t.values[0])
        out = {"best": None, "kendall_tau": tau, "kendall_pairs": len(pairs), "stopped": self.stopped,
               "learned": self.guidance.summary()}
        if not pool:
            return out
        best, record = pool[0], ledger.record(pool[0])
        source = (f"measured in part ({record.ran.kind}: {record.ran.note}), scaled to the cluster by the estimator"
                  if record.scaled else "measured")
        low, high = interval(record, best.values[0])
        out["best"] = {"trial": best.number, "plan": best.user_attrs["plan"], "value": best.values[0],
                       "values": best.values, "final": record.final, "source": source,
                       "describe": plan_label(record.plan), "interval": [low, high]}
        if len(pool) > 1:
            second = ledger.record(pool[1])
            out["runner_up"] = {"trial": pool[1].number, "describe": plan_label(second.plan), "value": pool[1].values[0],
                                "within_noise": interval(second, pool[1].values[0])[1] >= low}
        return out


def interval(record: TrialRecord, value: float) -> tuple[float, float]:
    """The range a trial's measured value is known to within: two standard errors of its median
    step time, or the run-to-run noise of RELATIVE_NOISE, whichever is wider."""
    relative = max(RELATIVE_NOISE, 2 * spread(record) / float(record.probe["step_time_s"]))
    return value * (1 - relative), value * (1 + relative)


def finalists(ledger: Ledger, short: list[optuna.trial.FrozenTrial], most: int) -> list[PlanConfig]:
    """The plans of the short trials whose interval overlaps the best one's, best first, at most
    `most`; none when only the best is left (its short run decides)."""
    ranked = sorted(short, key=lambda t: -t.values[0])
    if not ranked or most < 2:
        return [ledger.record(t).plan for t in ranked[:most]]
    low = interval(ledger.record(ranked[0]), ranked[0].values[0])[0]
    close = [t for t in ranked if interval(ledger.record(t), t.values[0])[1] >= low][:most]
    return [ledger.record(t).plan for t in close] if len(close) > 1 else []


def kendall_tau(a: list[float], b: list[float]) -> Optional[float]:
    """Kendall's tau-b of two rankings of the same items (None when it is undefined)."""
    if len(a) < 2:
        return None
    from scipy.stats import kendalltau  # seconds to import: only a search with two finalists or more needs it

    tau = kendalltau(a, b).statistic
    return None if tau != tau else float(tau)  # NaN: one ranking is all ties
