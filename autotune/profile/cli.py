"""`autotune profile`: the model and hardware profile, printed and written to profile.json."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

from autotune.engine.config import TrainConfig
from autotune.engine.files import write_atomic
from autotune.profile.summary import model_profile


def cli(argv: list[str]) -> int:
    from autotune.config import planner_config
    from autotune.hardware import load_hardware

    parser = argparse.ArgumentParser(prog="autotune profile", description="model and hardware profile -> profile.json")
    parser.add_argument("--out", default=None, help="folder for profile.json (default: print only)")
    args, overrides = parser.parse_known_args(argv)
    cfg = planner_config(overrides)
    train: TrainConfig = cfg.train
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: measure the collectives too
        from autotune.engine.dist import init_distributed, rank, shutdown

        init_distributed()
        me = rank()
        try:
            hw = load_hardware(cfg.cluster)
        finally:
            shutdown()
        if me != 0:
            return 0
    else:
        hw = load_hardware(cfg.cluster)
    if cfg.cluster.gpu == "auto":  # this machine: the engine's own speed in each precision it runs
        from autotune.device_prior import with_engine_prior
        from autotune.hardware import supported_precisions

        hw = with_engine_prior(hw, train.model, train.job.seq_len, supported_precisions(hw))
    prof = model_profile(train.model, train.job.seq_len, train.plan.micro_batch)
    prof["hardware"] = hw.to_dict()
    prof["cluster"] = dataclasses.asdict(cfg.cluster)
    pc, fl = prof["params"], prof["flops_per_token"]
    active = f" ({prof['active_params']['total']:,} active per token)" if train.model.n_experts else ""
    print(f"model {train.model.name}: {pc['total']:,} parameters{active} "
          + ", ".join(f"{k} {v:,}" for k, v in pc.items() if k != "total" and v))
    print(f"FLOPs per token at seq_len {fl['seq_len']}: {fl['total']:.4g} (6N, N = {fl['matmul_params']:,}; "
          f"attention {fl['attention']:.3g})")
    print(f"saved for backward per block at micro_batch {train.plan.micro_batch}, seq_len {fl['seq_len']}:")
    for key, v in prof["activations"]["at"]["bytes"].items():
        print(f"  {key:28s} block {v['block_bytes'] / 2**20:10.2f} MiB   outside {v['outside_bytes'] / 2**20:10.2f} MiB")
    print(f"memory-bound bytes per block at micro_batch {train.plan.micro_batch} (forward / backward):")
    for key, v in prof["traffic"]["at"]["bytes"].items():
        print(f"  {key:28s} {v['block_fwd'] / 2**20:10.2f} / {v['block_bwd'] / 2**20:10.2f} MiB   "
              f"outside {v['outside_fwd'] / 2**20:10.2f} / {v['outside_bwd'] / 2**20:10.2f} MiB")
    kind = "measured" if hw.measured else "catalog"
    print(f"hardware ({kind}): {hw.n_gpus} x {hw.gpu}, {hw.memory_bytes / 2**30:.1f} GiB, "
          + ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in hw.peak_flops.items())
          + f", memory {hw.hbm_bytes_per_s / 1e9:.0f} GB/s, link {hw.intra_node_bytes_per_s / 1e9:.0f} GB/s"
          + "".join(f", {k} {v / 1e9:.2f} GB/s" for k, v in hw.collectives.items()))
    print(f"time model factors: matmul {hw.matmul_efficiency:.3g}, attention {hw.attention_efficiency:.3g}, "
          f"memory {hw.memory_efficiency:.3g} of peak; overlap slowdown {hw.overlap_slowdown:.3g}; "
          f"collective latency {hw.collective_latency_s * 1e6:.0f} us")
    if args.out:
        path = Path(args.out) / "profile.json"
        write_atomic(path, json.dumps(prof, indent=2))
        print(f"wrote {path}")
    return 0
