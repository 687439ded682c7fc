"""The search's progress on stderr: one line per trial with what ran, the trials done out of the
budget, the best so far, and the time spent and left."""
from __future__ import annotations

import sys
import time

import numpy as np

from autotune.config import SearchConfig
from autotune.engine.config import PlanConfig
from autotune.plans import plan_label


def rate(value: float) -> str:
    """A throughput as people read it: 10,258 rather than 1.026e+04."""
    return f"{float(value):,.0f}" if abs(float(value)) >= 100 else f"{float(value):.3g}"


def clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """Times the trials of this process and prints a line after each."""

    def __init__(self, search: SearchConfig):
        self.s = search
        self.started = time.monotonic()
        self.trial_seconds: list[float] = []

    def timed(self, seconds: float) -> None:
        self.trial_seconds.append(seconds)

    def trial_done(self, number: int, status: str, plan: PlanConfig, final: bool, *, done: int, finals_done: int,
                   best: float | None, exploring: bool) -> None:
        """`done` short trials spent of search.trials, `finals_done` finalists run; `exploring`:
        short trials may still follow (the search has not stopped early)."""
        per = float(np.mean(self.trial_seconds)) if self.trial_seconds else 0.0
        finals_left = max(0, self.s.finalists - finals_done)
        shorts_left = max(0, self.s.trials - done) if exploring else 0
        left = (shorts_left + finals_left * self.s.final_steps / self.s.probe_steps) * per
        unit = "tokens/GPU-s" if self.s.objective == "cost" else "tokens/s"
        best_text = f"best {rate(best)} {unit}" if best is not None else "no result yet"
        print(f"[search] trial {number}{' (final)' if final else ''} {status}: {plan_label(plan)} | "
              f"{done}/{self.s.trials} run, {best_text} | {clock(time.monotonic() - self.started)} elapsed, "
              f"~{clock(left)} left", file=sys.stderr, flush=True)
