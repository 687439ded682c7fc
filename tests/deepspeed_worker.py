"""One rank of tests/test_deepspeed.py's launch: for each case, the engine's own loop and DeepSpeed's
engine train the same config (the ds_config as autotune.emit writes it) in this one process group,
each writing its metrics.jsonl. `python -m torch.distributed.run --nproc_per_node 2 tests/deepspeed_worker.py
CASES.json OUT_DIR`; CASES.json maps a case name to its training config (model, job, plan)."""
import json
import sys
import traceback
from pathlib import Path

import torch

from autotune.emit import ds_config
from autotune.engine import deepspeed_train, dist, train
from autotune.engine.config import build_train_config, with_changes


def main(cases_path: str, out: str) -> None:
    torch.set_num_threads(1)
    device = dist.init_distributed()
    deepspeed_train.init_deepspeed(device)
    for name, data in json.loads(Path(cases_path).read_text()).items():
        cfg = build_train_config(data)
        folder = Path(out) / name
        ds = ds_config(cfg)
        try:
            with train.StopFlag() as stop:
                deepspeed_train._train(with_changes(cfg, job={"out_dir": str(folder / "deepspeed")}), ds, device, stop)
                train._train(with_changes(cfg, job={"out_dir": str(folder / "engine")}), device, stop)
        except Exception:  # a case DeepSpeed refuses: recorded for the test, the next case still runs
            if dist.rank() == 0:
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "error.txt").write_text(traceback.format_exc())
        dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
