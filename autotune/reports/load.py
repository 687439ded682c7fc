"""Read a run folder (search.json, the Optuna study, candidates.csv, best.yaml) into tables.

One row per trial: the plan the trial ran, the estimator's prediction for it (`est_*`) and what the
probe measured (`meas_*`). Estimates are flattened with the same column names as candidates.csv
(`mem_<component>_bytes`, `mem_total_bytes`, `time_<component>_s`, `step_time_s`, ...).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import optuna
import pandas as pd
from omegaconf import OmegaConf

from autotune.engine.config import PLAN_FIELDS, ConfigError
from autotune.estimate.columns import flat_estimate
from autotune.plans import plan_values
from autotune.search.record import TrialRecord
from autotune.storage import hide_secrets, open_storage, sqlite_path

# grad_accum is derived from the others; two records of one plan may differ only in whether it is filled.
PLAN_KEY = [f for f in PLAN_FIELDS if f != "grad_accum"]
PROBE_FIELDS = ("step_time_s", "tokens_per_s", "tflops_per_gpu", "mfu", "peak_mem_bytes", "reserved_bytes")
FAILED = ("oom", "error", "timeout")


@dataclass
class Run:
    """Everything a report is built from."""

    run_dir: Path
    search: dict[str, Any]
    trials: pd.DataFrame  # one row per trial; empty for an analytic run without a study
    candidates: Optional[pd.DataFrame]
    study_attrs: dict[str, Any] = field(default_factory=dict)
    study_name: Optional[str] = None
    storage: Optional[str] = None
    best_plan: Optional[dict[str, Any]] = None  # from best.yaml, when the search wrote one
    memory_limit_bytes: Optional[float] = None

    @property
    def result(self) -> dict[str, Any]:
        """search.json's `result`: best {trial, plan, ...}, kendall_tau, stopped (why the search ended)."""
        result = self.search.get("result")
        return result if isinstance(result, dict) else {}

    def setting(self, section: str, key: str) -> Any:
        """A config value as search.json records it (top level, or under `config`)."""
        for where in (self.search.get(section), (self.search.get("config") or {}).get(section)):
            if isinstance(where, dict) and where.get(key) is not None:
                return where[key]
        return None

    @property
    def kendall_tau(self) -> Optional[float]:
        tau = self.study_attrs.get("kendall_tau", self.result.get("kendall_tau"))
        if isinstance(tau, dict):
            tau = tau.get("tau")
        return float(tau) if isinstance(tau, (int, float)) else None

    @property
    def measured(self) -> pd.DataFrame:
        """Trials whose probe finished and measured a throughput."""
        if self.trials.empty:
            return self.trials
        return self.trials[(self.trials.status == "ok") & self.trials.meas_tokens_per_s.notna()]


