"""A trial's probe process: timeout, crash and prune are recorded with their reason, and the search
goes on. The probe is replaced by a few lines of plain Python (no torch import: well under a second)."""
import os
import sys
from pathlib import Path

import optuna
import pytest

from autotune import runner
from autotune.config import planner_config
from autotune.hardware import load_hardware
from autotune.search.candidates import candidate_table
from autotune.search.loop import Search

# writes its pid beside the progress file and two progress lines as the probe does, then does
# what argv[2] says
FAKE_PROBE = """
import json, os, sys, time
with open(sys.argv[1] + ".pid", "w") as f:
    f.write(str(os.getpid()))
with open(sys.argv[1], "a") as f:
    for step in (1, 2):
        f.write(json.dumps({"step": step, "step_time_s": 0.5}) + "\\n")
        f.flush()
if sys.argv[2] == "crash":
    print("RuntimeError: boom", file=sys.stderr)
    sys.exit(3)
time.sleep(60)
open(sys.argv[1] + ".done", "w").close()
"""


@pytest.fixture
def fake_probe(monkeypatch):
    def use(behaviour: str) -> None:
        def command(config_path, nproc, steps, warmup, out, progress, memory_cap_bytes=None):
            return [sys.executable, "-c", FAKE_PROBE, str(progress), behaviour]
        monkeypatch.setattr(runner, "probe_command", command)
    return use


def _train():
    return planner_config(["job.global_batch=4", "job.seq_len=32"]).train


def _assert_killed(progress: Path) -> None:
    """The hanging fake probe (a 60 s sleep) was killed, not waited for: gone, and never finished."""
    with pytest.raises(ProcessLookupError):
        os.kill(int(Path(f"{progress}.pid").read_text()), 0)
    assert not Path(f"{progress}.done").exists()


def test_timeout_kills_the_probe_and_keeps_its_steps(tmp_path, fake_probe):
    fake_probe("hang")
    run = runner.run_probe(_train(), tmp_path / "t", steps=4, warmup=1, timeout_s=1.5)
    assert run.status == "timeout" and "search.trial_timeout_s=1.5s" in run.reason
    assert [r["step"] for r in run.steps] == [1, 2]
    _assert_killed(tmp_path / "t" / "progress.jsonl")


def test_crash_is_an_error_with_the_last_log_line(tmp_path, fake_probe):
    fake_probe("crash")
    run = runner.run_probe(_train(), tmp_path / "t", steps=4, warmup=1, timeout_s=30)
    assert run.status == "error" and "status 3" in run.reason and "RuntimeError: boom" in run.reason


def test_prune_stops_the_probe_at_the_pruners_word(tmp_path, fake_probe):
    fake_probe("hang")
    seen = []
    run = runner.run_probe(_train(), tmp_path / "t", steps=4, warmup=0, timeout_s=30,
                           on_progress=lambda step, t: seen.append(step) or step == 2)
    assert run.status == "pruned" and seen == [1, 2] and "after 2 step(s)" in run.reason
    _assert_killed(tmp_path / "t" / "progress.jsonl")


def test_search_records_a_crashed_trial_and_goes_on(tmp_path, fake_probe):
    fake_probe("crash")
    pc = planner_config(["job.global_batch=4", "job.seq_len=32", "search.trials=2", "search.finalists=0"])
    hw = load_hardware(pc.cluster)
    search = Search(pc, tmp_path, "s", hw, candidate_table(pc, hw), optuna.storages.InMemoryStorage())
    search.explore()  # both trials crash: recorded, and the budget is still spent on two plans
    trials = search.ledger().measured()
    assert len(trials) == 2 and len({t.user_attrs["claim"] for t in trials}) == 2
    for t in trials:
        assert t.state == optuna.trial.TrialState.FAIL and t.user_attrs["status"] == "error"
        assert "RuntimeError: boom" in t.user_attrs["reason"]
    assert (tmp_path / "logs" / f"trial-{trials[0].number}.log").is_file()
