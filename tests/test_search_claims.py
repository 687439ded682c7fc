"""The claim protocol that keeps search processes sharing one study from running a plan twice."""
import subprocess
import sys

import optuna
import pytest

from autotune.search.study import WORKER, claim, fail_stale_trials


@pytest.fixture
def two_handles(tmp_path):
    """Two Study objects on one journal file, as two search processes would hold them."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path = str(tmp_path / "study.journal")

    def handle():
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))
        return optuna.create_study(study_name="s", storage=storage, load_if_exists=True)

    return handle(), handle()


def test_first_confirmed_claim_wins_even_against_a_lower_number(two_handles):
    a, b = two_handles
    ta, tb = a.ask(), b.ask()
    assert ta.number < tb.number
    assert claim(b, tb, "plan-1") is None
    assert "trial 1" in claim(a, ta, "plan-1")


def test_unconfirmed_race_goes_to_the_lower_number(two_handles):
    a, b = two_handles
    ta, tb = a.ask(), b.ask()
    # a has written its claim but not yet looked: b must back off, a goes on
    ta.set_user_attr("claim", "plan-2")
    ta.set_user_attr("worker", WORKER)
    assert "trial 0" in claim(b, tb, "plan-2")
    tb.set_user_attr("claim", None)  # backing off, as Search.tell_skipped does
    b.tell(tb, state=optuna.trial.TrialState.FAIL)
    assert claim(a, ta, "plan-2") is None


def test_finished_plan_is_never_claimed_again(two_handles):
    a, b = two_handles
    ta = a.ask()
    assert claim(a, ta, "plan-3") is None
    ta.set_user_attr("status", "oom")
    a.tell(ta, state=optuna.trial.TrialState.FAIL)
    assert "trial 0" in claim(b, b.ask(), "plan-3")
    assert claim(b, b.ask(), "plan-4") is None


def test_a_dead_process_trial_is_failed_and_its_plan_freed(two_handles):
    a, b = two_handles
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    ta = a.ask()
    assert claim(a, ta, "plan-5") is None
    ta.set_user_attr("worker", {**WORKER, "pid": int(dead.stdout)})  # as if a killed search held it
    assert fail_stale_trials(b) == 1
    frozen = b.trials[ta.number]
    assert frozen.state == optuna.trial.TrialState.FAIL and "interrupted" in frozen.user_attrs["reason"]
    assert claim(b, b.ask(), "plan-5") is None
