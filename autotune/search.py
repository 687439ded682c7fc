"""`autotune search`: the fastest plan that fits, found by the estimator and confirmed by real runs.

    autotune search [--out DIR] [--name NAME] model=... cluster=... job.global_batch=... search.*=...

1. Enumerate every valid plan (autotune.plans), estimate each (autotune.estimate.estimate_frame)
   and drop what cannot fit or is dominated; all of it goes to candidates.csv with the reason.
2. `search.mode=analytic` (the default for a catalog cluster, one you need not have): the best
   estimate is the answer. `search.mode=measure` (default for cluster=local): an Optuna study
   whose trials are real probe runs (autotune.runner), one process each:
   - guided trials take the best plan by the current estimate (enqueued with study.enqueue_trial);
     after the first few they alternate with the sampler's proposals (TPE by default), snapped to
     the nearest plan still to run;
   - a plan whose optimistic estimate cannot beat the best measured objective is not run
     (recorded "skipped"); when no plan left can, the search stops;
   - every measured trial recalibrates the estimator (fit_calibration), and the recalibrated
     estimates rank what is left;
   - the probe's per-step progress feeds trial.report / should_prune (Hyperband by default);
   - the finalists (search.finalists) rerun with search.final_steps; Kendall's tau says how well
     the short runs ranked them.
   When the cluster is larger than what a trial may use here (cluster=local with cluster.nodes=N
   or more GPUs per node than this machine has; a catalog cluster, measured on a local GPU of its
   kind), a trial runs its plan's share here (autotune.local_share: the plan as is, its tp x pp
   with the data-parallel replicas that fit, or one rank's share on one device) and the
   estimator's ratio of the whole plan to that share carries the measured step time and memory
   to the cluster; each trial says so ("ran", "scaled"), and search.json says what was measured
   and what modelled.
3. Outputs: best.yaml, ds_config.json, launch.sh (autotune.emit), trials.csv, report.md, plots
   (reports.build_report), search.json, profile.json, logs/trial-<n>.log.

The study. Storage: `<run_dir>/study.db` (SQLite) unless `search.storage` names a SQLAlchemy URL
or a journal file (a path ending in .journal, or journal:///path: Optuna's JournalFileStorage,
what several local search processes should share). Study name = run name. Every trial carries
user_attrs: plan, estimate (of what ran), probe (or None), status (ok|oom|error|timeout|pruned|
skipped), reason, final, source (estimate|sampler|...|finalist), ran (plan and job run here),
steps, and the claim bookkeeping below (claim, worker, heartbeat, confirmed). Rerunning the same command continues the study; two
processes on one storage share it. A process claims a plan before running it: it writes the
plan's key on its trial, looks for other claims, confirms, and looks again (the lower trial
number wins a tie), so no plan runs twice; a trial left RUNNING by a dead process is failed and
its plan becomes free again.

search.json: name, study_name, storage, mode, objective, config (model, job, plan, cluster,
search), hardware (Hardware.to_dict), memory_limit_bytes, counts of plans, `measured` and
`modelled` (what this run's numbers rest on), and `result` (best plan, its trial, value, Kendall
tau, why the search stopped) once it has one.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import optuna
import pandas as pd
import sqlalchemy
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from autotune.config import PlannerConfig, SearchConfig, planner_config
from autotune.estimate import estimate, estimate_frame, fit_calibration
from autotune.hardware import Hardware, load_hardware
from autotune.local_share import AS_IS, Share, capacity, check_local_gpu, share_here
from autotune.plans import (
    DOMINANCE_MARGIN, PLAN_FIELDS, dominated_by, enumerate_plans, plan_key, plan_keys, row_plan, to_python,
)
from autotune.runner import ProbeRun, run_probe
from autotune.engine.config import ConfigError, PlanConfig, TrainConfig, build_train_config
from autotune.engine.files import write_atomic

MODES = ("auto", "measure", "analytic")
SAMPLERS = ("tpe", "gp", "cmaes", "random", "grid")
OBJECTIVES = ("throughput", "cost", "pareto")
PRUNERS = ("hyperband", "halving", "none")
MEASURED = ("ok", "oom", "error", "timeout", "pruned")  # a plan that ran (to the end or not)
DONE = MEASURED + ("skipped",)  # statuses of a claim: that plan is never run again
# How much faster than its estimate a plan may still turn out: at least this, more if the
# measured trials show the calibrated estimator erring by more.
OPTIMISM_FLOOR = 1.10
STALE_HEARTBEAT_S = 180.0  # a RUNNING trial of another host silent this long is dead
HEARTBEAT_S = 20.0


# --- configuration ---------------------------------------------------------------------------

def resolve_mode(pc: PlannerConfig) -> str:
    if pc.search.mode != "auto":
        return pc.search.mode
    return "measure" if pc.cluster.gpu == "auto" else "analytic"


def check_search(s: SearchConfig, mode: str) -> None:
    if s.mode not in MODES:
        raise ConfigError(f"search.mode={s.mode!r}: use one of {', '.join(MODES)}")
    if s.sampler not in SAMPLERS:
        raise ConfigError(f"search.sampler={s.sampler!r}: use one of {', '.join(SAMPLERS)}")
    if s.objective not in OBJECTIVES:
        raise ConfigError(f"search.objective={s.objective!r}: use one of {', '.join(OBJECTIVES)}")
    if s.pruner not in PRUNERS:
        raise ConfigError(f"search.pruner={s.pruner!r}: use one of {', '.join(PRUNERS)}")
    for key in ("trials", "probe_steps"):
        if getattr(s, key) < 1:
            raise ConfigError(f"search.{key}={getattr(s, key)} must be at least 1")
    if s.warmup_steps < 0 or s.finalists < 0:
        raise ConfigError("search.warmup_steps and search.finalists must be at least 0")
    if s.finalists and s.final_steps <= s.probe_steps:
        raise ConfigError(
            f"search.final_steps={s.final_steps} must exceed search.probe_steps={s.probe_steps} "
            "(finalists run longer); or set search.finalists=0"
        )
    if s.trial_timeout_s <= 0:
        raise ConfigError(f"search.trial_timeout_s={s.trial_timeout_s} must be positive")
    if mode == "measure" and s.sampler in ("gp", "cmaes"):
        needs = {"gp": "scipy", "cmaes": "cmaes"}[s.sampler]
        try:
            __import__(needs)
        except ImportError:
            raise ConfigError(
                f"search.sampler={s.sampler} needs the {needs} package, which is not installed; "
                "use tpe, random or grid"
            )


def supported_precisions(hw: Hardware) -> list[str]:
    """Dtypes the device trains in: a CPU does fp32 and bf16; a GPU fp32, fp16, and bf16 where it
    has bf16 units (faster than its fp32: not on a V100, which only emulates it)."""
    if hw.device == "cpu":
        return ["fp32", "bf16"]
    flops = hw.peak_flops
    return ["fp32", "fp16"] + (["bf16"] if flops.get("bf16", 0) > flops.get("fp32", 0) else [])


def default_name(pc: PlannerConfig) -> str:
    """The same command names the same run (so rerunning it continues the study)."""
    t = pc.train
    return f"{t.model.name}-{pc.cluster.name}-gb{t.job.global_batch}-s{t.job.seq_len}-{pc.search.objective}"


def storage_url(search: SearchConfig, run_dir: Path) -> str:
    if search.storage:
        return search.storage
    return f"sqlite:///{(run_dir / 'study.db').resolve()}"


def _journal_path(url: str) -> Optional[Path]:
    if url.startswith("journal:"):
        return Path(url.split(":", 1)[1].removeprefix("//"))
    if url.endswith((".journal", ".log")) and "://" not in url:
        return Path(url)
    return None


def open_storage(url: str, run_dir: Path) -> Any:
    """An Optuna storage for `url`; an unreachable one is the user's ConfigError."""
    journal = _journal_path(url)
    try:
        if journal is not None:
            path = journal if journal.is_absolute() else run_dir / journal
            if not path.parent.is_dir():
                raise ConfigError(f"search.storage={url}: folder {path.parent} does not exist")
            return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
        kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
        for attempt in range(3):
            try:
                return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
            except sqlalchemy.exc.OperationalError as e:
                if "already exists" not in str(e) or attempt == 2:
                    raise  # not two processes creating the schema at once
                time.sleep(1.0)
    except ConfigError:
        raise
    except Exception as e:  # SQLAlchemy, driver and OS errors all mean: cannot use this storage
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"search.storage={url}: cannot open it ({first}); give a reachable SQLAlchemy URL "
                          "or a .journal file path, or leave it unset for study.db in the run folder")


