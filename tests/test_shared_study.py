"""A study shared by several search workers through a real PostgreSQL server, started here from the
pgserver package: workers that open a fresh database at once, two workers that cover what one
would and take over the plan of a killed one, `autotune search` processes started together with one
SIGKILLed mid-trial, optuna-dashboard on the study, and a password that never leaves memory."""
import dataclasses
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import optuna
import pytest

from autotune.cli import main
from autotune.config import planner_config
from autotune.plans import plan_from_row, plan_key
from autotune.search import command
from autotune.search.candidates import candidate_table
from autotune.search.record import TrialRecord
from autotune.search.study import claim
from autotune.storage import check_reachable, hide_secrets, open_storage
from fake_probe import HARDWARE, FakeProbe

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
USER = "worker"  # logs in with a password (scram-sha-256); the server's superuser is trusted
PASSWORD = "Pw" + secrets.token_hex(8)
# the tiny model with one layer, one rank, a two-step probe: 45 valid plans (the 9 ZeRO stages and
# offloads, each with no, full, attention or per-op checkpointing keeping every or every 2nd matmul)
TINY = ["model.n_layers=1", "job.global_batch=1", "job.seq_len=32", "search.precisions=[fp32]", "search.probe_steps=2",
        "search.warmup_steps=1", "search.final_steps=3", "search.trial_timeout_s=120"]


class Postgres:
    """A PostgreSQL server of this test module: `database()` makes a fresh database, `url()` names it."""

    def __init__(self, server):
        self.server = server
        self.socket_dir = str(server.get_postmaster_info().socket_dir)
        self.made = 0

    def admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(host=self.socket_dir, user="postgres", dbname="postgres", autocommit=True) as conn:
            conn.execute(sql)

    def database(self) -> str:
        self.made += 1
        name = f"study{self.made}"
        self.admin(f"CREATE DATABASE {name} OWNER {USER}")
        return name

    def url(self, database: str, password: str | None = PASSWORD) -> str:
        login = f"{USER}:{password}" if password else USER
        return f"postgresql+psycopg://{login}@/{database}?host={self.socket_dir}"


