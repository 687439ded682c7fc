"""`autotune export RUN_DIR --out DIR`: a trained run's checkpoint as a Hugging Face model folder.

The run's newest complete checkpoint (torch distributed checkpoint, sharded however the run was:
DCP reassembles the full tensors in this one process) is loaded into the engine's model, which
autotune.engine.hf writes as config.json plus safetensors: what transformers' `from_pretrained`
loads, and `model.init_from` starts from. The model comes from the run's own config.yaml (written by
the engine when it trains), or from `--config` for a run trained before that. The folder is written
beside DIR under a temporary name and renamed into place: DIR is whole or absent.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch.distributed.checkpoint as dcp

from autotune.engine import checkpoint
from autotune.engine.config import ConfigError, ModelConfig, load_train_config
from autotune.engine.files import fsync_dir
from autotune.engine.hf import save_hf_weights
from autotune.engine.model import Transformer, build_model
from autotune.engine.train import RUN_CONFIG


def find_checkpoint(run: Path) -> Path:
    """A run's out_dir, its ckpt folder or one step folder -> the checkpoint to export."""
    for candidate in (run, run / "ckpt"):
        found = candidate if checkpoint.is_complete(candidate) else checkpoint.latest_checkpoint(candidate)
        if found is not None:
            return found
    raise ConfigError(f"{run}: no complete checkpoint there; give a run's out_dir (with ckpt/step-N) or a step folder")


def run_model_config(run: Path, ckpt: Path, config: str | None) -> ModelConfig:
    """The model of the run: from --config, else from the config.yaml the run wrote."""
    if config is None:
        # <out_dir>/config.yaml, whether given the out_dir, its ckpt folder or a step folder
        found = [p / RUN_CONFIG for p in (run, *ckpt.parents) if (p / RUN_CONFIG).is_file()]
        if not found:
            raise ConfigError(f"{run}: no {RUN_CONFIG} beside the checkpoint; give the config it was trained with "
                              "as --config CONFIG.yaml")
        config = str(found[0])
    return load_train_config(config).model


def load_checkpoint_model(ckpt: Path, model_cfg: ModelConfig) -> Transformer:
    """The engine's model with the checkpoint's weights (full tensors, on the CPU)."""
    checkpoint.check_readable(ckpt, model_cfg)  # the same model, every shard file whole
    model = build_model(model_cfg, "cpu", seed=None)
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)
    model.load_state_dict(state["model"])
    return model


def export_run(run: str | Path, out: str | Path, config: str | None = None) -> Path:
    """Write the run's newest checkpoint as a Hugging Face folder `out`; returns the checkpoint used."""
    run, out = Path(run), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not an empty folder; give a new folder")
    ckpt = find_checkpoint(run)
    model = load_checkpoint_model(ckpt, run_model_config(run, ckpt, config))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        save_hf_weights(model, tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ckpt


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="autotune export",
                                     description="A trained run's checkpoint as a Hugging Face model folder.")
    parser.add_argument("run", help="a run's out_dir (or one of its ckpt/step-N folders)")
    parser.add_argument("--out", required=True, help="the Hugging Face folder to write (new or empty)")
    parser.add_argument("--config", help="the training config of the run, if it has no config.yaml")
    args = parser.parse_args(argv)
    ckpt = export_run(args.run, args.out, args.config)
    print(f"wrote {args.out} (config.json, model.safetensors) from {ckpt}")
    return 0
