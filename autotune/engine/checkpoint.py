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
from torch.distributed.checkpoint.api import CheckpointException
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    _init_optim_state,
    get_model_state_dict,
    set_model_state_dict,
)

from autotune.engine import dist
from autotune.engine.config import ConfigError, JobConfig, ModelConfig
from autotune.engine.files import fsync_dir, write_atomic
from autotune.engine.model import build_model
from autotune.engine.parallel import unwrap

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


def start_checkpoint(job: JobConfig) -> Path | None:
    """The checkpoint a run starts from: the newest of its own (with job.resume), else the one
    job.resume_from names (a step folder, a ckpt folder or a run's out_dir: a run moved to another
    folder, or continued from another run's weights)."""
    own = latest_checkpoint(checkpoint_root(job)) if job.resume else None
    if own is not None or not job.resume_from:
        return own
    path = Path(job.resume_from)
    for candidate in (path, path / "ckpt"):
        found = candidate if is_complete(candidate) else latest_checkpoint(candidate)
        if found is not None:
            return found
    raise ConfigError(f"job.resume_from={job.resume_from}: no complete checkpoint there; give a step folder "
                      "(<out_dir>/ckpt/step-N) or a run's out_dir")


def check_readable(path: Path, model: ModelConfig) -> None:
    """Fail early, before any process is launched, on a checkpoint whose metadata cannot be read
    or that holds another model's parameters (DCP would load a model with fewer layers silently)."""
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except (Exception, CheckpointException) as e:  # any failure to parse is the same user-facing problem
        raise _corrupt(path, e) from None
    # every shard file as long as the metadata says: a truncated or missing one would fail on
    # every rank, after the launch
    ends: dict[str, int] = {}
    for info in metadata.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        size = (path / name).stat().st_size if (path / name).is_file() else None
        if size is None or size < end:
            raise _corrupt(path, EOFError(f"{name} is {'missing' if size is None else f'{size} bytes of {end}'}"))
    saved = {key.removeprefix("model."): tuple(meta.size) for key, meta in metadata.state_dict_metadata.items()
             if key.startswith("model.") and hasattr(meta, "size")}
    wanted = {name: tuple(p.shape) for name, p in build_model(model, device="meta").named_parameters()}
    if saved != wanted:
        name = min(saved.keys() ^ wanted.keys(), default=None) or next(n for n in wanted if saved[n] != wanted[n])
        raise ConfigError(
            f"checkpoint {path} holds another model ({name}: {list(saved[name]) if name in saved else 'absent'} "
            f"there, {list(wanted[name]) if name in wanted else 'absent'} here); train with the model it was "
            f"saved from, or set job.resume=false (or another job.out_dir) to start afresh"
        )


def _corrupt(path: Path, e: BaseException) -> ConfigError:
    lines = str(e).strip().splitlines() or [type(e).__name__]
    # DCP wraps the per-rank tracebacks: their last line is the real failure
    detail = lines[-1] if isinstance(e, CheckpointException) else f"{type(e).__name__}: {lines[0]}"
    return ConfigError(
        f"checkpoint {path} cannot be read ({detail[:300]}); delete that folder to resume from an "
        f"older one, or set job.resume=false to start afresh"
    )


# --- what goes into a checkpoint ---------------------------------------------------------------

def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """This rank's optimizer states keyed by parameter name ("layers.0.attn.wq.weight.exp_avg").

    One format for every plan: under FSDP2 (ZeRO 1-3) the states are DTensor shards, under DDP or
    `replicate` (ZeRO 0) every rank holds all (DCP writes one copy). DCP
    reshards on load, so a checkpoint resumes under another dp degree or ZeRO stage. Hyperparameters
    are not saved: they come from the config, and the lr from the schedule.
    """
    _init_optim_state(optimizer)  # states exist before the first step too, so loading can fill them
    names = {p: n for n, p in unwrap(model).named_parameters()}
    return {
        f"{names[p]}.{key}": value
        for group in optimizer.param_groups
        for p in group["params"]
        for key, value in optimizer.state[p].items()
    }


def _state(model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": get_model_state_dict(model),
        "optim": optimizer_state(model, optimizer),
        "extra": extra,
        "rng": torch.get_rng_state(),
    }


def save(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> Path:
    """Write checkpoint `step-<step>` atomically (collective: every rank calls it)."""
    final, tmp = root / f"step-{step}", root / f"step-{step}.tmp"
    if dist.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash while saving this step
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save(_state(model, optimizer, extra), checkpoint_id=str(tmp))
    dist.barrier()
    if dist.rank() == 0:
        _fsync_tree(tmp)
        write_atomic(tmp / COMPLETE, f"{step}\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        write_atomic(root / LATEST, final.name + "\n")
    dist.barrier()
    return final


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> dict[str, Any]:
    """Load a checkpoint into the model and optimizer in place and return its `extra` (step,
    schedule, scaler); `extra` is a template of the same structure (the fresh run's values)."""
    state = _state(model, optimizer, extra)
    try:
        dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        raise _corrupt(path, e) from None
    set_model_state_dict(model, state["model"])  # the optimizer's states were loaded in place
    torch.set_rng_state(state["rng"])
    return state["extra"]


# --- durable files ---------------------------------------------------------------------------

def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