@pytest.fixture(scope="module")
def postgres():
    # not under pytest's temporary folder: as root, pgserver runs the server as its own user, who
    # must reach the data folder (pgserver opens the folders above it to others)
    folder = Path(tempfile.mkdtemp(prefix="autotune-pg-"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR is not set
            import pgserver

            server = pgserver.get_server(folder / "data", cleanup_mode="delete")
    except Exception as e:  # the package, its binary or the OS: no server here, say why
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"no PostgreSQL server could start here: {type(e).__name__}: {e}")
    try:
        pg = Postgres(server)
        pg.admin(f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'")
        hba = Path(server.pgdata) / "pg_hba.conf"  # the first matching line decides
        hba.write_text(f"local all {USER} scram-sha-256\n" + hba.read_text())
        pg.admin("SELECT pg_reload_conf()")
        yield pg
    finally:
        # a test's data is thrown away: no shutdown checkpoint, no wait for pooled connections
        pgserver.pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=server.pgdata, user=server.system_user)
        server.cleanup_mode = None  # stopped already; the folder goes below
        server.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


def _storage(url: str) -> str:
    """The override; quoted, as Hydra needs for a URL with `=` in its query."""
    return f'search.storage="{url}"'


def _fixed_hardware(cluster):
    return dataclasses.replace(HARDWARE, gpus_per_node=cluster.gpus_per_node, nodes=cluster.nodes)


def _measured(study: optuna.Study, final: bool = False) -> list:
    return [t for t in study.get_trials(deepcopy=False) if t.state.is_finished() and t.user_attrs.get("claim")
            and TrialRecord.from_attrs(t.user_attrs).measured and bool(t.user_attrs.get("final")) == final]


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _leave_a_killed_trial(study: optuna.Study, plan, final: bool = False) -> int:
    """What a worker SIGKILLed mid-trial leaves: its claim confirmed, the record written before the
    probe, the trial RUNNING, and a worker process that is no more."""
    trial = study.ask()
    claim(study, trial, ("final:" if final else "") + plan_key(plan))
    TrialRecord(plan=plan, final=final, source="estimate").write(trial, "plan", "final", "source")
    trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": _dead_pid()})
    return trial.number


def test_workers_opening_a_fresh_database_at_once_get_one_study(postgres, tmp_path):
    """Issue 20: every worker of a job array opens the storage and creates the study at the same
    moment; without a lock one of them dies on PostgreSQL's catalog (UniqueViolation)."""
    url = postgres.url(postgres.database())
    workers = 6
    barrier, studies, errors = threading.Barrier(workers), [], []

    def worker() -> None:
        barrier.wait()
        try:
            storage = open_storage(url, tmp_path)
            studies.append(optuna.create_study(study_name="shared", storage=storage, load_if_exists=True)._study_id)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, [str(e).splitlines()[0] for e in errors]
    assert len(studies) == workers and len(set(studies)) == 1
    assert optuna.get_all_study_names(open_storage(url, tmp_path)) == ["shared"]


def test_two_workers_cover_what_one_would_and_take_over_a_killed_workers_plan(postgres, tmp_path, monkeypatch):
    """Search logic on the fake probe: plain Optuna with a budget of every valid plan, which one
    worker alone measures each once. Two workers on one study, each with its own run folder, the
    study holding the RUNNING trial of a killed third: together they measure every plan, none
    twice, and the killed worker's plan is run by one of them."""
    monkeypatch.setattr(command, "load_hardware", _fixed_hardware)
    url = postgres.url(postgres.database())
    pc = planner_config([*TINY, "search.use_estimator=false", "search.sampler=random", "search.trials=45",
                         "search.finalists=0", _storage(url)])
    every_plan = candidate_table(pc, _fixed_hardware(pc.cluster))
    assert len(every_plan) == 45
    study = optuna.create_study(study_name="shared", storage=url, direction="maximize")
    plan = plan_from_row(every_plan.iloc[0])
    killed = _leave_a_killed_trial(study, plan)
    probes = [FakeProbe(), FakeProbe()]
    with ThreadPoolExecutor(2) as pool:
        codes = list(pool.map(lambda i: command.search(pc, tmp_path / f"w{i}", "shared", probe=probes[i]), range(2)))
    assert codes == [0, 0] and probes[0].ran and probes[1].ran

    study = optuna.load_study(study_name="shared", storage=url)
    claims = [t.user_attrs["claim"] for t in _measured(study)]
    assert len(claims) == len(set(claims)) and set(claims) == set(every_plan.key)
    assert len(probes[0].ran) + len(probes[1].ran) == 45
    dead = study.trials[killed]
    assert dead.state.name == "FAIL" and "interrupted" in dead.user_attrs["reason"] and dead.user_attrs["claim"] is None


def test_a_finalist_of_a_killed_worker_is_run_by_the_other(tmp_path, monkeypatch):
    """A worker killed while it runs a finalist: the worker still at its finals fails that trial
    and reruns the plan (its explore loop, which fails dead trials too, has ended)."""
    monkeypatch.setattr(command, "load_hardware", _fixed_hardware)
    run = tmp_path / "run"
    pc = planner_config([*TINY, "search.use_estimator=false", "search.sampler=random", "search.trials=3",
                         "search.finalists=2"])
    killed = []

    class KilledAtTheFirstFinal(FakeProbe):
        """At this worker's first finalist, another worker takes every other finalist and is killed."""

        def __call__(self, train, trial_dir, **kw):
            if kw["steps"] == pc.search.final_steps and not killed:
                study = optuna.load_study(study_name="s", storage=f"sqlite:///{run / 'study.db'}")
                for t in _measured(study):
                    if t.user_attrs["status"] == "ok" and plan_from_row(t.user_attrs["plan"]) != train.plan:
                        killed.append(_leave_a_killed_trial(study, plan_from_row(t.user_attrs["plan"]), final=True))
            return super().__call__(train, trial_dir, **kw)

    # every plan equally fast: all are within noise of the best, so both finalists run
    assert command.search(pc, run, "s", probe=KilledAtTheFirstFinal(step_time=lambda train: 0.05)) == 0
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{run / 'study.db'}")
    assert killed and all(study.trials[n].state.name == "FAIL" for n in killed)
    assert len(_measured(study, final=True)) == 2


def _files_with(folder: Path, secret: str) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_a_password_in_the_storage_url_leaves_no_file_and_no_output_line(postgres, tmp_path, monkeypatch, capsys):
    """Issue 19: a search on a study whose URL carries a password, `autotune report`, a rerun, and
    the errors that quote the URL: the password is in no file and no printed line. The report takes
    it from PGPASSWORD, as libpq does, never from the run folder."""
    monkeypatch.setattr(command, "load_hardware", _fixed_hardware)
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no.pgpass"))
    run, database, printed = tmp_path / "run", postgres.database(), []
    args = [*TINY, "search.trials=2", "search.finalists=1"]
    assert command.search(planner_config([*args, _storage(postgres.url(database))]), run, "shared", probe=FakeProbe()) == 0
    info = json.loads((run / "search.json").read_text())
    assert info["storage"] == info["config"]["search"]["storage"] == postgres.url(database, password="***")
    assert f"{USER}:***@" in (run / "report.md").read_text()

    assert main(["report", str(run)]) == 2  # no password in the run folder: none to connect with
    printed.append(capsys.readouterr())
    assert "PGPASSWORD" in printed[-1].err
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    assert main(["report", str(run)]) == 0
    check_reachable(info["storage"])  # the URL as search.json shows it names the study too
    # a rerun with the password in an environment variable, which OmegaConf resolves in memory
    monkeypatch.setenv("AUTOTUNE_DB_PASSWORD", PASSWORD)
    monkeypatch.delenv("PGPASSWORD")
    env_url = postgres.url(database, password="${oc.env:AUTOTUNE_DB_PASSWORD}")
    assert command.search(planner_config([*args, _storage(env_url)]), run, "shared", probe=FakeProbe()) == 0
    assert "3 trials" in (run / "report.md").read_text()

    wrong = postgres.url(database, password="Wrong" + PASSWORD)  # the server's refusal, and Hydra's
    assert main(["search", "--out", str(tmp_path / "w"), *TINY, _storage(wrong)]) == 2
    assert main(["search", "--out", str(tmp_path / "w"), *TINY, f"search.storage=[{postgres.url(database)}]"]) == 2
    printed.append(capsys.readouterr())
    errors = printed[-1].err.strip().splitlines()
    assert "password authentication failed" in errors[-2] and f"{USER}:***@" in errors[-2]
    assert not _files_with(tmp_path, PASSWORD)
    assert not [line for out in printed for line in (out.out + out.err).splitlines() if PASSWORD in line]


def test_hide_secrets_masks_every_password_it_can_read():
    assert hide_secrets("postgresql+psycopg://u:p/w?d@db:5432/x?host=/s") == "postgresql+psycopg://u:***@db:5432/x?host=/s"
    assert hide_secrets("error in ['a=1', 'search.storage=mysql://root:pw@h/db']") == "error in ['a=1', 'search.storage=mysql://root:***@h/db']"
    assert hide_secrets("sqlite:///s.db?password=pw&x=1") == "sqlite:///s.db?password=***&x=1"
    for plain in ("postgresql://u@h/db", "postgresql://h:5432/db", "/runs/a/study.journal", "sqlite:////runs/a/study.db"):
        assert hide_secrets(plain) == plain


def _get(app, path: str):
    environ = {"PATH_INFO": path, "REQUEST_METHOD": "GET"}
    setup_testing_defaults(environ)
    status = []
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    assert status[0].startswith("200"), (status, body[:300])
    return json.loads(body)


def test_optuna_dashboard_lists_the_trials_with_their_plans(postgres, tmp_path, monkeypatch):
    """`optuna-dashboard STORAGE_URL` (its WSGI app, as the command serves it) on a shared study."""
    from optuna_dashboard import wsgi

    monkeypatch.setattr(command, "load_hardware", _fixed_hardware)
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    url = postgres.url(postgres.database(), password=None)  # the password from PGPASSWORD, as libpq reads it
    assert command.search(planner_config([*TINY, "search.trials=3", "search.finalists=0", _storage(url)]),
                          tmp_path / "run", "shared", probe=FakeProbe()) == 0
    app = wsgi(url)
    studies = _get(app, "/api/studies")["study_summaries"]
    assert [s["study_name"] for s in studies] == ["shared"]
    trials = _get(app, f"/api/studies/{studies[0]['study_id']}")["trials"]
    ours = optuna.load_study(study_name="shared", storage=url).trials
    assert [t["number"] for t in trials] == [t.number for t in ours]
    for listed, trial in zip(trials, ours):
        attrs = {a["key"]: a["value"] for a in listed["user_attrs"]}
        assert json.loads(attrs["plan"]) == trial.user_attrs["plan"]  # the dashboard shows attributes as JSON
        assert {p["name"]: p["param_external_value"] for p in listed["params"]} == {k: str(v) for k, v in trial.params.items()}


def _wait_for(predicate, timeout: float, procs: list) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for p in procs:
            assert p.poll() is None, p.stderr.read()
        time.sleep(0.2)
    raise AssertionError("timed out")


@pytest.mark.slow
def test_search_processes_started_together_one_killed_mid_trial(postgres, tmp_path, monkeypatch, capsys):
    """Issues 18 and 20 with real probes: three `autotune search` processes, each with its own run
    folder and the same --name, start at the same moment on a fresh database (one with the password
    in its URL, two with PGPASSWORD); one is SIGKILLed while its probe runs. The others finish the
    one budget between them, none measures a plan twice, the killed trial is failed and its plan
    freed; `autotune report` reads the study from any of the folders; no file and no printed line
    holds the password."""
    database = postgres.database()
    with_password, without = postgres.url(database), postgres.url(database, password=None)
    env = dict(ENV, PGPASSWORD=PASSWORD)
    args = [*TINY, "search.trials=4", "search.finalists=0", "search.use_estimator=false"]

    def worker(name: str, url: str, environ: dict) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "autotune", "search", "--out", name, "--name", "shared", *args,
               _storage(url)]
        return subprocess.Popen(cmd, env=environ, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    procs = [worker("a", with_password, ENV), worker("b", without, env), worker("c", without, env)]
    victim = procs[2]
    study_now = lambda: optuna.load_study(study_name="shared", storage=open_storage(with_password, tmp_path))  # noqa: E731

    def victim_mid_trial() -> bool:
        logs = {p.name for p in (tmp_path / "c" / "logs").glob("trial-*.log")}
        if not logs:  # until its probe starts, leave the fresh database to the workers alone
            return False
        return any(t.state.name == "RUNNING" and t.user_attrs.get("confirmed") and t.user_attrs["worker"]["pid"] == victim.pid
                   and f"trial-{t.number}.log" in logs for t in study_now().get_trials(deepcopy=False))

    try:
        _wait_for(victim_mid_trial, 300, [victim])
    finally:
        os.kill(victim.pid, signal.SIGKILL)
    outputs = [victim.communicate()]
    # the victim's unfinished trial: still RUNNING, or already failed by a worker that saw its pid die
    killed = [t.number for t in study_now().trials if t.state.name in ("RUNNING", "FAIL")
              and t.user_attrs.get("status") != "skipped"  # a sampler proposal it never ran
              and t.user_attrs.get("worker", {}).get("pid") == victim.pid]
    for p in procs[:2]:
        outputs.append(p.communicate(timeout=400))
        assert p.returncode == 0, outputs[-1][1][-3000:]

    study = study_now()
    short = [t.user_attrs["claim"] for t in _measured(study)]
    assert len(short) == len(set(short)) and 4 <= len(short) <= 5  # one budget, no plan twice
    assert killed and all(study.trials[n].state.name == "FAIL" and "interrupted" in study.trials[n].user_attrs["reason"]
                          and study.trials[n].user_attrs["claim"] is None for n in killed)
    # the killed worker's folder reports the shared study too (`autotune report` in this process:
    # the password from PGPASSWORD, as for the processes above)
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    for name in ("a", "c"):
        rc = main(["report", str(tmp_path / name)])
        printed = capsys.readouterr()
        assert rc == 0, printed.err[-2000:]
        outputs.append((printed.out, printed.err))
        assert f"{len(study.trials)} trials" in (tmp_path / name / "report.md").read_text()
    assert (tmp_path / "a" / "launch.sh").is_file() and list((tmp_path / "a" / "logs").glob("trial-*.log"))
    assert not _files_with(tmp_path, PASSWORD)
    assert not [line for out, err in outputs for line in (out + err).splitlines() if PASSWORD in line]
