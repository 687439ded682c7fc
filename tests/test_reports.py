"""reports: trials.csv, report.md and plots rebuilt from a run folder (a real Optuna SQLite study)."""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import optuna
import pandas as pd
import pytest

from autotune import reports
from autotune.reports.cli import cli
from autotune.engine.files import write_atomic
from autotune.engine.config import ConfigError, PlanConfig

GIB = 2**30
LIMIT = 80 * GIB
PSI = 1.56e9  # gpt2-xl parameters
LAYERS, HIDDEN, VOCAB, SEQ, GLOBAL, DP = 48, 1600, 50257, 1024, 256, 8
PLOTS = ("throughput_vs_memory.png", "memory_breakdown.png", "estimate_vs_measured.png", "history.png")


def estimate(zero: int, precision: str, micro: int, ckpt: str, offload: bool) -> dict:
    """A plausible closed-form estimate (ZeRO bytes per parameter, Korthikanti activations)."""
    half = precision == "bf16"
    accum = GLOBAL // (micro * DP)
    memory = {
        "params": PSI * (4 + (2 if half else 0)) / (DP if zero == 3 else 1),
        "grads": PSI * 4 / (DP if zero >= 2 else 1),
        "optimizer": 0.0 if offload else PSI * 8 / (DP if zero >= 1 else 1),
        "activations": micro * SEQ * HIDDEN * LAYERS * (2 if ckpt == "full" else 34) * (1 if half else 2),
        "logits": micro * SEQ * VOCAB * 6.0,
        "overhead": 1.0 * GIB,
    }
    memory["total_bytes"] = sum(memory.values())
    flops = 6 * PSI * micro * SEQ * accum * (4 / 3 if ckpt == "full" else 1)
    time = {
        "compute": flops / ((989e12 if half else 67e12) * (0.35 + 0.05 * min(micro, 4))),
        "comm": (3 if zero == 3 else 2) * PSI * (2 if half else 4) / 300e9 * 0.3,
        "offload": PSI * 12 / DP / 25e9 if offload else 0.0,
    }
    step = sum(time.values())
    tokens = GLOBAL * SEQ / step
    return {
        "memory": memory,
        "time": time,
        "step_time_s": step,
        "tokens_per_s": tokens,
        "mfu": tokens * 6 * PSI / (DP * (989e12 if half else 67e12)),
        "fits": memory["total_bytes"] <= LIMIT,
        "reason": "" if memory["total_bytes"] <= LIMIT else f"needs {memory['total_bytes'] / GIB:.1f} GiB > 80 GiB",
    }


