"""A mixture-of-experts training step on the engine: step time, MFU, peak memory and the router's
load imbalance, measured by the engine's probe, next to the cost model's estimate of the same plan.

    python benchmarks/bench_moe.py --out benchmarks/results/moe-gpu.json
    python benchmarks/bench_moe.py --models mixtral-8x7b:2 qwen2-57b-a14b:1 --micro-batches 1 2 --out /tmp/m.json
    python benchmarks/bench_moe.py --device cpu --models tiny-moe --micro-batches 1 --seq-len 32 --precision fp32 \
        --steps 2 --warmup 1 --nproc 2 --ep 2 --out /tmp/m.json

A model is `NAME[:LAYERS]`: a conf/model/ preset, cut to LAYERS blocks (its widths, experts and
router as published) so that one GPU holds its training states. Each (model, micro-batch) row is
one `python -m autotune.engine.probe` run, under torchrun with --nproc ranks (dp = nproc, plan.ep
= --ep; ZeRO 0, one micro-batch per rank per step), in its own process so that an OOM is that
row's status. The probe's figures: median step time of the measured steps, MFU from the active
parameters' FLOPs (6N + 12·L·a·d·s, autotune.profile.flops_per_token) against the catalog's dense
peak, peak allocated memory (max over ranks), and `moe`: the most tokens any expert got in a step
over the mean per expert, per MoE layer (mean and max over layers), the load-balancing loss and the
dropped share (engine.moe.step_stats). The estimate is autotune.estimate's for the same plan on the
device's catalog entry (a CPU: measured by hardware.probe_local), uncalibrated; its imbalance is
the evenly-routing router's prior (autotune.estimate.routing), the measured one the calibration
would take.

`--device auto` (the default) takes the GPU when there is one and otherwise the CPU; the JSON and
the table name the device, so a CPU smoke run is never read as a GPU figure.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_tp_slice import resolve_device  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["mixtral-8x7b:2", "qwen2-57b-a14b:1"],
                   help="NAME[:LAYERS]: a conf/model/ preset, cut to LAYERS blocks")
    p.add_argument("--micro-batches", nargs="+", type=int, default=[1, 2])
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--nproc", type=int, default=1, help="ranks (data-parallel), one per GPU")
    p.add_argument("--ep", type=int, default=1, help="plan.ep: ranks per group that split the experts")
    p.add_argument("--steps", type=int, default=5, help="measured steps")
    p.add_argument("--warmup", type=int, default=2, help="steps before measuring (allocator, autotuning)")
    p.add_argument("--timeout", type=int, default=600, help="seconds per row")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: cuda when available, else cpu (a smoke run, not a benchmark)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "moe.json"))
    return p.parse_args(argv)


def train_config(spec: str, micro: int, args: argparse.Namespace, out_dir: str) -> dict:
    """The engine config of one row: the preset, cut to its layers, one micro-batch per rank per step."""
    import yaml

    name, _, layers = spec.partition(":")
    model = yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text())
    if layers:
        model |= {"n_layers": int(layers), "name": f"{name}:{layers}"}
    job = {"seq_len": args.seq_len, "global_batch": micro * args.nproc, "steps": args.steps + args.warmup,
           "out_dir": out_dir}
    plan = {"zero_stage": 0, "precision": args.precision, "micro_batch": micro, "dp": args.nproc, "ep": args.ep}
    return {"model": model, "job": job, "plan": plan}


def probe(raw: dict, args: argparse.Namespace, tmp: Path) -> dict:
    """The engine's probe on `raw`, in its own process(es); its JSON result."""
    import yaml

    config, out = tmp / "config.yaml", tmp / "metrics.json"
    config.write_text(yaml.safe_dump(raw))
    launcher = [sys.executable] if args.nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if args.device == "cpu":
        env |= {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([*launcher, "-m", "autotune.engine.probe", str(config), "--steps", str(args.steps),
                           "--warmup", str(args.warmup), "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    if not out.is_file():
        return {"status": "error", "error": (proc.stderr.strip().splitlines() or ["no result"])[-1]}
    return json.loads(out.read_text())


def estimated(raw: dict, hw) -> dict:
    """The cost model's figures for the row's plan on `hw`."""
    from autotune.engine.config import build_train_config
    from autotune.estimate import estimate_frame, plan_frame

    cfg = build_train_config(raw)
    row = estimate_frame(cfg.model, cfg.job, plan_frame([cfg.plan]), hw).iloc[0]
    return {"est_step_time_s": float(row["step_time_s"]), "est_allocated_bytes": float(row["allocated_bytes"]),
            "est_ep_comm_s": float(row["time_ep_comm_s"]), "est_imbalance": float(row["expert_imbalance"]),
            "est_load": float(row["expert_load"]), "est_fits": bool(row["fits"])}


def run_row(spec: str, micro: int, args: argparse.Namespace, hw) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        raw = train_config(spec, micro, args, tmp)
        row = {"model": spec, "micro_batch": micro, "seq_len": args.seq_len, "precision": args.precision,
               "dp": args.nproc, "ep": args.ep}
        try:
            row |= estimated(raw, hw)
            result = probe(raw, args, Path(tmp))
        except subprocess.TimeoutExpired:
            return row | {"status": "timeout", "error": f"the probe ran past --timeout {args.timeout} s"}
        except Exception as e:  # a bad model name or plan is the row's error, not the whole run's
            return row | {"status": "error", "error": f"{type(e).__name__}: {e}".splitlines()[0]}
    keys = ("status", "step_time_s", "tokens_per_s", "mfu", "peak_mem_bytes", "peak_mem_kind", "moe", "device", "error")
    return row | {k: result.get(k) for k in keys}


def local_hardware(device: str, ranks: int):
    """What the estimate is made for: the GPU's catalog entry, or this CPU as measured, with the
    row's ranks on one node (this machine)."""
    import dataclasses

    import torch

    from autotune.hardware import catalog_gpu_of, probe_local

    hw = catalog_gpu_of(torch.cuda.get_device_name()) if device == "cuda" else None
    return dataclasses.replace(hw or probe_local(), gpus_per_node=ranks, nodes=1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from autotune.engine.files import write_atomic

    device = resolve_device(args)
    if device is None:
        return 2
    print(f"device: {device}", flush=True)
    hw = local_hardware(args.device, args.nproc)
    rows: list[dict] = []
    result = {"benchmark": "moe", "device": device, "estimated_for": hw.gpu,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "steps": args.steps, "warmup": args.warmup, "rows": rows}
    for spec in args.models:
        for micro in args.micro_batches:
            row = run_row(spec, micro, args, hw)
            rows.append(row)
            moe = row.get("moe") or {}
            print(f"{spec:20s} b={micro:<3d} {row['status']:7s} {row.get('tokens_per_s') or 0:>12,.0f} tok/s  "
                  f"imbalance {moe.get('imbalance', float('nan')):.2f}", flush=True)
            write_atomic(args.out, json.dumps(result, indent=2) + "\n")  # a run cut short keeps its rows
    print(markdown(result))
    print(f"wrote {args.out}")
    return 0


def markdown(result: dict) -> str:
    """The table for BENCHMARKS.md: measured against estimated step time and memory, and the
    imbalance the probe measured against the estimate's prior."""
    lines = [f"device: {result['device']} (estimate for {result['estimated_for']}), median of {result['steps']} steps", "",
             "| model | micro-batch | dp x ep | status | tokens/s | MFU | step | est. step | peak GiB | est. GiB | "
             "imbalance (max) | est. imbalance |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['micro_batch']} | {r['dp']} x {r['ep']} | {r['status']} | | | | | | | | |")
            continue
        moe, mfu = r.get("moe") or {}, f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        lines.append(
            f"| {r['model']} | {r['micro_batch']} | {r['dp']} x {r['ep']} | ok | {r['tokens_per_s']:,.0f} | {mfu} | "
            f"{r['step_time_s'] * 1e3:.1f} ms | {r['est_step_time_s'] * 1e3:.1f} ms | {r['peak_mem_bytes'] / 2**30:.3f} | "
            f"{r['est_allocated_bytes'] / 2**30:.3f} | {moe.get('imbalance', 0):.2f} ({moe.get('imbalance_max', 0):.2f}) | "
            f"{r['est_imbalance']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