def check_storage_reachable(url: str) -> None:
    """Before the run folder exists: a user's storage must answer (the default is made later)."""
    journal = _journal_path(url)
    if journal is not None:
        if journal.is_absolute() and not journal.parent.is_dir():
            raise ConfigError(f"search.storage={url}: folder {journal.parent} does not exist")
        return
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        if not path.parent.is_dir():
            raise ConfigError(f"search.storage={url}: folder {path.parent} does not exist")
        return
    try:
        engine = sqlalchemy.create_engine(url)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"search.storage={url}: cannot connect ({first}); give a reachable SQLAlchemy URL, "
                          "a .journal file path, or leave it unset for study.db in the run folder")


# --- the candidate table ---------------------------------------------------------------------

def objective_estimate(frame: pd.DataFrame, objective: str) -> pd.Series:
    """The (first) objective as estimated: tokens/s, or tokens per GPU-second for cost."""
    tps = frame["tokens_per_s"].astype(float)
    if objective == "cost":
        return tps / (frame["dp"] * frame["tp"] * frame["pp"])
    return tps


def objective_measured(metrics: dict[str, Any], world: int, objective: str) -> float | list[float]:
    tps = float(metrics["tokens_per_s"])
    if objective == "cost":
        return tps / world
    if objective == "pareto":
        return [tps, float(metrics["peak_mem_bytes"])]
    return tps


def candidate_table(pc: PlannerConfig, hw: Hardware) -> pd.DataFrame:
    """Every plan with its estimate, `key`, `objective_est`, `dropped` and `why`."""
    plans = enumerate_plans(pc.train, pc.cluster, pc.search, device=hw.device, precisions=supported_precisions(hw))
    frame = estimate_frame(pc.train.model, pc.train.job, plans, hw)
    frame["objective_est"] = objective_estimate(frame, pc.search.objective)
    fits = frame["fits"].astype(bool)
    frame["dropped"] = np.where(fits, "", "does not fit")
    frame["why"] = np.where(fits, "", frame["reason"].astype(str))
    # over GPU memory (not host memory): only the figures that differ between plans, and the part to shrink
    over = ~fits & (frame["mem_total_bytes"] > hw.memory_bytes)
    if over.any():
        parts = [c for c in frame.columns if c.startswith("mem_") and c.endswith("_bytes") and c != "mem_total_bytes"]
        largest = pd.Series(np.array([c[4:-6] for c in parts])[frame.loc[over, parts].to_numpy().argmax(axis=1)],
                            index=frame.index[over])
        need = (frame.loc[over, "mem_total_bytes"] / 2**30).map("{:.2f}".format)
        frame.loc[over, "why"] = need + f" GiB/GPU > {hw.memory_bytes / 2**30:.2f}; largest: " + largest
    if pc.search.use_estimator and fits.any():
        by = dominated_by(frame[fits], throughput="objective_est")
        by = by[by >= 0]
        frame.loc[by.index, "dropped"] = "dominated"
        # only the part that differs from row to row (report.md says what "dominated" means)
        frame.loc[by.index, "why"] = "by plan " + by.astype(str)
    frame["key"] = plan_keys(frame)
    return frame