def enumerate_plans() -> list[tuple[dict, dict]]:
    plans = []
    for zero, precision, micro, ckpt, offload in itertools.product(
        (0, 1, 2, 3), ("fp32", "bf16"), (1, 2, 4, 8, 16), ("none", "full"), (False, True)
    ):
        if offload and zero == 0:
            continue
        plan = {f: getattr(PlanConfig(), f) for f in PlanConfig.__dataclass_fields__}
        plan.update(zero_stage=zero, precision=precision, micro_batch=micro, activation_checkpointing=ckpt,
                    offload_optimizer=offload, dp=DP, grad_accum=GLOBAL // (micro * DP))
        plans.append((plan, estimate(zero, precision, micro, ckpt, offload)))
    return plans


def write_candidates(run_dir: Path, plans: list[tuple[dict, dict]]) -> pd.DataFrame:
    rows = []
    best_by_memory: list[float] = []
    for plan, est in sorted(plans, key=lambda pe: (-pe[1]["tokens_per_s"], pe[1]["memory"]["total_bytes"])):
        row = dict(plan)
        row.update({f"mem_{k}_bytes" if k != "total_bytes" else "mem_total_bytes": v for k, v in est["memory"].items()})
        row.update({f"time_{k}_s": v for k, v in est["time"].items()})
        row.update({k: est[k] for k in ("step_time_s", "tokens_per_s", "mfu", "fits", "reason")})
        mem = est["memory"]["total_bytes"]
        if not est["fits"]:
            row.update(dropped="does not fit", why=est["reason"])
        elif any(m <= mem for m in best_by_memory):
            row.update(dropped="dominated", why="a faster plan needs no more memory")
        else:
            row.update(dropped="", why="")
            best_by_memory.append(mem)
        rows.append(row)
    df = pd.DataFrame(rows)
    df.to_csv(run_dir / "candidates.csv", index=False)
    return df


def make_run(run_dir: Path, measured: bool = True) -> None:
    """A run folder as `autotune search` writes it: search.json, candidates.csv, study.db."""
    run_dir.mkdir(parents=True, exist_ok=True)
    plans = enumerate_plans()
    candidates = write_candidates(run_dir, plans)
    storage = f"sqlite:///{run_dir / 'study.db'}"
    mode = "measure" if measured else "analytic"
    search = {  # as autotune.search writes it
        "name": "gpt2-xl-8xh100", "study_name": "gpt2-xl-8xh100", "storage": storage, "mode": mode,
        "objective": "throughput",
        "config": {
            "model": {"name": "gpt2-xl", "n_layers": LAYERS, "d_model": HIDDEN},
            "job": {"seq_len": SEQ, "global_batch": GLOBAL},
            "cluster": {"name": "8xh100", "gpu": "h100-sxm", "gpus_per_node": 8, "nodes": 1},
            "search": {"mode": mode, "trials": 8, "sampler": "tpe"},
        },
        "memory_limit_bytes": LIMIT,
        "measured": "per-rank step time and peak memory of each trial (probe, 8 ranks on this machine)"
        if measured else "nothing: no trial was run",
        "modelled": "the ranking of plans not run" if measured else "everything: memory and step time of every plan",
    }
    if not measured:
        best = candidates[candidates.dropped == ""].iloc[0]
        search["result"] = {"best": {"trial": None, "plan": {f: best[f] for f in PlanConfig.__dataclass_fields__}},
                            "kendall_tau": None, "stopped": "analytic mode: ranked by the estimator alone"}
        (run_dir / "search.json").write_text(json.dumps(search, default=str))
        return
    study = optuna.create_study(study_name=search["study_name"], storage=storage, direction="maximize")
    skipped = study.ask()
    for key, value in {"plan": enumerate_plans()[0][0], "estimate": None, "probe": None, "status": "skipped",
                       "reason": "its optimistic estimate cannot beat the best measured", "final": False}.items():
        skipped.set_user_attr(key, value)
    study.tell(skipped, state=optuna.trial.TrialState.FAIL)
    fits = candidates[candidates.dropped == ""].head(6)
    outcomes = ["ok", "ok", "oom", "ok", "pruned", "error"]
    noise = [0.93, 1.05, None, 0.88, 0.7, None]
    for (_, row), status, factor in zip(fits.iterrows(), outcomes, noise):
        plan = {f: row[f] for f in PlanConfig.__dataclass_fields__}
        plan = {k: (v.item() if hasattr(v, "item") else v) for k, v in plan.items()}
        est = estimate(plan["zero_stage"], plan["precision"], plan["micro_batch"],
                       plan["activation_checkpointing"], plan["offload_optimizer"])
        trial = study.ask()
        trial.set_user_attr("plan", plan)
        trial.set_user_attr("estimate", est)
        trial.set_user_attr("status", status)
        trial.set_user_attr("final", False)
        probe = None
        if factor:
            tokens = est["tokens_per_s"] * factor
            probe = {"status": "ok", "step_time_s": GLOBAL * SEQ / tokens, "tokens_per_s": tokens,
                     "tflops_per_gpu": 300.0, "mfu": est["mfu"] * factor,
                     "peak_mem_bytes": est["memory"]["total_bytes"] * (1.1 - 0.1 * factor),
                     "reserved_bytes": est["memory"]["total_bytes"] * 1.15, "loss_first": 10.9, "loss_last": 10.2,
                     "device": "NVIDIA H100 80GB HBM3", "breakdown": {"forward": 0.3}, "error": None}
        if status == "oom":
            probe = {"status": "oom", "error": "CUDA out of memory. Tried to allocate 2.00 GiB"}
            trial.set_user_attr("reason", "out of memory at step 1 (CUDA out of memory. Tried to allocate 2.00 GiB)")
        if status == "error":
            probe = {"status": "error", "error": "RuntimeError: NCCL error in allreduce"}
            trial.set_user_attr("reason", "probe exited with status 1: RuntimeError: NCCL error in allreduce")
        trial.set_user_attr("probe", probe)
        if status == "ok":
            study.tell(trial, probe["tokens_per_s"])
        elif status == "pruned":
            trial.set_user_attr("reason", "pruned at step 2: slower than the median of earlier trials")
            trial.report(probe["tokens_per_s"], 2)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
    # the two best short runs, run again longer: the finalists
    ok = [t for t in study.trials if t.user_attrs["status"] == "ok"]
    for t in sorted(ok, key=lambda t: -t.value)[:2]:
        trial = study.ask()
        for key in ("plan", "estimate"):
            trial.set_user_attr(key, t.user_attrs[key])
        probe = dict(t.user_attrs["probe"], tokens_per_s=t.value * 0.98, step_time_s=GLOBAL * SEQ / (t.value * 0.98))
        trial.set_user_attr("probe", probe)
        trial.set_user_attr("status", "ok")
        trial.set_user_attr("final", True)
        study.tell(trial, probe["tokens_per_s"])
    study.enqueue_trial({}, user_attrs={"source": "finalist"})  # queued, not yet run: no plan recorded
    finals = [t for t in study.trials if t.user_attrs.get("final")]
    best = max(finals, key=lambda t: t.value)
    search["result"] = {"best": {"trial": best.number, "plan": best.user_attrs["plan"], "value": best.value},
                        "kendall_tau": 1.0, "kendall_pairs": 2, "stopped": "search.trials=8 trials run"}
    (run_dir / "search.json").write_text(json.dumps(search))


@pytest.fixture(scope="module")
def measured_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("measured")
    make_run(run_dir, measured=True)
    reports.build_report(run_dir)
    return run_dir


@pytest.fixture(scope="module")
def analytic_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("analytic")
    make_run(run_dir, measured=False)
    reports.build_report(run_dir)
    return run_dir


def check_png(path: Path) -> None:
    assert path.stat().st_size > 10_000, path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 400
    assert image.std() > 0.01  # not a blank canvas


def test_measured_run_report(measured_run):
    trials = pd.read_csv(measured_run / "trials.csv")
    assert len(trials) == 10
    assert trials.status.value_counts().to_dict() == {"ok": 5, "oom": 1, "pruned": 1, "error": 1, "skipped": 1,
                                                      "waiting": 1}
    for col in ("number", "state", "status", "reason", "zero_stage", "micro_batch", "est_mem_total_bytes",
                "meas_peak_mem_bytes", "mem_error_pct", "est_step_time_s", "meas_step_time_s", "time_error_pct",
                "meas_tokens_per_s", "error"):
        assert col in trials, col
    as_written = pd.read_csv(measured_run / "trials.csv", dtype=str)
    assert not as_written.micro_batch.dropna().str.contains(".", regex=False).any()  # 4, not 4.0
    ok = trials[trials.status == "ok"].iloc[0]
    expected = 100 * (ok.est_mem_total_bytes - ok.meas_peak_mem_bytes) / ok.meas_peak_mem_bytes
    assert ok.mem_error_pct == pytest.approx(expected)

    report = (measured_run / "report.md").read_text()
    finals = trials[trials.final]
    chosen = finals.loc[finals.meas_tokens_per_s.idxmax()]
    assert f"trial {chosen.number}" in report
    assert "out of memory at step 1" in report and "NCCL error in allreduce" in report
    assert "pruned at step 2" in report
    pruned = trials[trials.status == "pruned"].iloc[0]  # where the pruner stopped it (history plot)
    assert pruned.last_report_tokens_per_s == pytest.approx(pruned.meas_tokens_per_s)
    # the choice is the fastest long run: said so, and first in the side-by-side table
    assert "fastest finalist in the long runs" in report
    top = report.split("## Top plans")[1].split("\n## ")[0]
    assert f"| trial {chosen.number} (chosen) |" in top.splitlines()[4] and "| measured in | long run" in top
    assert "Kendall" in report and "1.00" in report
    assert "measured memory is the peak allocated bytes" in report  # a GPU's measure, not a CPU's
    assert "per-rank step time and peak memory" in report  # what was measured
    assert "1 x its optimistic estimate cannot beat" in report  # the skipped trial
    for name in PLOTS:
        check_png(measured_run / "plots" / name)
        assert f"plots/{name}" in report


def test_analytic_run_report(analytic_run):
    report = (analytic_run / "report.md").read_text()
    candidates = pd.read_csv(analytic_run / "candidates.csv", keep_default_na=False)
    winner = candidates[candidates.dropped == ""].sort_values("tokens_per_s", ascending=False).iloc[0]
    assert "analytic" in report.lower()
    assert f"{winner.tokens_per_s:,.0f}" in report
    assert "does not fit" in report
    assert "Why it wins" in report
    for name in ("throughput_vs_memory.png", "memory_breakdown.png"):
        check_png(analytic_run / "plots" / name)
    assert not (analytic_run / "plots" / "history.png").exists()
    assert not (analytic_run / "trials.csv").exists() or pd.read_csv(analytic_run / "trials.csv").empty


def test_rebuild_is_idempotent_and_cli_works(analytic_run, capsys):
    before = (analytic_run / "report.md").read_text()
    assert cli([str(analytic_run)]) == 0
    assert (analytic_run / "report.md").read_text() == before
    assert str(analytic_run / "report.md") in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, capsys):
    from autotune.cli import main

    for argv in (["report"], ["report", str(tmp_path / "missing")], ["report", "a", "b"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err


def test_bad_run_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no such run folder"):
        reports.build_report(tmp_path / "missing")
    with pytest.raises(ConfigError, match="neither a study"):
        reports.build_report(tmp_path)
    (tmp_path / "search.json").write_text("{not json")
    with pytest.raises(ConfigError, match="search.json"):
        reports.build_report(tmp_path)


def test_failed_rebuild_keeps_the_old_report(measured_run, monkeypatch):
    before = (measured_run / "report.md").read_bytes()
    import autotune.reports.markdown

    def broken(run, plots):
        raise RuntimeError("rendering failed")

    monkeypatch.setattr(reports.markdown, "render", broken)
    with pytest.raises(RuntimeError):
        reports.build_report(measured_run)
    assert (measured_run / "report.md").read_bytes() == before
    assert not list(measured_run.glob(".*.tmp"))


def test_write_atomic_replaces_whole_file(tmp_path):
    target = tmp_path / "x.csv"
    write_atomic(target, "a\n1\n")
    write_atomic(target, b"a\n2\n")
    assert target.read_text() == "a\n2\n"


def test_importing_reports_does_not_import_torch():
    code = "import sys, autotune.reports, autotune.reports.cli; autotune.reports.build_report; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_pareto_front_and_row_label():
    from autotune.reports.tables import pareto_front, row_label

    memory = pd.Series([4.0, 1.0, 2.0, 3.0, 2.0])
    throughput = pd.Series([10.0, 2.0, 5.0, 4.0, 6.0])
    # by memory: 1 (2), then 2 with 6 beats 2 with 5, 3 with 4 is beaten, 4 with 10
    assert list(pareto_front(memory, throughput)) == [1, 4, 0]
    plan = {"zero_stage": 3, "offload_optimizer": True, "offload_params": False, "precision": "bf16",
            "micro_batch": 2, "activation_checkpointing": "selective", "checkpoint_every_k": 3, "dp": 2, "tp": 2,
            "sequence_parallel": True, "pp": 2, "pp_schedule": "interleaved_1f1b", "pp_virtual_stages": 2,
            "kernels": "triton", "compile": False}
    assert row_label(pd.Series(plan)) == "Z3+oo bf16 mb2 ckpt:sel3 dp2 tp2+sp pp2 interleaved_1f1b/v2 triton"
    assert row_label(pd.Series({**plan, "zero_stage": None})) == "(no plan recorded)"


def test_journal_storage_without_candidates(tmp_path):
    """Several local workers share a journal file; a run folder may also lack candidates.csv."""
    journal = tmp_path / "study.journal"
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    study = optuna.create_study(study_name="shared", storage=storage, direction="maximize")
    plan = enumerate_plans()[0][0]
    for number, (status, tokens) in enumerate([("ok", 1000.0), ("oom", None), ("ok", 1500.0)]):
        trial = study.ask()
        probe = {"status": status, "tokens_per_s": tokens, "step_time_s": tokens and 8.0 / tokens,
                 "peak_mem_bytes": 3e8 + number * 1e7, "error": None if tokens else "CUDA out of memory"}
        attrs = {"plan": dict(plan, micro_batch=2**number), "estimate": None, "probe": probe, "status": status,
                 "reason": "" if tokens else "out of memory at step 0", "final": False}
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        if tokens:
            study.tell(trial, tokens)
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
    (tmp_path / "search.json").write_text(json.dumps({"storage": f"journal://{journal}", "study_name": "shared"}))
    report = reports.build_report(tmp_path).read_text()
    assert "trial 2" in report and "out of memory at step 0" in report
    assert len(pd.read_csv(tmp_path / "trials.csv")) == 3
    for name in ("throughput_vs_memory.png", "history.png"):
        check_png(tmp_path / "plots" / name)
