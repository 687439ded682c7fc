"""Sharded, atomic training checkpoints with torch.distributed.checkpoint (DCP).

Layout under `<job.out_dir>/ckpt/`:

    step-120/            a complete checkpoint: DCP shards + .metadata + COMPLETE
    step-140.tmp/        being written (or abandoned by a crash): never resumed from
    latest               the name of the newest complete checkpoint, replaced atomically

Every rank writes its shards into `step-N.tmp/`; once all have finished, rank 0 syncs the files,
writes the COMPLETE marker, renames the folder to `step-N/` and replaces `latest`. A checkpoint
holds the model and optimizer (sharded as they run, so it reloads under another dp degree or
ZeRO stage), the step (which fixes the data position: batches are a function of the step), the lr
schedule, the fp16 loss scaler and the RNG state.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    _init_optim_state,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.optim import ZeroRedundancyOptimizer

from engine import dist
from engine.config import ConfigError, JobConfig
from engine.parallel import unwrap

COMPLETE = "COMPLETE"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_root(job: JobConfig) -> Path:
    return Path(job.out_dir) / "ckpt"


# --- finding what to resume from ------------------------------------------------------------------

def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file() and (path / ".metadata").is_file()


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under root: `latest` if it names one, else the highest step."""
    marker = root / LATEST
    if marker.is_file():
        named = root / marker.read_text().strip()
        if _STEP_DIR.match(named.name) and is_complete(named):
            return named
    steps = sorted(
        (int(m.group(1)), p) for p in root.glob("step-*") if (m := _STEP_DIR.match(p.name)) and is_complete(p)
    ) if root.is_dir() else []
    return steps[-1][1] if steps else None


def check_readable(path: Path) -> None:
    """Fail early, before any process is launched, on a checkpoint whose metadata cannot be read."""
    try:
        dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # any failure to parse is the same user-facing problem
        raise _corrupt(path, e) from None


def _corrupt(path: Path, e: BaseException) -> ConfigError:
    return ConfigError(
        f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
        f"delete that folder to resume from an older one, or set job.resume=false to start afresh"
    )


# --- what goes into a checkpoint ---------------------------------------------------------------

def _zero1_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """This rank's ZeRO-1 optimizer states, keyed by parameter name: each rank holds other names, so
    DCP writes every state once and a rank reloading under any dp degree finds its own."""
    local = optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer
    _init_optim_state(local)  # states exist before the first step too, so loading can fill them
    names = {p: n for n, p in unwrap(model).named_parameters()}
    return {
        f"{names[p]}.{key}": value
        for group in local.param_groups
        for p in group["params"]
        for key, value in local.state[p].items()
    }


def _state(model: nn.Module, optimizer: torch.optim.Optimizer, zero1: bool) -> dict[str, Any]:
    if zero1:
        model_sd, optim_sd = get_state_dict(model, []), _zero1_optimizer_state(model, optimizer)
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def save(
    root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, zero1: bool, extra: dict[str, Any]
) -> Path:
    """Write checkpoint `step-<step>` atomically (collective: every rank calls it)."""
    final, tmp = root / f"step-{step}", root / f"step-{step}.tmp"
    if dist.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash while saving this step
        tmp.mkdir(parents=True)
    dist.barrier()
    state = _state(model, optimizer, zero1)
    state["extra"] = extra
    state["rng"] = torch.get_rng_state()
    dcp.save(state, checkpoint_id=str(tmp))
    dist.barrier()
    if dist.rank() == 0:
        _fsync_tree(tmp)
        _write_atomic(tmp / COMPLETE, f"{step}\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _write_atomic(root / LATEST, final.name + "\n")
    dist.barrier()
    return final


def load(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, zero1: bool, extra: dict[str, Any]
) -> dict[str, Any]:
    """Load a checkpoint into the model and optimizer in place; returns its `extra` (step, schedule, ...).
    `extra` is a template of the same structure (the fresh run's values)."""
    state = _state(model, optimizer, zero1)
    state["extra"] = extra
    state["rng"] = torch.get_rng_state()
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as e:
        raise _corrupt(path, e) from None
    if zero1:
        set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={})
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    torch.set_rng_state(state["rng"])
    return state["extra"]


# --- durable files ---------------------------------------------------------------------------

def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
