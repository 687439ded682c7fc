"""The study's bookkeeping: its trials read as records, and the claims that keep search processes
sharing one study from running a plan twice.

A process claims a plan before running it: it writes the plan's key on its trial, looks for other
claims, confirms, and looks again (the lower trial number wins a tie), so no plan runs twice. A
trial left RUNNING by a dead process is failed and its plan becomes free again.
"""
from __future__ import annotations

import os
import socket
import time
import warnings
from typing import Any, Optional

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from autotune.config import SearchConfig
from autotune.search.record import DONE, TrialRecord

WORKER = {"host": socket.gethostname(), "pid": os.getpid()}
STALE_HEARTBEAT_S = 180.0  # a RUNNING trial of another host silent this long is dead
HEARTBEAT_S = 20.0
FINAL = "final:"  # a finalist's claim is its plan's key with this prefix


class Ledger:
    """The study's trials as records, read once: what ran, what is claimed, the best so far."""

    def __init__(self, study: optuna.Study):
        self.trials = study.get_trials(deepcopy=False)
        self.records = {t.number: TrialRecord.from_attrs(t.user_attrs) for t in self.trials}

    def record(self, trial: FrozenTrial) -> TrialRecord:
        return self.records[trial.number]

    def measured(self, final: bool = False) -> list[FrozenTrial]:
        """Finished trials that ran a plan (to the end or not), short ones or finalists."""
        return [t for t in self.trials if t.state.is_finished() and self.records[t.number].measured
                and self.records[t.number].final == final and self.records[t.number].claim]

    def ok(self, final: bool = False) -> list[FrozenTrial]:
        return [t for t in self.measured(final) if self.records[t.number].status == "ok"]

    def spent(self) -> int:
        """Short trials that count against search.trials: those that ran a probe (not a reused share)."""
        return sum(1 for t in self.measured() if self.records[t.number].reused is None)

    def best_value(self) -> Optional[float]:
        values = [t.values[0] for t in self.ok() if t.values]
        return max(values) if values else None

    def claimed_keys(self, final: bool) -> set[str]:
        """Plans taken: running, or decided (run or skipped) for good."""
        keys = set()
        for t in self.trials:
            claim = self.records[t.number].claim
            if not claim or claim.startswith(FINAL) != final:
                continue
            if t.state == TrialState.RUNNING or self.records[t.number].status in DONE:
                keys.add(claim.removeprefix(FINAL))
        return keys

    def others_running(self) -> list[FrozenTrial]:
        """Short trials another live process is still running."""
        return [t for t in self.trials if t.state == TrialState.RUNNING and self.records[t.number].claim
                and not self.records[t.number].final and alive(t)]


def alive(t: FrozenTrial) -> bool:
    """Whether the process that runs RUNNING trial `t` is still there."""
    worker = t.user_attrs.get("worker") or {}
    if worker.get("host") == WORKER["host"] and worker.get("pid"):
        try:
            os.kill(int(worker["pid"]), 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    beat = t.user_attrs.get("heartbeat") or (t.datetime_start.timestamp() if t.datetime_start else 0)
    return time.time() - float(beat) < STALE_HEARTBEAT_S


def fail_stale_trials(study: optuna.Study) -> int:
    """Fail RUNNING trials whose process died (a killed search); their plans become free again."""
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("worker") and not alive(t):
            status = "error" if t.user_attrs.get("claim") else "skipped"
            attrs = {"claim": None, "status": status,
                     "reason": "interrupted: the search process running it died; its plan is free again"}
            try:
                _fail_from_outside(study, t, attrs)
                n += 1
            except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
                pass  # another process failed it first
    return n


def _fail_from_outside(study: optuna.Study, t: FrozenTrial, attrs: dict[str, Any]) -> None:
    """Set `attrs` on trial `t` and fail it, from a process that did not ask for it. Optuna's public
    API tells only a trial this process holds (study.tell takes a live Trial or a number, and
    refuses a trial another process started); a dead process's trial is reached through the
    storage, which is private (`_storage`, `_trial_id`). This is the only place that does it."""
    for key, value in attrs.items():
        study._storage.set_trial_user_attr(t._trial_id, key, value)
    study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)


def _live_claims(study: optuna.Study, key: str, me: int) -> list[FrozenTrial]:
    out = []
    for t in study.get_trials(deepcopy=False):
        if t.number == me or t.user_attrs.get("claim") != key:
            continue
        if t.state == TrialState.RUNNING and alive(t):
            out.append(t)
        elif t.state.is_finished() and t.user_attrs.get("status") in DONE:
            out.append(t)
    return out


def claim(study: optuna.Study, trial: optuna.Trial, key: str) -> Optional[str]:
    """Claim plan `key` for `trial`; None when it is ours, else the reason it is not.

    Write the claim, look, confirm, look again: of two racing trials at least one sees the other
    before running, and the lower-numbered one wins (see the module docstring).
    """
    trial.set_user_attr("claim", key)
    trial.set_user_attr("worker", WORKER)
    trial.set_user_attr("heartbeat", time.time())
    for t in _live_claims(study, key, trial.number):
        if t.state.is_finished() or t.number < trial.number or t.user_attrs.get("confirmed"):
            return f"plan already claimed by trial {t.number}"
    trial.set_user_attr("confirmed", True)
    for t in _live_claims(study, key, trial.number):
        if t.state.is_finished() or t.number < trial.number:
            return f"plan already claimed by trial {t.number}"
    return None


def close_unrun(study: optuna.Study, trial: optuna.Trial, record: TrialRecord, state: TrialState,
                claim_key: Optional[str] = None) -> None:
    """Close a trial that does not run; with `claim_key` its plan counts as decided (never run),
    without it a claim this trial wrote is withdrawn."""
    record.write(trial)
    trial.set_user_attr("claim", claim_key)
    study.tell(trial, state=state)


def make_sampler(s: SearchConfig, space: dict[str, CategoricalDistribution]) -> optuna.samplers.BaseSampler:
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    if s.sampler == "grid":
        return optuna.samplers.GridSampler({k: list(d.choices) for k, d in space.items()}, seed=s.seed)
    if s.sampler == "gp":
        return optuna.samplers.GPSampler(seed=s.seed)
    if s.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=s.seed)
    multi = s.objective == "pareto"
    with warnings.catch_warnings():  # multivariate TPE is "experimental" in Optuna's terms
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=s.seed, multivariate=not multi, n_startup_trials=3)


def make_pruner(s: SearchConfig) -> optuna.pruners.BasePruner:
    if s.pruner == "none" or s.objective == "pareto":  # Optuna prunes single-objective studies only
        return optuna.pruners.NopPruner()
    if s.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)
    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(s.final_steps, s.probe_steps),
                                          reduction_factor=2)
