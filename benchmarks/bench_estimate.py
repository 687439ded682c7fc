"""How fast the cost model is: estimate_frame over N random plans on one CPU core.

    python benchmarks/bench_estimate.py [--plans 100000] [--model llama-3-8b] [--cluster 4x8xh100]

Prints one JSON line (plans, seconds, plans per second) and, with --out, writes it there.
The first call (activation fit from the cache, per-rank layouts) is made before timing.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pandas as pd
import torch

from autotune.config import planner_config
from autotune.estimate import estimate_frame
from autotune.hardware import load_hardware


def random_plans(n: int, n_gpus: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    tp = rng.choice([1, 2, 4, 8], n)
    pp = rng.choice([1, 2, 4], n)
    sched = rng.choice(["1f1b", "gpipe", "interleaved_1f1b"], n)
    return pd.DataFrame({
        "zero_stage": rng.integers(0, 4, n), "offload_optimizer": rng.random(n) < 0.2, "offload_params": False,
        "micro_batch": rng.choice([1, 2, 4, 8], n), "grad_accum": None,
        "precision": rng.choice(["fp32", "bf16", "fp16"], n),
        "activation_checkpointing": rng.choice(["none", "full", "selective"], n),
        "checkpoint_every_k": rng.choice([2, 4], n), "dp": n_gpus // (tp * pp), "tp": tp, "pp": pp,
        "pp_schedule": sched, "pp_virtual_stages": np.where(sched == "interleaved_1f1b", 2, 1),
        "sequence_parallel": (tp > 1) & (rng.random(n) < 0.5), "kernels": rng.choice(["torch", "triton"], n),
        "compile": False,
    })


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plans", type=int, default=100_000)
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--cluster", default="4x8xh100")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = planner_config([f"model={args.model}", f"cluster={args.cluster}", "job.seq_len=4096", "job.global_batch=512"])
    hw = load_hardware(cfg.cluster)
    plans = random_plans(args.plans, cfg.cluster.n_gpus)
    estimate_frame(cfg.train.model, cfg.train.job, plans, hw)  # warm: fit cache, layouts
    times = []
    for _ in range(args.repeats):
        t0 = time.process_time()  # CPU time of this process: the host may be shared
        out = estimate_frame(cfg.train.model, cfg.train.job, plans, hw)
        times.append(time.process_time() - t0)
    best = min(times)
    result = {"plans": args.plans, "model": args.model, "cluster": args.cluster, "cpu_seconds": round(best, 3),
              "plans_per_s": round(args.plans / best), "fits": int(out["fits"].sum()), "threads": 1}
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
