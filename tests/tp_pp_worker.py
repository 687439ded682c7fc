"""Worker of tests/test_tp_pp.py: train each config of a JSON spec for its job.steps and write the
loss trajectories (rank 0). Run alone for single-process references, or under torchrun, where
every config's plan must use all the launched ranks (several plans share one launch's start-up).

    python tests/tp_pp_worker.py SPEC.json OUT.json

SPEC: {"runs": {name: config dict} (OUT: loss and grad_norm per step), "resume": {name: {"config": ..., "save_at": k}},
"load": {name: {"config": ..., "checkpoint": path}}}. A resume run trains save_at steps,
checkpoints (into job.out_dir/ckpt/step-k), goes on to job.steps, then a fresh engine loads the
checkpoint and trains from save_at again: OUT holds both trajectories. A load run starts from a
checkpoint (written under any plan) and trains to job.steps.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from engine import dist
from engine.config import build_train_config
from engine.train import Engine, reduce_loss


def losses(engine: Engine, steps: range) -> list[float]:
    return [reduce_loss(engine.step(step).loss)[0] for step in steps]


def trajectory(engine: Engine, steps: range) -> dict[str, list[float]]:
    """Loss and global gradient norm (before clipping) of each step."""
    results = [engine.step(step) for step in steps]
    return {"loss": [reduce_loss(r.loss)[0] for r in results], "grad_norm": [float(r.grad_norm) for r in results]}


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    device = dist.init_distributed()
    rank0 = dist.rank() == 0
    out: dict = {}
    try:
        for name, config in spec.get("runs", {}).items():
            cfg = build_train_config(config)
            out[name] = trajectory(Engine(cfg, device), range(cfg.job.steps))
        for name, run in spec.get("resume", {}).items():
            cfg, save_at = build_train_config(run["config"]), run["save_at"]
            root = Path(cfg.job.out_dir) / "ckpt"
            engine = Engine(cfg, device)
            first = losses(engine, range(save_at))
            path = engine.save(root, save_at)
            first += losses(engine, range(save_at, cfg.job.steps))
            resumed = Engine(cfg, device)
            start = resumed.load(path)
            out[name] = {"straight": first, "resumed": losses(resumed, range(start, cfg.job.steps)), "start": start}
        for name, run in spec.get("load", {}).items():
            cfg = build_train_config(run["config"])
            engine = Engine(cfg, device)
            start = engine.load(Path(run["checkpoint"]))
            out[name] = {"start": start, "losses": losses(engine, range(start, cfg.job.steps))}
    finally:
        dist.shutdown()
    if rank0:  # the losses are all-reduced: every rank holds the same
        Path(out_path).write_text(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:3])