def nothing_fits_message(frame: pd.DataFrame, pc: PlannerConfig, hw: Hardware) -> str:
    gib = 2**30
    in_gpu = frame[frame["mem_total_bytes"].astype(float) <= hw.memory_bytes]
    if not in_gpu.empty:  # they fit in GPU memory by offloading, but the host cannot hold what they offload
        small = in_gpu.loc[in_gpu["host_bytes"].astype(float).idxmin()]
        return (f"no plan fits on {pc.cluster.name}: the plans that fit in GPU memory "
                f"({hw.memory_bytes / gib:.1f} GiB) offload to the host, and the one needing least, "
                f"{describe(row_plan(small))}, needs {float(small['host_bytes']) / gib:.1f} GiB of host memory per "
                f"node, has {hw.host_memory_bytes / gib:.1f} GiB; what would help: more GPUs than {pc.cluster.n_gpus} "
                f"(model states shard over data parallelism), or more host memory (cluster.host_memory_gb)")
    small = frame.loc[frame["mem_total_bytes"].astype(float).idxmin()]
    plan = row_plan(small)
    parts = {c[4:-6]: float(small[c]) for c in frame.columns
             if c.startswith("mem_") and c.endswith("_bytes") and c != "mem_total_bytes"}
    top = sorted(parts.items(), key=lambda kv: -kv[1])[:3]
    helps = []
    if not (plan["offload_params"] or plan["offload_optimizer"]):
        helps.append("ZeRO-3 with offload to host memory")
    helps.append(f"more GPUs than {pc.cluster.n_gpus} (model states shard over data parallelism)")
    helps.append(f"a shorter job.seq_len than {pc.train.job.seq_len} or a smaller global batch")
    if "bf16" not in pc.search.precisions and "bf16" in supported_precisions(hw):
        helps.append("allowing bf16 in search.precisions")
    return (
        f"no plan fits on {pc.cluster.name} ({hw.memory_bytes / gib:.1f} GiB per device): the smallest, "
        f"{describe(plan)}, needs {float(small['mem_total_bytes']) / gib:.2f} GiB "
        f"(largest parts: {', '.join(f'{k} {v / gib:.2f} GiB' for k, v in top)}); "
        f"what would help: {'; '.join(helps)}"
    )


def describe(plan: dict[str, Any]) -> str:
    """A short human name of a plan."""
    bits = [f"zero{plan['zero_stage']}"]
    if plan["offload_optimizer"] or plan["offload_params"]:
        bits.append("offload-" + "+".join(k for k, v in (("opt", plan["offload_optimizer"]),
                                                          ("params", plan["offload_params"])) if v))
    bits.append(f"mb{plan['micro_batch']}x{plan.get('grad_accum')}")
    bits.append(plan["precision"])
    ac = plan["activation_checkpointing"]
    if ac != "none":
        bits.append(f"ckpt-{ac}" + (f"/{plan['checkpoint_every_k']}" if ac == "selective" else ""))
    bits.append(f"dp{plan['dp']}tp{plan['tp']}pp{plan['pp']}")
    if plan["pp"] > 1:
        bits.append(plan["pp_schedule"] + (f"/v{plan['pp_virtual_stages']}" if plan["pp_virtual_stages"] > 1 else ""))
    if plan["sequence_parallel"]:
        bits.append("sp")
    if plan["kernels"] != "torch":
        bits.append(plan["kernels"])
    return " ".join(bits)


# Estimator internals a reader of candidates.csv does not need: `reason` repeats `why`, the rest
# are derived from (or feed) the columns kept.
NOT_IN_CANDIDATES = ("key", "objective_est", "reason", "allocated_bytes", "step_grads_bytes", "matmul_s", "memory_bound_s",
                     "compute_matmul_s", "compute_attention_s", "compute_memory_s")


def significant(values: pd.Series, digits: int = 5) -> pd.Series:
    """`values` rounded to `digits` significant digits (the estimate is not more precise), so that
    they print short without a per-value float format (10^5 rows)."""
    x = values.to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = 10.0 ** (digits - 1 - np.floor(np.log10(np.abs(x))))
        out = np.where(np.isfinite(scale), np.round(x * scale) / scale, x)
    return pd.Series(out, index=values.index)


def write_candidates(path: Path, frame: pd.DataFrame) -> None:
    """Every plan, one row each, numbered by `plan_id` (what `why` = "by plan N" refers to).

    Written with the csv module from Python values (repr of the rounded floats): the same text as
    DataFrame.to_csv, in about half the time for 10^5 plans."""
    table = frame[[c for c in frame.columns if c not in NOT_IN_CANDIDATES]]
    table = table.assign(**{c: significant(table[c]) for c in table.columns if table[c].dtype.kind == "f"
                            and not c.endswith("_bytes")})
    table = table.astype({c: "int64" for c in table.columns if c.endswith("_bytes") and table[c].notna().all()})
    table.insert(0, "plan_id", frame.index)
    # missing values as empty cells, as pandas writes them (not "nan")
    columns = [table[c].astype(object).where(table[c].notna(), None) if table[c].hasnans else table[c]
               for c in table.columns]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(table.columns)
    writer.writerows(zip(*(c.tolist() for c in columns)))
    write_atomic(path, buf.getvalue())


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


# --- claims: one plan, one run, across processes ----------------------------------------------

WORKER = {"host": socket.gethostname(), "pid": os.getpid()}


def _alive(t: FrozenTrial) -> bool:
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
        if t.user_attrs.get("worker") and not _alive(t):
            claimed = bool(t.user_attrs.get("claim"))
            try:
                study._storage.set_trial_user_attr(t._trial_id, "claim", None)
                study._storage.set_trial_user_attr(t._trial_id, "status", "error" if claimed else "skipped")
                study._storage.set_trial_user_attr(
                    t._trial_id, "reason", "interrupted: the search process running it died; its plan is free again")
                study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
                n += 1
            except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
                pass  # another process failed it first
    return n


def _live_claims(study: optuna.Study, claim: str, me: int) -> list[FrozenTrial]:
    out = []
    for t in study.get_trials(deepcopy=False):
        if t.number == me or t.user_attrs.get("claim") != claim:
            continue
        if t.state == TrialState.RUNNING and _alive(t):
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


