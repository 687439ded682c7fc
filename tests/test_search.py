"""`autotune search`: its logic on a fake probe (tests/fake_probe.py, through the search's probe hook),
end to end on the local CPU with real probe runs (slow), and in analytic mode."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState
import pandas as pd
import pytest

from autotune.cli import main
from autotune.config import planner_config
from autotune.engine.config import PLAN_FIELDS, load_train_config
from autotune.plans import plan_from_row, plan_key, plan_values
from autotune.search import command
from autotune.search.candidates import candidate_table
from autotune.search.command import ANALYTIC_TIE, analytic_result
from autotune.search.loop import Search
from autotune.search.proposals import Asked
from autotune.storage import open_storage
from fake_probe import HARDWARE, FakeProbe

REPO = Path(__file__).resolve().parent.parent
# A small job on the tiny model: one rank on this machine, three micro-batch choices.
TINY = ["job.global_batch=4", "job.seq_len=32", "search.probe_steps=2", "search.warmup_steps=1",
        "search.final_steps=3", "search.trial_timeout_s=120"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


def _study(run_dir: Path, storage: str | None = None) -> optuna.Study:
    info = json.loads((run_dir / "search.json").read_text())
    url = storage or info["storage"]
    if url.endswith(".journal"):
        url = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url))
    return optuna.load_study(study_name=info["study_name"], storage=url)


def _measured(study: optuna.Study, final: bool = False) -> list:
    return [t for t in study.get_trials(deepcopy=False) if t.state.is_finished() and t.user_attrs.get("claim")
            and t.user_attrs.get("status") in ("ok", "oom", "error", "timeout", "pruned")
            and bool(t.user_attrs.get("final")) == final]


def _search_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "autotune", "search", *args]


def _fixed_hardware(cluster):
    return dataclasses.replace(HARDWARE, gpus_per_node=cluster.gpus_per_node, nodes=cluster.nodes)


def _fake_search(run: Path, monkeypatch, overrides: list[str], probe: FakeProbe | None = None) -> FakeProbe:
    """`autotune search` with the fake probe on the fixed CPU; asserts it succeeded."""
    probe = probe or FakeProbe()
    monkeypatch.setattr(command, "load_hardware", _fixed_hardware)
    monkeypatch.setattr(command, "with_engine_prior", lambda hw, *args: hw)  # the fixed CPU's figures stand
    assert command.search(planner_config(overrides), run, run.name, probe=probe) == 0
    return probe


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


@pytest.mark.slow
def test_end_to_end_measure_on_cpu(tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(["search", "--out", str(run), *TINY, "search.trials=2", "search.finalists=2"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "[search] trial" in out.err  # the progress lines
    for name in ("best.yaml", "ds_config.json", "launch.sh", "report.md", "trials.csv", "candidates.csv",
                 "search.json", "study.db", "profile.json"):
        assert (run / name).stat().st_size > 0, name
    assert list((run / "plots").glob("*.png")) and list((run / "logs").glob("trial-*.log"))

    # every trial carries the contract's attributes; the budget was spent on distinct plans
    study = _study(run)
    for t in study.trials:
        assert {"plan", "estimate", "probe", "status", "reason", "final"} <= set(t.user_attrs), t.user_attrs
    short = _measured(study)
    assert 1 <= len(short) <= 2
    assert len({t.user_attrs["claim"] for t in short}) == len(short)
    assert all(t.user_attrs["probe"]["status"] == "ok" for t in short if t.user_attrs["status"] == "ok")
    for t in short:  # the probe's per-step times reach the record
        assert len(t.user_attrs["step_times_s"]) == (2 if t.user_attrs["status"] == "ok" else 0)

    # the chosen plan is the fastest long run (the finalists are the short runs within noise of the
    # best; none when it stands clear), and it is what best.yaml and ds_config.json say
    info = json.loads((run / "search.json").read_text())
    best = info["result"]["best"]
    finals = [t for t in _measured(study, final=True) if t.user_attrs["status"] == "ok"]
    pool = finals or [t for t in short if t.user_attrs["status"] == "ok"]
    assert best["trial"] == max(pool, key=lambda t: t.values[0]).number
    cfg = load_train_config(run / "best.yaml")
    assert cfg.plan == plan_from_row(best["plan"])
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 4 and ds["train_micro_batch_size_per_gpu"] == cfg.plan.micro_batch
    assert ds["zero_optimization"]["stage"] == cfg.plan.zero_stage

    # candidates.csv: every enumerated plan with its estimate and why it was dropped
    cand = pd.read_csv(run / "candidates.csv", keep_default_na=False)
    assert {*PLAN_FIELDS, "mem_total_bytes", "tokens_per_s", "fits", "dropped", "why"} <= set(cand.columns)
    assert set(cand.dropped) <= {"", "does not fit", "dominated"} and (cand.dropped == "").any()
    trials_csv = pd.read_csv(run / "trials.csv")
    assert len(trials_csv) == len(study.trials)
    assert info["mode"] == "measure" and info["measured"] and info["modelled"]

    # best.yaml trains as it is (one rank: in this process)
    assert cfg.plan.world_size == 1
    assert main(["train", str(run / "best.yaml"), "job.steps=2", f"job.out_dir={tmp_path / 'train'}"]) == 0
    assert (tmp_path / "train" / "metrics.jsonl").is_file()


def test_oom_trial_is_recorded_and_search_finishes_with_a_plan_that_fits(tmp_path, monkeypatch):
    """Each probe gets a memory cap the estimator does not know: big micro-batches run out."""
    run = tmp_path / "run"
    cap = 60_000_000  # the fake's micro-batches of 16 (84 MB) run out, those of 8 (52 MB) fit
    _fake_search(run, monkeypatch, ["job.global_batch=16", "job.seq_len=32", "search.precisions=[fp32]",
                                     "search.trials=6", "search.finalists=0", f"search.trial_memory_cap_bytes={cap}"])
    study = _study(run)
    statuses = {t.user_attrs["status"] for t in _measured(study)}
    assert "oom" in statuses and "ok" in statuses, statuses
    oom = [t for t in _measured(study) if t.user_attrs["status"] == "oom"]
    assert all(t.state == optuna.trial.TrialState.FAIL and t.user_attrs["reason"] for t in oom)
    best = json.loads((run / "search.json").read_text())["result"]["best"]
    best_trial = study.trials[best["trial"]]
    assert best_trial.user_attrs["status"] == "ok" and best_trial.user_attrs["probe"]["peak_mem_bytes"] < cap
    assert "oom" in (run / "report.md").read_text().lower()


def test_guided_search_stops_when_no_plan_left_can_beat_the_best(tmp_path, monkeypatch):
    """The fake probe's plans differ by micro-batch, ZeRO stage and precision; the guided search
    measures the estimate's favourites, recalibrates, skips what cannot win, and stops early."""
    run = tmp_path / "run"
    _fake_search(run, monkeypatch, ["search.trials=12", "search.pruner=none"])  # Hyperband draws its brackets by hash()
    info = json.loads((run / "search.json").read_text())
    assert info["result"]["stopped"].startswith("no plan left can beat the best measured one")
    study = _study(run)
    short, final = _measured(study), _measured(study, final=True)
    assert len(short) < 12 and len(final) == 2
    assert all(len(t.user_attrs["step_times_s"]) == 4 for t in short)  # search.probe_steps
    assert all(len(t.user_attrs["step_times_s"]) == 8 for t in final)  # search.final_steps
    best = max(final, key=lambda t: t.values[0])
    assert info["result"]["best"]["trial"] == best.number and info["result"]["kendall_pairs"] == 2
    skipped = [t for t in study.trials if t.user_attrs.get("status") == "skipped"]
    assert all(t.user_attrs["reason"] for t in skipped)
    assert len(pd.read_csv(run / "trials.csv")) == len(study.trials)


