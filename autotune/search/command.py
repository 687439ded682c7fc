"""`autotune search`: the command. Reads the config, checks everything a user can get wrong before
it writes anything, builds the candidate table, runs the analytic answer or the measured search,
and writes the run folder (see autotune/search/__init__.py)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from autotune.config import PlannerConfig, SearchConfig, planner_config
from autotune.device_prior import with_engine_prior
from autotune.engine.config import ConfigError, as_json, with_changes
from autotune.engine.files import write_atomic
from autotune.hardware import Hardware, load_hardware, supported_precisions
from autotune.local_share import capacity, check_local_gpu
from autotune.plans import DOMINANCE_MARGIN, plain, plan_from_row, plan_label, plan_values
from autotune.runner import run_probe
from autotune.search.candidates import candidate_table, nothing_fits_message, write_candidates
from autotune.search.loop import Search
from autotune.search.progress import rate
from autotune.search.trial import ProbeFn
from autotune.storage import check_reachable, hide_secrets, open_storage, storage_url

ANALYTIC_TIE = 0.01  # plans estimated this close to the fastest count as ties
NEEDS = {"gp": "scipy", "cmaes": "cmaes"}  # samplers that need a package Optuna does not


def resolve_mode(pc: PlannerConfig) -> str:
    if pc.search.mode != "auto":
        return str(pc.search.mode)
    return "measure" if pc.cluster.gpu == "auto" else "analytic"


def check_search(s: SearchConfig, mode: str) -> None:
    """The ranges of search's numbers (its choices are checked when the config is read)."""
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
    if mode == "measure" and s.sampler in NEEDS:
        try:
            __import__(NEEDS[s.sampler])
        except ImportError:
            raise ConfigError(
                f"search.sampler={s.sampler} needs the {NEEDS[s.sampler]} package, which is not installed; "
                "use tpe, random or grid"
            )


def default_name(pc: PlannerConfig) -> str:
    """The same command names the same run (so rerunning it continues the study)."""
    return f"{pc.model.name}-{pc.cluster.name}-gb{pc.job.global_batch}-s{pc.job.seq_len}-{pc.search.objective}"


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
    plan = plan_from_row(best)
    values = plan_values(plan)
    return {"best": {"trial": None, "plan": values, "value": float(best["objective_est"]), "final": False,
                     "source": "estimate", "describe": plan_label(plan),
                     "estimate": {k: plain(best[k]) for k in frame.columns
                                  if k not in values and k not in ("key", "dropped", "why")}},
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
                "the ranking of plans not run: the estimator, corrected factor by factor by the measured trials "
                "(autotune.belief)")
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
    parser = argparse.ArgumentParser(prog="autotune search", description="find the fastest plan that fits")
    parser.add_argument("--out", default=None, help="run folder (default: outputs/<name>)")
    parser.add_argument("--name", default=None, help="run and study name (default: from model, cluster, job)")
    args, overrides = parser.parse_known_args(argv)
    unknown = [a for a in overrides if a.startswith("-")]
    if unknown:
        raise ConfigError(f"unknown flag(s) {unknown}; autotune search takes --out DIR, --name NAME and key=value")
    pc = planner_config(overrides)
    name = args.name or (Path(args.out).name if args.out else default_name(pc))
    return search(pc, Path(args.out) if args.out else Path("outputs") / name, name)


