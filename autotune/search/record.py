"""A trial's record: what the search writes on an Optuna trial (its user_attrs), as one typed value.

The search writes it (autotune.search.trial) and the reports read it (autotune.reports.load); the
attributes are JSON in the study, so the record converts both ways: `TrialRecord.from_attrs` and
`TrialRecord.attrs`. The claim bookkeeping (claim, worker, heartbeat, confirmed) is written by
autotune.search.study as it happens; the record reads it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional


from autotune.engine.config import PlanConfig, TrainConfig, as_json, from_json
from autotune.plans import plan_from_row, plan_values

MEASURED = ("ok", "oom", "error", "timeout", "pruned")  # a plan that ran (to the end or not)
DONE = MEASURED + ("skipped",)  # statuses of a claim: that plan is never run again
BOOKKEEPING = ("claim", "worker", "heartbeat", "confirmed")


@dataclass
class Ran:
    """What of the plan ran here (autotune.local_share): the plan as is, or a share of it."""

    train: TrainConfig  # the model, job and plan that ran
    kind: str  # as is | node share | rank share
    note: str  # in words, for the report
    estimate: Optional[dict[str, Any]] = None  # the estimate of what ran, when it is a share

    def attrs(self) -> dict[str, Any]:
        out = {section: as_json(getattr(self.train, section)) for section in ("plan", "job", "model")}
        out.update(kind=self.kind, note=self.note)
        if self.estimate is not None:
            out["estimate"] = self.estimate
        return out

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> "Ran":
        return cls(train=from_json(TrainConfig, attrs), kind=attrs.get("kind", "as is"), note=attrs.get("note", ""),
                   estimate=attrs.get("estimate"))


@dataclass
class Scaled:
    """A share's measurement carried to the whole plan by the estimator's ratio of the two."""

    time_scale: float
    mem_scale: float
    step_time_s: float
    tokens_per_s: float
    peak_mem_bytes: float
    measured: str = ""  # what ran, in words
    modelled: str = "x estimate(whole plan on the cluster) / estimate(what ran here)"


@dataclass
class TrialRecord:
    """One trial of a search (see the contract in autotune/search/__init__.py)."""

    plan: Optional[PlanConfig] = None
    status: Optional[str] = None  # ok | oom | error | timeout | pruned | skipped; None while it runs
    reason: str = ""
    final: bool = False  # a finalist's longer rerun
    source: str = "sampler"  # who chose the plan: estimate | sampler | sampler (nearest) | finalist | ...
    estimate: Optional[dict[str, Any]] = None  # the estimator's prediction for the whole plan
    probe: Optional[dict[str, Any]] = None  # the probe's JSON (autotune/engine/probe.py)
    step_times_s: list[float] = field(default_factory=list)  # each measured step (warmup left out)
    steps: Optional[int] = None  # measured steps asked of the probe
    ran: Optional[Ran] = None
    scaled: Optional[Scaled] = None  # when a share ran
    reused: Optional[int] = None  # the trial whose measurement of the same share this one took
    claim: Optional[str] = None  # the bookkeeping of autotune.search.study, read only
    worker: Optional[dict[str, Any]] = None
    heartbeat: Optional[float] = None
    confirmed: bool = False

    @property
    def measured(self) -> bool:
        return self.status in MEASURED

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> "TrialRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in attrs.items() if k in names and v is not None}
        if "plan" in values:
            values["plan"] = plan_from_row(values["plan"])
        if "ran" in values:
            values["ran"] = Ran.from_attrs(values["ran"])
        if "scaled" in values:
            values["scaled"] = Scaled(**values["scaled"])
        return cls(**values)

    def attrs(self) -> dict[str, Any]:
        """The user_attrs this record writes (JSON values; the claim bookkeeping is not among them)."""
        return {
            "plan": plan_values(self.plan) if self.plan is not None else None,
            "status": self.status, "reason": self.reason, "final": self.final, "source": self.source,
            "estimate": self.estimate, "probe": self.probe, "step_times_s": self.step_times_s, "steps": self.steps,
            "ran": self.ran.attrs() if self.ran is not None else None,
            "scaled": dataclasses.asdict(self.scaled) if self.scaled is not None else None,
            "reused": self.reused,
        }

    def write(self, trial: Any, *names: str) -> None:
        """Set these attributes (all of them when none is named) on an Optuna trial."""
        attrs = self.attrs()
        for name in names or attrs:
            trial.set_user_attr(name, attrs[name])