def test_plain_optuna_spends_the_whole_budget(tmp_path, monkeypatch):
    """search.use_estimator=false: no plan is skipped as hopeless, the budget decides."""
    run = tmp_path / "run"
    probe = _fake_search(run, monkeypatch, ["search.trials=5", "search.finalists=1", "search.use_estimator=false",
                                           "search.sampler=random"])
    short = _measured(_study(run))
    assert len(short) == len({t.user_attrs["claim"] for t in short}) == 5 and len(probe.ran) == 6
    assert json.loads((run / "search.json").read_text())["result"]["stopped"] == "search.trials=5 trials run"


def _wait_for(predicate, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.3)
    raise AssertionError("timed out")


@pytest.mark.slow
def test_sigkill_then_rerun_continues_the_study(tmp_path):
    run = tmp_path / "run"
    # without the estimator the search never stops early, so the rerun must complete the budget
    # trials of a few seconds of steps: the kill must land while the second one runs, not after it
    cmd = _search_cmd("--out", str(run), *TINY, "search.trials=2", "search.finalists=0", "search.probe_steps=60",
                      "search.use_estimator=false", "search.sampler=random", "search.pruner=none")
    proc = subprocess.Popen(cmd, env=ENV, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def one_done_one_running() -> bool:
        if not list(run.glob("logs/trial-*.log")):  # until then the search may be creating study.db
            return False
        study = _study(run)  # one snapshot: a trial seen running must not be the one seen finished
        running = [t for t in study.get_trials(deepcopy=False) if t.state.name == "RUNNING" and t.user_attrs.get("confirmed")]
        finished = {t.number for t in _measured(study)}
        return bool(finished) and any(t.number not in finished for t in running)

    try:
        _wait_for(one_done_one_running, 240, proc)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    before = {t.number: (t.user_attrs["claim"], t.values, t.datetime_complete) for t in _measured(_study(run))}
    killed = [t.number for t in _study(run).trials if t.state.name == "RUNNING" and t.user_attrs.get("confirmed")]
    assert before and killed

    rerun = subprocess.run(cmd, env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    study = _study(run)
    after = {t.number: (t.user_attrs["claim"], t.values, t.datetime_complete) for t in _measured(study)}
    for number, record in before.items():  # nothing finished was lost or changed
        assert after[number] == record
    claims = [claim for claim, _, _ in after.values()]
    assert len(claims) == len(set(claims)) == 2  # no plan ran twice; the budget was completed
    assert all(study.trials[n].state.name == "FAIL" and "interrupted" in study.trials[n].user_attrs["reason"]
               for n in killed)
    assert (run / "best.yaml").is_file()


@pytest.mark.slow
def test_two_processes_share_one_study(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    journal = run / "study.journal"
    # without the estimator no plan is skipped as hopeless and the search never stops early (how
    # early depends on measured speeds): the two processes spend one budget, whatever they measure
    cmd = _search_cmd("--out", str(run), *TINY, "search.trials=4", "search.finalists=1", "search.use_estimator=false",
                      f"search.storage={journal}")
    procs = [subprocess.Popen(cmd, env=ENV, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=400)
        assert p.returncode == 0, err[-3000:]
    study = _study(run, str(journal))
    short, final = _measured(study), _measured(study, final=True)
    short_claims = [t.user_attrs["claim"] for t in short]
    assert len(short_claims) == len(set(short_claims))  # no plan twice
    # one budget for both (each may start a last trial at the same moment): not 4 trials each
    assert 4 <= len(short_claims) <= 5
    assert len(final) == 1  # the finalist ran once, though both processes reached the end


def test_scale_out_measures_one_node_and_models_the_rest(tmp_path, monkeypatch):
    """cluster=local with nodes=2: each trial runs its share here (the replicas of one node, or one
    rank's share of a plan that pipelines across the nodes); the estimator adds the rest."""
    run = tmp_path / "run"
    probe = _fake_search(run, monkeypatch, [*TINY, "cluster.nodes=2", "search.trials=2", "search.finalists=0"])
    assert probe.ran and all(train.plan.world_size == 1 for train in probe.ran)
    assert "one rank's share" in (run / "report.md").read_text()
    study = _study(run)
    for t in _measured(study):
        if t.user_attrs["status"] != "ok":
            continue
        plan, ran = t.user_attrs["plan"], t.user_attrs["ran"]
        assert plan["dp"] * plan["tp"] * plan["pp"] == 2 and ran["plan"]["dp"] * ran["plan"]["tp"] * ran["plan"]["pp"] == 1
        assert ran["job"]["global_batch"] == plan["micro_batch"] * plan["grad_accum"] * ran["plan"]["dp"]
        assert ran["kind"] == ("node share" if plan["pp"] == 1 else "rank share")
        probe, scaled = t.user_attrs["probe"], t.user_attrs["scaled"]
        # the value is the share's measurement carried to the cluster by the estimator's ratio
        assert scaled["time_scale"] == pytest.approx(t.user_attrs["estimate"]["step_time_s"] / ran["estimate"]["step_time_s"])
        assert scaled["step_time_s"] == pytest.approx(probe["step_time_s"] * scaled["time_scale"])
        assert scaled["peak_mem_bytes"] == pytest.approx(probe["peak_mem_bytes"] * scaled["mem_scale"])
        assert t.values[0] == pytest.approx(4 * 32 / scaled["step_time_s"])
        if ran["kind"] == "node share" and plan["zero_stage"] >= 2 and not plan["offload_optimizer"]:
            assert 0 < scaled["mem_scale"] < 1  # states sharded over twice the ranks
        elif ran["kind"] == "node share" and plan["zero_stage"] == 0:
            assert scaled["mem_scale"] > 1  # DDP's gradient buckets, which one rank alone does without
    info = json.loads((run / "search.json").read_text())
    assert "each trial's share" in info["measured"] and "2 GPU(s) in 2 node(s)" in info["modelled"]
    assert "scaled" in info["result"]["best"]["source"]
    assert load_train_config(run / "best.yaml").plan.world_size == 2
    trials = pd.read_csv(run / "trials.csv")
    ok = trials[trials.status == "ok"]
    assert set(ok.ran) <= {"node share", "rank share"} and ok.meas_mfu.isna().all()  # no MFU of a share


def test_plans_with_the_same_share_are_measured_once(tmp_path):
    """A tp=2 plan with one device here runs one tp rank's share (half the heads of the same
    width, half of d_ff and of the vocabulary). The same plan with sequence parallel (which the
    estimator models) runs the same share: the second trial takes the first's measurement, scaled
    by its own estimate, and spends nothing of the trial budget."""
    pc = planner_config([*TINY, "cluster.gpus_per_node=2", "search.local_devices=1", "search.max_dp=1",
                         "search.precisions=[fp32]"])
    frame = candidate_table(pc, _fixed_hardware(pc.cluster))
    probe = FakeProbe()
    search = Search(pc, tmp_path, "t", _fixed_hardware(pc.cluster), frame,
                    open_storage(f"sqlite:///{tmp_path / 'study.db'}", tmp_path), probe=probe)
    base = plan_from_row(frame[(frame.tp == 2) & ~frame.sequence_parallel.astype(bool)].iloc[0])
    for sp in (False, True):
        search.run_trial(Asked(search.study.ask(), dataclasses.replace(base, sequence_parallel=sp), False, "test"))
    first, second = search.study.trials
    assert first.user_attrs["status"] == second.user_attrs["status"] == "ok"
    ran, full = first.user_attrs["ran"], pc.model
    assert ran["kind"] == "rank share" and ran["plan"]["tp"] == ran["plan"]["dp"] == ran["plan"]["pp"] == 1
    assert (ran["model"]["n_heads"], ran["model"]["attn_head_dim"], ran["model"]["d_ff"], ran["model"]["vocab_size"]) == \
        (full.n_heads // 2, full.head_dim, full.d_ff // 2, full.vocab_size // 2)
    assert second.user_attrs["reused"] == 0 and "trial 0 measured the same share" in second.user_attrs["reason"]
    assert second.user_attrs["probe"] == first.user_attrs["probe"] and search.ledger().spent() == 1
    assert len(probe.ran) == 1  # no probe ran for the second
    assert second.user_attrs["step_times_s"] == first.user_attrs["step_times_s"] and len(first.user_attrs["step_times_s"]) == 2
    scaled = second.user_attrs["scaled"]
    assert scaled["step_time_s"] == pytest.approx(first.user_attrs["probe"]["step_time_s"] * scaled["time_scale"])
    assert second.values[0] == pytest.approx(4 * 32 / scaled["step_time_s"])


@pytest.mark.gpu
def test_a_catalog_cluster_is_measured_on_a_local_gpu_of_its_kind(tmp_path, capsys):
    """cluster=8xh100 on one H100 (or the catalog entry of whatever GPU is here): each trial runs
    its share on this GPU, calibrated against the catalog's figures, and the rest is modelled."""
    import torch

    from autotune.hardware import catalog_gpu, gpu_catalog
    from autotune.local_share import gpu_kind

    props = torch.cuda.get_device_properties(0)
    kinds = [g for g in gpu_catalog() if gpu_kind(catalog_gpu(g).gpu) == gpu_kind(props.name)
             and abs(props.total_memory / catalog_gpu(g).memory_bytes - 1) <= 0.1]
    if not kinds:
        pytest.skip(f"no catalog entry for {props.name}")
    run = tmp_path / "run"
    rc = main(["search", "--out", str(run), "cluster=8xh100", f"cluster.gpu={kinds[0]}", "search.mode=measure",
               "search.local_devices=1", "job.global_batch=8", "job.seq_len=64", "search.probe_steps=3",
               "search.warmup_steps=1", "search.trials=2", "search.finalists=0"])
    assert rc == 0, capsys.readouterr().err
    info = json.loads((run / "search.json").read_text())
    assert "this machine's" in info["measured"] and "scaled" in info["result"]["best"]["source"]
    assert load_train_config(run / "best.yaml").plan.world_size == 8


# the 70B search in bf16 alone: a smaller table (no fp32 or fp16 plans) with every check, in two thirds of the time
@pytest.mark.parametrize("model,cluster,batch,more", [("llama-3-8b", "8xh100", 512, []),
                                                      ("llama-3-70b", "4x8xh100", 1024, ["search.precisions=[bf16]"])])
def test_analytic_mode_answers_from_the_estimate(tmp_path, capsys, model, cluster, batch, more):
    run = tmp_path / "run"
    rc = main(["search", "--out", str(run), f"model={model}", f"cluster={cluster}", f"job.global_batch={batch}",
               "job.seq_len=4096", *more])
    assert rc == 0, capsys.readouterr().err
    info = json.loads((run / "search.json").read_text())
    assert info["mode"] == "analytic" and info["result"]["best"]["source"] == "estimate"
    cfg = load_train_config(run / "best.yaml")
    cand = pd.read_csv(run / "candidates.csv", keep_default_na=False)
    row = cand  # the chosen plan's rows, one field at a time (each narrows what the next turns into strings: 6.5e5 rows for 70B)
    for field, value in vars(cfg.plan).items():
        row = row[row[field].astype(str) == str(value)]
    assert len(row) == 1 and str(row.fits.iloc[0]) == "True" and row.dropped.iloc[0] == ""
    assert row.mem_total_bytes.iloc[0] <= info["memory_limit_bytes"]
    # nothing that fits is estimated faster
    # within the analytic tie margin of the fastest plan that fits (ties go to the simpler plan)
    assert row.tokens_per_s.iloc[0] >= cand[cand.fits.astype(str) == "True"].tokens_per_s.max() * (1 - ANALYTIC_TIE)
    # every plan is there once; a dominated one names (by plan_id) a plan that fits in no more memory, faster
    assert cand.plan_id.tolist() == list(range(len(cand))) and info["plans"]["enumerated"] == len(cand)
    dominated = cand[cand.dropped == "dominated"]
    by = cand.set_index("plan_id").loc[dominated.why.str.removeprefix("by plan ").astype(int)]
    assert len(dominated) and (by.mem_total_bytes.to_numpy() <= dominated.mem_total_bytes.to_numpy()).all()
    assert (by.tokens_per_s.to_numpy() > dominated.tokens_per_s.to_numpy()).all() and (by.dropped != "does not fit").all()
    over = cand[cand.dropped == "does not fit"]  # what it needs against the limit, and its largest part
    assert len(over) and over.why.str.fullmatch(r"[0-9]+\.[0-9]{2} GiB/GPU > 79\.10; largest: [a-z_]+").all()
    assert ((over.why.str.split(" ").str[0].astype(float) - over.mem_total_bytes / 2**30).abs() <= 0.00501).all()
    assert cfg.plan.world_size == planner_config([f"cluster={cluster}"]).cluster.n_gpus
    report = (run / "report.md").read_text()
    assert "estimat" in report.lower() and str(cfg.plan.micro_batch) in report
    assert not (run / "study.db").exists()


@pytest.mark.parametrize("args,match", [
    (["model=no-such-model"], "unknown model"),
    (["cluster=no-such-cluster"], "unknown cluster"),
    (["job.global_batch=7", "cluster.gpus_per_node=3"], "global batch"),
    (["model=llama-3-70b", "cluster=1xh100", "job.seq_len=8192", "search.precisions=[fp32]",
      "cluster.host_memory_gb=64"], "no plan fits"),
    (["model=llama-3-70b", "cluster=1xh100", "job.seq_len=8192"], "GiB of host memory per node, has 931.3 GiB"),
    (["model=llama-3-70b", "cluster=1xh100", "cluster.gpu=l4", "job.seq_len=8192", "job.global_batch=1"],
     "(22.0 GiB per device): the smallest"),
    (["search.storage=sqlite:////no/such/folder/study.db"], "search.storage"),
    (["search.storage=postgresql://nobody@127.0.0.1:1/none"], "search.storage"),
    (["search.sampler=cmaes"], "cmaes package"),
    (["search.sampler=bayes"], "search.sampler"),
    (["model=llama-3-8b", "cluster=8xh100", "cluster.gpu=v100-32g", "search.mode=measure"], "search.mode=measure"),
    (["search.local_devices=0"], "search.local_devices=0"),
])
def test_bad_input_is_one_error_line_and_nothing_written(tmp_path, capsys, args, match):
    run = tmp_path / "run"
    rc = main(["search", "--out", str(run), *args])
    assert rc == 2
    assert match in _one_error(capsys)
    assert not run.exists()


def test_analytic_ties_go_to_the_simpler_plan_then_less_memory():
    """Plans estimated within ANALYTIC_TIE of the fastest are ties: no pp beats pp, then less memory."""
    base = vars(planner_config([]).plan)
    rows = [
        dict(base, pp=2, mem_total_bytes=1.0, tokens_per_s=100.0),  # fastest, but pipelined
        dict(base, zero_stage=2, mem_total_bytes=3.0, tokens_per_s=99.5),
        dict(base, zero_stage=3, mem_total_bytes=2.0, tokens_per_s=99.5),  # the choice
        dict(base, zero_stage=1, mem_total_bytes=0.5, tokens_per_s=90.0),  # not a tie
    ]
    frame = pd.DataFrame(rows).assign(objective_est=lambda f: f.tokens_per_s, dropped="", why="", key="k")
    assert analytic_result(frame)["best"]["plan"]["zero_stage"] == 3


def test_every_sampler_proposes_distinct_candidates():
    """tpe, random and grid (gp and cmaes need scipy / cmaes): once the estimate's picks have measured
    each dimension's values, the sampler's proposals take turns, each snapped to a plan still to run
    (no probe here: the trials are told they were pruned, which measures their plan's values)."""
    for sampler in ("tpe", "random", "grid"):
        pc = planner_config([*TINY, f"search.sampler={sampler}", "search.trials=12"])
        frame = candidate_table(pc, _fixed_hardware(pc.cluster))
        search = Search(pc, Path("unused"), "s", _fixed_hardware(pc.cluster), frame, optuna.storages.InMemoryStorage())
        keys, sources = [], set()
        for i in range(12):
            search.guidance.learn(search.ledger())
            asked = search.next_trial(search.ledger())
            keys.append(plan_key(asked.plan))
            sources.add(asked.source)
            for k, v in {"claim": keys[-1], "plan": plan_values(asked.plan), "status": "pruned", "final": False}.items():
                asked.trial.set_user_attr(k, v)
            search.study.tell(asked.trial, state=TrialState.PRUNED)
        assert len(set(keys)) == 12 and set(keys) <= set(search.guidance.pool.key), sampler
        assert "estimate" in sources and any(s.startswith("sampler") for s in sources), (sampler, sources)


def test_out_folder_of_another_study_is_refused_and_left_alone(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["search", "--out", str(run), "model=tiny", "cluster=1xh100"]) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(["search", "--out", str(run), "model=tiny-gpt2", "cluster=1xh100"]) == 2
    assert "holds a search of another model" in _one_error(capsys)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