# --- the measured search ---------------------------------------------------------------------

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


def kendall_tau(a: list[float], b: list[float]) -> Optional[float]:
    """Kendall's tau-b of two rankings of the same items (ties count on neither side)."""
    n = len(a)
    if n < 2:
        return None
    concordant = discordant = ties_a = ties_b = 0
    for i in range(n):
        for j in range(i + 1, n):
            da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif da == db:
                concordant += 1
            else:
                discordant += 1
    denom = math.sqrt((concordant + discordant + ties_a) * (concordant + discordant + ties_b))
    return (concordant - discordant) / denom if denom else None


class Search:
    """One search process working on one study (several may share it)."""

    def __init__(self, pc: PlannerConfig, run_dir: Path, name: str, hw: Hardware, frame: pd.DataFrame,
                 storage: Any):
        self.pc, self.s, self.run_dir, self.name, self.hw = pc, pc.search, run_dir, name, hw
        self.frame = frame
        self.pool = frame[frame["dropped"] == ""] if self.s.use_estimator else frame
        # A trial runs on at most `cap` ranks here (the GPUs of the cluster's kind on this
        # machine); of a larger plan it runs a share and the estimator models the rest.
        self.cap = capacity(pc.cluster, pc.search)
        self.hw_here = dataclasses.replace(hw, nodes=1, gpus_per_node=self.cap)
        self.whole_here = pc.cluster.n_gpus <= self.cap
        # One categorical parameter per plan field that varies among the valid plans (grad_accum
        # follows from the others). Taken over all valid plans, not the candidates, because those
        # depend on the measured hardware: every process on the study must see one search space.
        self.space = {k: CategoricalDistribution(sorted(frame[k].map(to_python).unique().tolist(), key=str))
                      for k in PLAN_FIELDS if k != "grad_accum" and frame[k].nunique() > 1}
        directions = ["maximize", "minimize"] if self.s.objective == "pareto" else ["maximize"]
        self.study = optuna.create_study(study_name=name, storage=storage, directions=directions,
                                         sampler=make_sampler(self.s, self.space), pruner=make_pruner(self.s),
                                         load_if_exists=True)
        self.calib = None
        self.calibrated_on = -1
        self.started = time.monotonic()
        self.trial_seconds: list[float] = []
        self.stopped = ""

    # -- bookkeeping over the study's trials

    def trials(self) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False)

    def claimed_keys(self, final: bool) -> set[str]:
        prefix = "final:" if final else ""
        keys = set()
        for t in self.trials():
            c = t.user_attrs.get("claim")
            if not c or not c.startswith(prefix) or (not final and c.startswith("final:")):
                continue
            if t.state == TrialState.RUNNING or t.user_attrs.get("status") in DONE:
                keys.add(c[len(prefix):])
        return keys

    def measured(self, final: bool = False) -> list[FrozenTrial]:
        return [t for t in self.trials() if t.state.is_finished() and t.user_attrs.get("status") in MEASURED
                and bool(t.user_attrs.get("final")) == final and t.user_attrs.get("claim")]

    def spent(self) -> int:
        """Short trials that count against search.trials: those that ran a probe (not a reused share)."""
        return sum(1 for t in self.measured() if t.user_attrs.get("reused") is None)

    def ok(self, final: bool = False) -> list[FrozenTrial]:
        return [t for t in self.measured(final) if t.user_attrs.get("status") == "ok"]

    def best_value(self) -> Optional[float]:
        values = [t.values[0] for t in self.ok() if t.values]
        return max(values) if values else None

    # -- the estimator, recalibrated on what was measured

    def recalibrate(self) -> None:
        ok = self.ok() + self.ok(final=True)
        if not self.s.use_estimator or len(ok) == self.calibrated_on or not ok:
            return
        model = dataclasses.asdict(self.pc.train.model)
        # calibrate on what ran here: the plan, or its share of a larger cluster
        records = [{"plan": t.user_attrs["ran"]["plan"], "model": t.user_attrs["ran"].get("model", model),
                    "job": t.user_attrs["ran"]["job"], "step_time_s": t.user_attrs["probe"]["step_time_s"],
                    "peak_mem_bytes": t.user_attrs["probe"]["peak_mem_bytes"]} for t in ok]
        self.calib = fit_calibration(records, self.hw_here)
        est = estimate_frame(self.pc.train.model, self.pc.train.job, self.pool[list(PLAN_FIELDS)], self.hw, self.calib)
        self.pool = self.pool.assign(objective_est=objective_estimate(est, self.s.objective).to_numpy(),
                                     tokens_per_s=est["tokens_per_s"].to_numpy(),
                                     mem_total_bytes=est["mem_total_bytes"].to_numpy())
        self.calibrated_on = len(ok)

    def optimism(self) -> float:
        """How far the calibrated estimate has underestimated a measured trial (at least the floor)."""
        ratios = []
        by_key = self.pool.set_index("key")["objective_est"]
        for t in self.ok():
            est = by_key.get(t.user_attrs.get("claim"))
            if est and t.values:
                ratios.append(t.values[0] / float(est))
        return max([OPTIMISM_FLOOR, *ratios])

    # -- choosing and running

    def remaining(self) -> pd.DataFrame:
        return self.pool[~self.pool["key"].isin(self.claimed_keys(final=False))]

    def plan_of(self, trial: optuna.Trial) -> dict[str, Any]:
        fixed = self.frame.iloc[0]
        plan = {k: to_python(fixed[k]) for k in PLAN_FIELDS}
        plan.update({k: trial.suggest_categorical(k, d.choices) for k, d in self.space.items()})
        plan["grad_accum"] = self.pc.train.job.global_batch // (plan["micro_batch"] * plan["dp"])
        return canonical(plan)

    def nearest(self, plan: dict[str, Any], rest: pd.DataFrame) -> pd.Series:
        """The plan of `rest` that differs from `plan` in the fewest fields; ties go to the best
        estimate (or, without the estimator, to a seeded random one)."""
        distance = sum((rest[k].map(to_python) != plan[k]).astype(int) for k in self.space)
        tie = -rest["objective_est"] if self.s.use_estimator else pd.Series(
            np.random.default_rng(self.s.seed + len(self.trials())).random(len(rest)), index=rest.index)
        order = pd.DataFrame({"d": distance, "t": tie}).sort_values(["d", "t"], kind="stable")
        return rest.loc[order.index[0]]

    def guided_turn(self, n_measured: int) -> bool:
        if not self.s.use_estimator:
            return False
        seeds = max(1, self.s.trials // 3)
        return n_measured < seeds or (n_measured - seeds) % 2 == 0

    def oom_ceiling(self) -> Optional[float]:
        """The smallest estimated memory of a plan that ran out of memory here: plans estimated to
        need as much are not worth a trial (the estimate was too low for this device)."""
        sizes = [t.user_attrs["estimate"]["memory"]["total_bytes"] for t in self.measured() + self.measured(True)
                 if t.user_attrs.get("status") == "oom" and t.user_attrs.get("estimate")]
        return min(sizes) if sizes and self.whole_here else None  # a share's estimate is not the plan's

    def hopeful(self, rest: pd.DataFrame) -> pd.DataFrame:
        """The plans of `rest` that may still fit and whose optimistic estimate can beat the best
        measured one."""
        if not self.s.use_estimator:
            return rest
        ceiling = self.oom_ceiling()
        if ceiling is not None:
            rest = rest[rest["mem_total_bytes"] < ceiling]
        best = self.best_value()
        if best is None or self.s.objective == "pareto":
            return rest
        return rest[rest["objective_est"] * self.optimism() >= best]

    def why_not_hopeful(self, row: pd.Series) -> str:
        ceiling = self.oom_ceiling()
        if ceiling is not None and row["mem_total_bytes"] >= ceiling:
            return (f"not run: estimated to need {row['mem_total_bytes'] / 2**20:,.0f} MiB, as much as a plan that "
                    "ran out of memory here")
        return (f"not run: its optimistic estimate ({self.optimism():.2f} x {_rate(row['objective_est'])}) "
                f"cannot beat the best measured {_rate(self.best_value() or 0)}")

    def ask(self) -> tuple[optuna.Trial, dict[str, Any], bool, str]:
        """The study's next trial (a queued plan, or the sampler's proposal) with its plan and role."""
        trial = self.study.ask()
        trial.set_user_attr("worker", WORKER)
        source = trial.user_attrs.get("source", "sampler")
        return trial, self.plan_of(trial), source == "finalist", source

    def next_trial(self) -> Optional[tuple[optuna.Trial, dict[str, Any], bool, str]]:
        """The next trial to run and its plan; None when nothing left is worth running."""
        rest = self.remaining()
        if rest.empty:
            self.stopped = "every candidate plan has been run"
            return None
        hopeful = self.hopeful(rest)
        if hopeful.empty:
            ceiling = self.oom_ceiling()
            too_big = int((rest["mem_total_bytes"] >= ceiling).sum()) if ceiling is not None else 0
            parts = []
            if too_big:
                parts.append(f"{too_big} need as much memory as a plan that ran out of it")
            if len(rest) > too_big:
                parts.append(f"{len(rest) - too_big} have an optimistic estimate (x{self.optimism():.2f}) below the "
                             f"best measured {_rate(self.best_value())}")
            if len(parts) == 1:
                parts[0] = "all " + parts[0]
            self.stopped = (f"no plan left can beat the best measured one: of the {len(rest)} plans left, "
                            + " and ".join(parts))
            return None
        if self.guided_turn(len(self.measured())):
            top = row_plan(hopeful.sort_values("objective_est", ascending=False, kind="stable").iloc[0])
            self.study.enqueue_trial({k: top[k] for k in self.space}, user_attrs={"source": "estimate"})
        hopeful_keys, rest_keys = set(hopeful["key"]), set(rest["key"])
        # A proposal that is not a plan worth running is closed and its nearest candidate queued;
        # with several workers on one study another may take that queued trial first, so ask again.
        for _ in range(MAX_PROPOSALS):
            trial, plan, final, source = self.ask()
            key = plan_key(plan)
            if final or key in hopeful_keys:
                return trial, plan, final, source
            if key in rest_keys:
                self.tell_skipped(trial, plan, TrialState.PRUNED, self.why_not_hopeful(rest.set_index("key").loc[key]),
                                  claim_key=key)
            else:
                self.tell_skipped(trial, plan, TrialState.FAIL,
                                  "proposal is not a candidate (invalid, does not fit, dominated or already run); "
                                  "the nearest candidate still to run was queued instead")
            # every trial's params are the plan it ran: the replacement is a trial of its own
            near = row_plan(self.nearest(plan, hopeful))
            self.study.enqueue_trial({k: near[k] for k in self.space}, user_attrs={"source": "sampler (nearest)"})
        self.stopped = f"{MAX_PROPOSALS} proposals in a row were not plans worth running"
        return None

    def tell_skipped(self, trial: optuna.Trial, plan: dict[str, Any], state: TrialState, reason: str,
                     claim_key: Optional[str] = None) -> None:
        """Close a trial that does not run; with `claim_key` its plan counts as decided (never run)."""
        for k, v in {"plan": plan, "estimate": None, "probe": None, "status": "skipped", "reason": reason,
                     "final": False, "claim": claim_key}.items():
            trial.set_user_attr(k, v)
        self.study.tell(trial, state=state)

    def train_config(self, plan: dict[str, Any]) -> TrainConfig:
        return build_train_config({"model": dataclasses.asdict(self.pc.train.model),
                                   "job": dataclasses.asdict(self.pc.train.job),
                                   "plan": {**plan, "grad_accum": None}})

    def run_trial(self, trial: optuna.Trial, plan: dict[str, Any], final: bool, source: str) -> None:
        key = ("final:" if final else "") + plan_key(plan)
        why_not = claim(self.study, trial, key)
        if why_not:
            self.tell_skipped(trial, plan, TrialState.FAIL, why_not)
            return
        steps = self.s.final_steps if final else self.s.probe_steps
        train = self.train_config(plan)
        share = share_here(train, self.cap, self.pc.cluster.gpus_per_node, self.hw_here, self.calib)
        here = share.train
        est_here = estimate(here, self.hw_here, self.calib)
        # the estimator carries what ran here to the whole plan (1 when they are the same)
        est_full = estimate(train, self.hw, self.calib) if share.kind != AS_IS else est_here
        time_scale = est_full.step_time_s / est_here.step_time_s
        mem_scale = est_full.memory["total_bytes"] / est_here.memory["total_bytes"]
        # `estimate` is the plan's (what the scaled measurement is compared with); `ran` what ran here
        ran = {"plan": dataclasses.asdict(here.plan), "job": dataclasses.asdict(here.job),
               "model": dataclasses.asdict(here.model), "kind": share.kind, "note": share.note}
        if share.kind != AS_IS:
            ran["estimate"] = est_here.to_dict()
        attrs = {"plan": dataclasses.asdict(train.plan), "estimate": est_full.to_dict(), "final": final,
                 "source": source, "ran": ran}
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        # plans that differ only in what the estimator models (the pipeline schedule, say) run
        # the same share: measure it once and scale it for each
        same = same_share(self.trials(), ran, steps) if share.kind != AS_IS else None
        if same is not None:
            trial.set_user_attr("reused", same.number)
            run = ProbeRun("ok", same.user_attrs["probe"], f"not rerun: trial {same.number} measured the same share", 0.0)
            self.record(trial, run, steps, train, share, time_scale, mem_scale, plan, final)
            return
        world = train.plan.world_size
        tokens_per_step = train.job.global_batch * train.job.seq_len
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

        run = run_probe(here, self.run_dir / "trials" / f"{trial.number}", steps=steps,
                        warmup=self.s.warmup_steps, timeout_s=self.s.trial_timeout_s,
                        memory_cap_bytes=self.s.trial_memory_cap_bytes, on_progress=on_progress,
                        on_poll=on_poll, log_path=self.run_dir / "logs" / f"trial-{trial.number}.log")
        self.trial_seconds.append(run.wall_s)
        self.record(trial, run, steps, train, share, time_scale, mem_scale, plan, final)

    def record(self, trial: optuna.Trial, run: ProbeRun, steps: int, train: TrainConfig, share: Share,
               time_scale: float, mem_scale: float, plan: dict[str, Any], final: bool) -> None:
        """Tell the study what `run` measured of `share` (scaled to the plan when a share ran)."""
        trial.set_user_attr("probe", run.metrics)
        trial.set_user_attr("status", run.status)
        trial.set_user_attr("reason", run.reason)
        trial.set_user_attr("steps", steps)
        if run.status == "ok":
            result = run.metrics
            if share.kind != AS_IS:
                step = run.metrics["step_time_s"] * time_scale
                result = {"step_time_s": step, "tokens_per_s": train.job.global_batch * train.job.seq_len / step,
                          "peak_mem_bytes": run.metrics["peak_mem_bytes"] * mem_scale}
                trial.set_user_attr("scaled", {
                    "measured": f"{share.kind}: {share.note}",
                    "modelled": "x estimate(whole plan on the cluster) / estimate(what ran here)",
                    "time_scale": time_scale, "mem_scale": mem_scale, **result})
            self.study.tell(trial, objective_measured(result, train.plan.world_size, self.s.objective))
        elif run.status == "pruned":
            self.study.tell(trial, state=TrialState.PRUNED)
        else:
            self.study.tell(trial, state=TrialState.FAIL)
        self.progress(trial.number, run.status, plan, final)

    def progress(self, number: int, status: str, plan: dict[str, Any], final: bool) -> None:
        """One line on stderr per trial: what ran, trials done, best so far, time spent and left."""
        done, best = self.spent(), self.best_value()
        per = float(np.mean(self.trial_seconds)) if self.trial_seconds else 0.0
        finals_left = max(0, self.s.finalists - len(self.measured(final=True)))
        shorts_left = 0 if self.stopped else max(0, self.s.trials - done)  # explore() ended early: none
        left = (shorts_left + finals_left * self.s.final_steps / self.s.probe_steps) * per
        unit = "tokens/GPU-s" if self.s.objective == "cost" else "tokens/s"
        best_text = f"best {_rate(best)} {unit}" if best is not None else "no result yet"
        width = min(self.s.trials, 20)
        bar = "#" * (min(done, self.s.trials) * width // self.s.trials)
        print(f"[search] trial {number}{' (final)' if final else ''} {status}: {describe(plan)} | "
              f"[{bar:.<{width}}] {done}/{self.s.trials} run, {best_text} | "
              f"{_clock(time.monotonic() - self.started)} elapsed, "
              f"~{_clock(left)} left", file=sys.stderr, flush=True)

    def explore(self) -> None:
        """Run short trials until the budget is spent or nothing left is worth running."""
        skips = 0
        while self.spent() < self.s.trials:
            fail_stale_trials(self.study)
            self.recalibrate()
            nxt = self.next_trial()
            if nxt is None:
                break
            trial, plan, final, source = nxt
            before = len(self.measured())
            self.run_trial(trial, plan, final=final, source=source)
            skips = skips + 1 if len(self.measured()) == before else 0
            if skips > 4 * self.s.trials:  # claims keep losing races: the others are covering it
                self.stopped = "other search processes hold the remaining plans"
                break
        else:
            self.stopped = f"search.trials={self.s.trials} trials run"

    def others_running(self) -> list[FrozenTrial]:
        """Short trials another live process is still running."""
        return [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if t.user_attrs.get("claim") and not t.user_attrs.get("final") and _alive(t)]

    def finals(self) -> None:
        """Rerun the best short trials with search.final_steps (once, whoever gets there first)."""
        # every process must rank the same finished short runs, or each would pick its own finalists
        deadline = time.monotonic() + self.s.trial_timeout_s
        while self.s.finalists and self.others_running() and time.monotonic() < deadline:
            time.sleep(1.0)
        ranked = sorted(self.ok(), key=lambda t: -t.values[0])[: self.s.finalists]
        for short in ranked:
            plan = short.user_attrs["plan"]
            for _ in range(3):  # a queued trial of another process may come out first: run it, retry
                if plan_key(plan) in self.claimed_keys(final=True):
                    break
                self.study.enqueue_trial({k: plan[k] for k in self.space}, user_attrs={"source": "finalist"})
                trial, got, final, source = self.ask()
                self.run_trial(trial, got, final=final, source=source)

    def result(self) -> dict[str, Any]:
        """The chosen plan (best long run, else best short run) and how well short runs ranked."""
        finals = {t.user_attrs["claim"][len("final:"):]: t for t in self.ok(final=True)}
        shorts = {t.user_attrs["claim"]: t for t in self.ok()}
        pairs = [(shorts[k].values[0], f.values[0]) for k, f in finals.items() if k in shorts]
        tau = kendall_tau([p[0] for p in pairs], [p[1] for p in pairs])
        pool = list(finals.values()) or list(shorts.values())
        if not pool:
            return {"best": None, "kendall_tau": tau, "stopped": self.stopped}
        best = max(pool, key=lambda t: t.values[0])
        ran = best.user_attrs.get("ran") or {}
        source = (f"measured in part ({ran.get('kind')}: {ran.get('note')}), scaled to the cluster by the estimator"
                  if best.user_attrs.get("scaled") else "measured")
        return {
            "best": {"trial": best.number, "plan": best.user_attrs["plan"], "value": best.values[0],
                     "values": best.values, "final": bool(best.user_attrs.get("final")),
                     "source": source, "describe": describe(best.user_attrs["plan"])},
            "kendall_tau": tau,
            "kendall_pairs": len(pairs),
            "stopped": self.stopped,
        }


def same_share(trials: list[FrozenTrial], ran: dict[str, Any], steps: int) -> Optional[FrozenTrial]:
    """A trial that measured exactly the share `ran` (plan, job and model that ran here) for as many
    steps, without error; None if there is none."""
    want = json.loads(json.dumps({k: ran[k] for k in ("plan", "job", "model")}))  # as the storage holds it
    for t in trials:
        got = t.user_attrs.get("ran") or {}
        if (t.state == TrialState.COMPLETE and t.user_attrs.get("status") == "ok" and t.user_attrs.get("steps") == steps
                and t.user_attrs.get("reused") is None and {k: got.get(k) for k in want} == want):
            return t
    return None


def canonical(plan: dict[str, Any]) -> dict[str, Any]:
    """Fields that mean nothing in a plan take their default (every k-th block without selective
    checkpointing, a schedule without pipelining, sequence parallelism without tp), so that the
    sampler's proposals name the plan they mean; the enumeration writes plans this way."""
    default = PlanConfig()
    plan = dict(plan)
    if plan["activation_checkpointing"] != "selective":
        plan["checkpoint_every_k"] = default.checkpoint_every_k
    if plan["pp"] == 1:
        plan["pp_schedule"], plan["pp_virtual_stages"] = default.pp_schedule, default.pp_virtual_stages
    if plan["tp"] == 1:
        plan["sequence_parallel"] = False
    return plan


def _rate(value: float) -> str:
    """A throughput as people read it: 10,258 rather than 1.026e+04."""
    return f"{float(value):,.0f}" if abs(float(value)) >= 100 else f"{float(value):.3g}"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"


# --- the command -----------------------------------------------------------------------------

MAX_PROPOSALS = 50  # sampler proposals in a row that are not runnable before the search gives up
ANALYTIC_TIE = 0.01  # plans estimated this close to the fastest count as ties


def analytic_result(frame: pd.DataFrame) -> dict[str, Any]:
    pool = frame[frame["dropped"] == ""]
    value = pool["objective_est"].astype(float)
    # The estimate cannot rank plans within ~1% of each other; among those, take the simplest to
    # run (no pipeline, then no tensor parallel, no offload), then the most memory headroom, which
    # protects the choice against the estimate's error.
    close = pool[value >= value.max() * (1 - ANALYTIC_TIE)].assign(
        offload=lambda f: f["offload_optimizer"].astype(bool) | f["offload_params"].astype(bool),
        mem=lambda f: f["mem_total_bytes"].astype(float))
    best = pool.loc[close.sort_values(["pp", "tp", "offload", "mem"], kind="stable").index[0]]
    plan = row_plan(best)
    return {"best": {"trial": None, "plan": plan, "value": float(best["objective_est"]), "final": False,
                     "source": "estimate", "describe": describe(plan),
                     "estimate": {k: to_python(best[k]) for k in frame.columns
                                  if k not in PLAN_FIELDS and k not in ("key", "dropped", "why")}},
            "kendall_tau": None,
            "stopped": f"analytic mode: ranked by the estimator alone; of the plans estimated within "
                       f"{ANALYTIC_TIE:.0%} of the fastest, the simplest (no pp, no tp, no offload), then the one "
                       "that needs the least memory"}


def measured_vs_modelled(mode: str, pc: PlannerConfig, hw: Hardware) -> tuple[str, str]:
    if mode == "analytic":
        return ("nothing: no trial was run",
                "everything: memory and step time of every plan come from the estimator "
                f"(autotune.estimate) for {pc.cluster.n_gpus} x {pc.cluster.gpu}")
    cap = capacity(pc.cluster, pc.search)
    device = "this machine" if pc.cluster.gpu == "auto" else f"this machine's {hw.gpu} (the cluster's GPU)"
    if pc.cluster.n_gpus <= cap:
        return ("step time, tokens/s and peak memory of every trial, run as is on this machine "
                f"({pc.cluster.n_gpus} rank(s) of the local device)",
                "the ranking of plans not run: the estimator, recalibrated on the measured trials")
    return (f"each trial's share of its plan, on at most {cap} rank(s) of {device}: the plan as is when it "
            "fits; else its tp x pp with as many data-parallel replicas as fit; else one rank's share on one "
            "device (its pipeline stage's layers, each matmul as one tensor-parallel rank holds it, fewer layers "
            "where one rank's unsharded states do not fit), always with the plan's micro-batch and "
            "accumulation: step time and peak memory",
            f"what did not run here, for {pc.cluster.n_gpus} GPU(s) in {pc.cluster.nodes} node(s): data-, tensor- "
            "and pipeline-parallel communication beyond what ran, the pipeline bubble, ZeRO states sharded over "
            "more ranks, layers left out; each trial's figures are scaled by the estimator's ratio of the whole "
            "plan to what ran (the trial's `ran` and `scaled`); the ranking of plans not run is the estimator, "
            "recalibrated on the measured trials")


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="autotune search", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="run folder (default: outputs/<name>)")
    parser.add_argument("--name", default=None, help="run and study name (default: from model, cluster, job)")
    args, overrides = parser.parse_known_args(argv)
    unknown = [a for a in overrides if a.startswith("-")]
    if unknown:
        raise ConfigError(f"unknown flag(s) {unknown}; autotune search takes --out DIR, --name NAME and key=value")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.monotonic()

    pc = planner_config(overrides)
    mode = resolve_mode(pc)
    check_search(pc.search, mode)
    name = args.name or (Path(args.out).name if args.out else default_name(pc))
    run_dir = Path(args.out) if args.out else Path("outputs") / name
    if pc.search.storage:
        check_storage_reachable(pc.search.storage)
    previous = _read_json(run_dir / "search.json")
    if previous and not _same_job(previous, pc):
        raise ConfigError(f"{run_dir} holds a search of another model, job, cluster or objective; "
                          "give another --out or --name")

    hw = load_hardware(pc.cluster)
    if mode == "measure":
        capacity(pc.cluster, pc.search)  # search.local_devices is checked before anything is written
        if pc.cluster.gpu != "auto":
            check_local_gpu(pc.cluster, hw)
    frame = candidate_table(pc, hw)
    if not frame["fits"].astype(bool).any():
        raise ConfigError(nothing_fits_message(frame, pc, hw))

    # Everything is validated: from here on the run folder is written.
    run_dir.mkdir(parents=True, exist_ok=True)
    url = storage_url(pc.search, run_dir)
    measured, modelled = measured_vs_modelled(mode, pc, hw)
    info = {
        "name": name, "study_name": name, "storage": url, "mode": mode, "objective": pc.search.objective,
        "config": {"model": dataclasses.asdict(pc.train.model), "job": dataclasses.asdict(pc.train.job),
                   "plan": dataclasses.asdict(pc.train.plan), "cluster": dataclasses.asdict(pc.cluster),
                   "search": dataclasses.asdict(pc.search)},
        "hardware": hw.to_dict(), "memory_limit_bytes": hw.memory_bytes,
        "plans": {"enumerated": len(frame), "fit": int(frame["fits"].astype(bool).sum()),
                  "candidates": int((frame["dropped"] == "").sum()),
                  "dominated": f"dominated by plan N: plan N fits in no more memory and is estimated at least "
                               f"{DOMINANCE_MARGIN:.0%} faster"},
        "measured": measured, "modelled": modelled,
    }
    write_candidates(run_dir / "candidates.csv", frame)
    _write_profile(run_dir, pc, hw)
    write_json(run_dir / "search.json", {**info, "result": previous.get("result")})

    if mode == "analytic":
        result = analytic_result(frame)
    else:
        search = Search(pc, run_dir, name, hw, frame, open_storage(url, run_dir))
        search.explore()
        search.finals()
        result = search.result()
    info["result"] = result
    info["elapsed_s"] = round(time.monotonic() - started, 2)
    write_json(run_dir / "search.json", info)
    return _finish(run_dir, pc, result)


def _finish(run_dir: Path, pc: PlannerConfig, result: dict[str, Any]) -> int:
    from autotune.emit import write_outputs
    from autotune.reports import build_report

    best = result.get("best")
    if best is not None:
        plan = {**best["plan"], "grad_accum": None}
        cfg = build_train_config({"model": dataclasses.asdict(pc.train.model),
                                  "job": dataclasses.asdict(pc.train.job), "plan": plan})
        write_outputs(run_dir, cfg, pc.cluster)
    build_report(run_dir)
    if best is None:
        print(f"error: no trial ran successfully ({result.get('stopped')}); see {run_dir / 'report.md'}",
              file=sys.stderr)
        return 1
    unit = "tokens/GPU-s" if pc.search.objective == "cost" else "tokens/s"
    how = {"measured": "measured", "estimate": "estimated"}.get(best["source"], "measured in part, scaled by the estimator")
    print(f"best: {best['describe']} ({how} {_rate(best['value'])} {unit})")
    print(f"wrote {run_dir}/best.yaml, ds_config.json, launch.sh, report.md")
    return 0


def _same_job(previous: dict[str, Any], pc: PlannerConfig) -> bool:
    cfg = previous.get("config", {})
    return (cfg.get("model") == json.loads(json.dumps(dataclasses.asdict(pc.train.model)))
            and cfg.get("job") == json.loads(json.dumps(dataclasses.asdict(pc.train.job)))
            and cfg.get("cluster") == json.loads(json.dumps(dataclasses.asdict(pc.cluster)))
            and cfg.get("search", {}).get("objective") == pc.search.objective)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_profile(run_dir: Path, pc: PlannerConfig, hw: Hardware) -> None:
    from autotune.profile import model_profile

    prof = model_profile(pc.train.model, pc.train.job.seq_len, 1)
    prof["hardware"] = hw.to_dict()
    prof["cluster"] = dataclasses.asdict(pc.cluster)
    write_json(run_dir / "profile.json", prof)
