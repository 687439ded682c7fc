"""The study's search space, and its trials turned into plans.

Optuna's params of a trial are the plan fields that vary among the valid plans (one categorical
parameter each; grad_accum follows from the others). A trial comes from the queue (a plan the
estimator or the finals enqueued) or from the sampler; a sampler's proposal names a plan in its
canonical form (autotune.plans.canonical), and one that is not worth running is replaced by the
nearest plan that is.
"""
from __future__ import annotations

from typing import NamedTuple

import optuna
import pandas as pd
from optuna.distributions import CategoricalDistribution

from autotune.engine.config import PLAN_FIELDS, JobConfig, PlanConfig
from autotune.plans import canonical, plain, plan_from_row, plan_values
from autotune.search.study import WORKER


def search_space(frame: pd.DataFrame) -> dict[str, CategoricalDistribution]:
    """One categorical parameter per plan field that varies among `frame`'s plans. Taken over all
    valid plans, not the candidates, because those depend on the measured hardware: every process
    on the study must see one search space."""
    return {k: CategoricalDistribution(sorted(frame[k].map(plain).unique().tolist(), key=str))
            for k in PLAN_FIELDS if k != "grad_accum" and frame[k].nunique() > 1}


class Asked(NamedTuple):
    """A trial of the study, the plan it names and its role."""

    trial: optuna.Trial
    plan: PlanConfig
    final: bool
    source: str


class Proposals:
    """Asks the study for trials and turns them into plans; queues plans for later trials."""

    def __init__(self, study: optuna.Study, space: dict[str, CategoricalDistribution], any_plan: pd.Series,
                 job: JobConfig):
        self.study, self.space, self.job = study, space, job
        self.fixed = plan_values(plan_from_row(any_plan))  # the fields outside the space: no plan varies them

    def ask(self) -> Asked:
        """The study's next trial (a queued plan, or the sampler's proposal) with its plan and role."""
        trial = self.study.ask()
        trial.set_user_attr("worker", WORKER)
        source = trial.user_attrs.get("source", "sampler")
        values = dict(self.fixed)
        values.update({k: trial.suggest_categorical(k, d.choices) for k, d in self.space.items()})
        values["grad_accum"] = self.job.global_batch // (values["micro_batch"] * values["dp"])
        return Asked(trial, canonical(plan_from_row(values)), source == "finalist", source)

    def queue(self, plan: PlanConfig, source: str) -> None:
        """Let a later trial (of any process on the study) run `plan`."""
        values = plan_values(plan)
        self.study.enqueue_trial({k: values[k] for k in self.space}, user_attrs={"source": source})

    def nearest(self, plan: PlanConfig, plans: pd.DataFrame, preference: pd.Series) -> pd.Series:
        """The plan of `plans` that differs from `plan` in the fewest fields; ties go to the higher
        `preference`."""
        values = plan_values(plan)
        distance = sum((plans[k].map(plain) != values[k]).astype(int) for k in self.space)
        order = pd.DataFrame({"d": distance, "t": -preference}).sort_values(["d", "t"], kind="stable")
        return plans.loc[order.index[0]]