def load_run(run_dir: str | Path, storage: Optional[str] = None) -> Run:
    """The run folder's files and its study, from `storage` (a URL that may carry a password) or
    the storage search.json names."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"no such run folder: {run_dir}; give the folder `autotune search` wrote (--out)")
    search = _read_json(run_dir / "search.json")
    candidates = _read_candidates(run_dir / "candidates.csv")
    study, storage = _open_study(run_dir, search, storage)
    if study is None and candidates is None:
        raise ConfigError(
            f"{run_dir} holds neither a study (study.db or the storage named in search.json) nor "
            "candidates.csv; give the folder `autotune search` wrote"
        )
    objective = search.get("objective") or "throughput"
    trials = trials_table(study.get_trials(deepcopy=False), objective) if study is not None else pd.DataFrame()
    return Run(
        run_dir=run_dir,
        search=search,
        trials=trials,
        candidates=candidates,
        study_attrs=dict(study.user_attrs) if study is not None else {},
        study_name=study.study_name if study is not None else None,
        storage=storage,
        best_plan=_read_best_plan(run_dir / "best.yaml"),
        memory_limit_bytes=_memory_limit(search),
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path} as JSON ({e}); rerun the search to rewrite it")
    if not isinstance(data, dict):
        raise ConfigError(f"{path} should hold a JSON object")
    return data


def _read_candidates(path: Path) -> Optional[pd.DataFrame]:
    if not path.is_file():
        return None
    try:
        df = pd.read_csv(path, keep_default_na=False, na_values=[""])
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path} as CSV ({e}); rerun the search to rewrite it")
    for col in ("dropped", "why", "reason"):
        if col in df:
            df[col] = df[col].astype(object).fillna("").astype(str)  # an all-empty column reads as floats
    if "fits" in df and df["fits"].dtype != bool:
        df["fits"] = df["fits"].map(_as_bool)
    return df


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value) if pd.notna(value) else False


def _open_study(run_dir: Path, search: dict[str, Any], url: Optional[str]) -> tuple[Optional[optuna.Study], Optional[str]]:
    """The study and its storage URL as the report shows it (its password masked)."""
    url = url or search.get("storage")
    local_db = run_dir / "study.db"
    if not url or (sqlite_path(url) is not None and not sqlite_path(url).is_file()):
        # No storage named, or a SQLite path that no longer exists (the folder was moved): use the
        # study.db next to this search.json, and never let SQLAlchemy create an empty one.
        if not local_db.is_file():
            return None, None
        url = f"sqlite:///{local_db.resolve()}"
    try:
        storage = open_storage(url, run_dir, create=False)
        return optuna.load_study(study_name=search.get("study_name"), storage=storage), hide_secrets(url)
    except ConfigError:
        raise
    except Exception as e:  # SQLAlchemy, journal and lookup errors all mean: this study cannot be read
        raise ConfigError(f"cannot open the study {search.get('study_name')!r} in {hide_secrets(url)}: {hide_secrets(str(e))}")


def _read_best_plan(path: Path) -> Optional[dict[str, Any]]:
    if not path.is_file():
        return None
    try:
        plan = OmegaConf.to_container(OmegaConf.load(path)).get("plan")
    except Exception as e:
        raise ConfigError(f"cannot read {path} ({e}); rerun the search to rewrite it")
    return plan if isinstance(plan, dict) else None


def _memory_limit(search: dict[str, Any]) -> Optional[float]:
    """The per-GPU memory a plan must fit in: search.json's memory_limit_bytes, else the hardware's."""
    for value in (search.get("memory_limit_bytes"), (search.get("hardware") or {}).get("memory_bytes")):
        if isinstance(value, (int, float)) and value > 0:
            return float(value)
    return None


def _status(trial: optuna.trial.FrozenTrial, record: TrialRecord) -> str:
    if record.status:
        return record.status
    state = trial.state
    return {"COMPLETE": "ok", "PRUNED": "pruned", "FAIL": "error"}.get(state.name, state.name.lower())


def _last_report_tokens_per_s(trial: optuna.trial.FrozenTrial, plan: dict[str, Any], objective: str) -> Optional[float]:
    """The throughput a trial last reported to the pruner (tokens/GPU-s under objective=cost)."""
    if not trial.intermediate_values:
        return None
    value = trial.intermediate_values[max(trial.intermediate_values)]
    world = int(plan.get("dp") or 1) * int(plan.get("tp") or 1) * int(plan.get("pp") or 1)
    return float(value) * (world if objective == "cost" else 1)


def trials_table(trials: list[optuna.trial.FrozenTrial], objective: str = "throughput") -> pd.DataFrame:
    """One row per trial: number, state, status, reason, plan, estimate (est_*), probe (meas_*), and
    `last_report_tokens_per_s`: what the probe last reported while it ran (where a pruned trial stopped).

    `ran` says what of the plan ran (autotune.local_share): "as is", or a "node share" / "rank
    share" of a plan larger than the machine, whose meas_* are the share's measurement scaled to the
    plan by the estimator (the trial's `scaled`; its MFU is left out). A MoE model's trials also
    have the probe's router figures: meas_moe_imbalance, meas_moe_imbalance_max, meas_moe_aux_loss,
    meas_moe_dropped."""
    rows = []
    for t in trials:
        record = TrialRecord.from_attrs(t.user_attrs)
        plan = plan_values(record.plan) if record.plan is not None else {}
        probe = record.probe or {}
        row: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name,
            "status": _status(t, record),
            "reason": record.reason,
            "final": record.final,
        }
        row.update({name: plan.get(name) for name in PLAN_FIELDS})
        row.update({"est_" + k: v for k, v in flat_estimate(record.estimate or {}).items()})
        row.update({"meas_" + k: probe.get(k) for k in PROBE_FIELDS})
        if record.scaled:  # a share of the plan ran: its figures carried to the plan by the estimator
            row.update({"meas_" + k: getattr(record.scaled, k) for k in ("step_time_s", "tokens_per_s", "peak_mem_bytes")},
                       meas_tflops_per_gpu=None, meas_mfu=None, meas_reserved_bytes=None)
        row["ran"] = (record.ran.kind if record.ran else "as is") if probe else ""
        if probe.get("moe"):  # a MoE model's router as the probe measured it (engine.moe.step_stats)
            row.update({f"meas_moe_{k}": v for k, v in probe["moe"].items()})
        row.update(
            loss_first=probe.get("loss_first"),
            loss_last=probe.get("loss_last"),
            device=probe.get("device"),
            error=probe.get("error") or "",
            duration_s=t.duration.total_seconds() if t.duration else None,
            last_report_tokens_per_s=_last_report_tokens_per_s(t, plan, objective),
        )
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    for name in PLAN_FIELDS:  # as recorded: a trial without a plan must not turn 3 into 3.0
        df[name] = pd.Series([row[name] for row in rows], index=df.index, dtype=object)
    for col in ("est_mem_total_bytes", "est_step_time_s", "est_tokens_per_s", *("meas_" + k for k in PROBE_FIELDS)):
        df[col] = pd.to_numeric(df[col], errors="coerce") if col in df else float("nan")
    df["mem_error_pct"] = 100 * (df.est_mem_total_bytes - df.meas_peak_mem_bytes) / df.meas_peak_mem_bytes
    df["time_error_pct"] = 100 * (df.est_step_time_s - df.meas_step_time_s) / df.meas_step_time_s
    first = ["number", "state", "status", "reason", "final", *PLAN_FIELDS, "est_mem_total_bytes",
             "meas_peak_mem_bytes", "mem_error_pct", "est_step_time_s", "meas_step_time_s", "time_error_pct",
             "est_tokens_per_s", "meas_tokens_per_s", "meas_mfu", "error"]
    df = df[first + [c for c in df.columns if c not in first]]
    return df.sort_values("number").reset_index(drop=True)