def search(pc: PlannerConfig, run_dir: Path, name: str, probe: ProbeFn = run_probe) -> int:
    """The whole search of `pc` into `run_dir` (study `name`); `probe` runs each trial's probe.
    Returns the command's exit status."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.monotonic()
    mode = resolve_mode(pc)
    check_search(pc.search, mode)
    if pc.search.storage:
        check_reachable(pc.search.storage)
    previous = _read_json(run_dir / "search.json")
    if previous and not _same_job(previous, pc):
        raise ConfigError(f"{run_dir} holds a search of another model, job, cluster or objective; "
                          "give another --out or --name")
    hw = load_hardware(pc.cluster)
    if pc.cluster.gpu == "auto":  # this machine: the engine's own speed in each precision it may run
        hw = with_engine_prior(hw, pc.model, pc.job.seq_len,
                               [p for p in supported_precisions(hw) if p in pc.search.precisions])
    if mode == "measure":
        capacity(pc.cluster, pc.search)  # search.local_devices is checked before anything is written
        if pc.cluster.gpu != "auto":
            check_local_gpu(pc.cluster, hw)
    frame = candidate_table(pc, hw, dominance=mode == "analytic")
    if not frame["fits"].astype(bool).any():
        raise ConfigError(nothing_fits_message(frame, pc, hw))

    # Everything is validated: from here on the run folder is written.
    run_dir.mkdir(parents=True, exist_ok=True)
    url = storage_url(pc.search.storage, run_dir)  # with its password: in memory only
    info = _search_info(pc, name, mode, hw, frame, url)
    write_candidates(run_dir / "candidates.csv", frame)
    _write_profile(run_dir, pc, hw)
    write_json(run_dir / "search.json", {**info, "result": previous.get("result")})
    if mode == "analytic":
        result = analytic_result(frame)
    else:
        measured = Search(pc, run_dir, name, hw, frame, open_storage(url, run_dir), probe=probe)
        measured.explore()
        measured.finals()
        result = measured.result()
    info["result"] = result
    info["elapsed_s"] = round(time.monotonic() - started, 2)
    write_json(run_dir / "search.json", info)
    return _finish(run_dir, pc, result, url)


def _search_info(pc: PlannerConfig, name: str, mode: str, hw: Hardware, frame: pd.DataFrame, url: str) -> dict[str, Any]:
    """search.json before a result (the contract in autotune/search/__init__.py); the storage's
    password is masked."""
    from autotune.engine.model import count_active_params, count_params, expert_params

    measured, modelled = measured_vs_modelled(mode, pc, hw)
    config = {section: as_json(getattr(pc, section)) for section in ("model", "job", "plan", "cluster", "search")}
    if pc.search.storage:
        config["search"]["storage"] = hide_secrets(pc.search.storage)
    return {
        "name": name, "study_name": name, "storage": hide_secrets(url), "mode": mode, "objective": str(pc.search.objective),
        "config": config,
        "params": {"total": count_params(pc.model), "active": count_active_params(pc.model),
                   "routed_experts": expert_params(pc.model)},
        "hardware": hw.to_dict(), "memory_limit_bytes": hw.memory_bytes,
        "plans": {"enumerated": len(frame), "fit": int(frame["fits"].astype(bool).sum()),
                  "candidates": int((frame["dropped"] == "").sum()),
                  "dominated": f"dominated by plan N: plan N fits in no more memory and is estimated at least "
                               f"{DOMINANCE_MARGIN:.0%} faster"},
        "measured": measured, "modelled": modelled,
    }


def _finish(run_dir: Path, pc: PlannerConfig, result: dict[str, Any], url: str) -> int:
    from autotune.emit import write_outputs
    from autotune.reports import build_report

    best = result.get("best")
    if best is not None:
        write_outputs(run_dir, with_changes(pc.train, plan=plan_from_row(best["plan"])), pc.cluster)
    build_report(run_dir, url)
    if best is None:
        print(f"error: no trial ran successfully ({result.get('stopped')}); see {run_dir / 'report.md'}",
              file=sys.stderr)
        return 1
    unit = "tokens/GPU-s" if pc.search.objective == "cost" else "tokens/s"
    how = {"measured": "measured", "estimate": "estimated"}.get(best["source"], "measured in part, scaled by the estimator")
    print(f"best: {best['describe']} ({how} {rate(best['value'])} {unit})")
    print(f"wrote {run_dir}/best.yaml, ds_config.json, launch.sh, report.md")
    return 0


def _same_job(previous: dict[str, Any], pc: PlannerConfig) -> bool:
    """Whether search.json's config is the same model, job, cluster and objective as `pc`'s."""
    cfg = previous.get("config", {})
    return (all(cfg.get(section) == as_json(getattr(pc, section)) for section in ("model", "job", "cluster"))
            and cfg.get("search", {}).get("objective") == pc.search.objective)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def _write_profile(run_dir: Path, pc: PlannerConfig, hw: Hardware) -> None:
    from autotune.profile import model_profile

    prof = model_profile(pc.model, pc.job.seq_len, 1)
    prof["hardware"] = hw.to_dict()
    prof["cluster"] = as_json(pc.cluster)
    write_json(run_dir / "profile.json", prof)
