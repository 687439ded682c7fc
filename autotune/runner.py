"""One probe trial in its own process: launch, watch its progress, kill it on timeout or prune.

The probe (`python -m autotune.engine.probe`, under `torch.distributed.run` when the plan needs several
ranks) runs in a new session, so that a timeout or a prune kills the whole process group — torchrun
and every rank — and nothing of it outlives the trial. It also dies with the search process
(PR_SET_PDEATHSIG), so a search killed with SIGKILL leaves no probe running. Only the search process
talks to Optuna: the ranks never see the study.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from autotune.engine.config import TrainConfig, to_yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
POLL_S = 0.2

# on_progress(step, step_time_s) -> True to stop the trial now (pruned); called for each new step.
ProgressFn = Callable[[int, float], bool]


@dataclass
class ProbeRun:
    """What one probe process did: its JSON (or our account of why there is none) and its files."""

    status: str  # ok | oom | error | timeout | pruned
    metrics: Optional[dict[str, Any]]  # the probe's JSON when it wrote one
    reason: str
    wall_s: float
    steps: list[dict[str, Any]] = field(default_factory=list)  # the --progress lines seen
    log: str = ""


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the search process dies (Linux)."""
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def probe_command(config_path: Path, nproc: int, steps: int, warmup: int, out: Path, progress: Path,
                  memory_cap_bytes: Optional[int] = None) -> list[str]:
    args = [str(config_path), "--steps", str(steps), "--warmup", str(warmup), "--out", str(out),
            "--progress", str(progress)]
    if memory_cap_bytes:
        args += ["--max-memory-bytes", str(int(memory_cap_bytes))]
    if nproc == 1:
        return [sys.executable, "-m", "autotune.engine.probe", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "autotune.engine.probe", *args]


def _read_new_lines(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """Complete JSON lines appended to `path` since byte `offset` (a partial last line waits)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    rows = []
    for line in data[:end].splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows, offset + end


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the probe's process group, SIGKILL what is left after a short grace."""
    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_probe(train: TrainConfig, trial_dir: Path, *, steps: int, warmup: int, timeout_s: float,
              memory_cap_bytes: Optional[int] = None, on_progress: Optional[ProgressFn] = None,
              on_poll: Optional[Callable[[], None]] = None, log_path: Optional[Path] = None) -> ProbeRun:
    """Run the probe on `train` in `trial_dir` and say what happened; never raises for the trial's
    own failure (OOM, crash, timeout are data)."""
    trial_dir = trial_dir.resolve()  # the probe runs in the repository root: a relative --out would miss
    trial_dir.mkdir(parents=True, exist_ok=True)
    config_path, out, progress = trial_dir / "config.yaml", trial_dir / "metrics.json", trial_dir / "progress.jsonl"
    for stale in (out, progress):  # a rerun of this trial directory starts clean
        stale.unlink(missing_ok=True)
    config_path.write_text(to_yaml(train))
    log_path = log_path or trial_dir / "probe.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = probe_command(config_path, train.plan.world_size, steps, warmup, out, progress, memory_cap_bytes)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))

    start = time.monotonic()
    seen: list[dict[str, Any]] = []
    offset, stopped = 0, None
    with open(log_path, "wb") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
                                preexec_fn=_die_with_parent)
        try:
            while proc.poll() is None:
                time.sleep(POLL_S)
                rows, offset = _read_new_lines(progress, offset)
                for row in rows:
                    seen.append(row)
                    if on_progress is not None and stopped is None and on_progress(int(row["step"]), float(row["step_time_s"])):
                        stopped = "pruned"
                if on_poll is not None:
                    on_poll()
                if stopped is None and time.monotonic() - start > timeout_s:
                    stopped = "timeout"
                if stopped:
                    _kill_group(proc)
                    break
        finally:
            if proc.poll() is None:  # the search itself is being interrupted
                _kill_group(proc)
    wall = time.monotonic() - start
    rows, offset = _read_new_lines(progress, offset)
    seen += rows
    log_text = _tail(log_path)

    if stopped == "timeout":
        return ProbeRun("timeout", None, f"no result after search.trial_timeout_s={timeout_s:g}s; process group killed",
                        wall, seen, log_text)
    if stopped == "pruned":
        return ProbeRun("pruned", None, f"pruned after {len(seen)} step(s): slower than the trials before it",
                        wall, seen, log_text)
    try:
        metrics = json.loads(out.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        last = log_text.strip().splitlines()[-1] if log_text.strip() else "no output"
        return ProbeRun("error", None, f"probe exited with status {proc.returncode} and no metrics: {last}",
                        wall, seen, log_text)
    status = metrics.get("status", "error")
    reason = metrics.get("error") or ("" if status == "ok" else f"probe status {status}")
    return ProbeRun(status, metrics, str(reason), wall, seen, log_text)
