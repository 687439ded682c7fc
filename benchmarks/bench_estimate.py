"""The cost model: how fast it is, and how close it comes to the engine's measurements.

    python benchmarks/bench_estimate.py [--plans 100000] [--model llama-3-8b] [--cluster 4x8xh100]
    python benchmarks/bench_estimate.py --probe gpu [--calibrate]   # on a GPU: 20+ plans
    python benchmarks/bench_estimate.py --probe cpu                 # the same path, tiny plans (a smoke run)

Speed: estimate_frame over N random plans on one CPU core; prints one JSON line (plans, CPU
seconds, plans per second) and, with --out, writes it there. The first call (activation fit from
the cache, per-rank layouts) is made before timing.

--probe: every plan of the set runs through `python -m autotune.engine.probe` (its own process) on this
machine (cluster=auto, so the hardware figures are measured), and its measured peak_mem_bytes
and step_time_s are set next to the estimate's allocated_bytes and step_time_s. Records go to --out
(default benchmarks/results/estimate_vs_probe-<set>.jsonl; rewritten after every plan, so a run cut
short keeps what it measured) in the format fit_calibration takes, each naming the device that
measured it; the markdown table of the errors is printed and written beside it (.md).
--calibrate adds leave-one-out calibrated errors (each plan estimated with a calibration fitted on
the others; it needs 3 plans that ran).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

from autotune.config import ClusterConfig, planner_config  # noqa: E402
from autotune.estimate import estimate, estimate_frame, fit_calibration  # noqa: E402
from autotune.hardware import load_hardware  # noqa: E402
from autotune.engine.config import build_train_config, to_yaml  # noqa: E402
from autotune.engine.files import write_atomic  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
# (model, seq_len, plan overrides): gpt2 up to llama-3.2-1b on one GPU; micro-batch, precision,
# checkpointing, kernels and offload varied. Two micro-batches per step (global = 2 x micro).
GPU_SET = [
    ("gpt2", 1024, dict(precision="bf16", micro_batch=4)),
    ("gpt2", 1024, dict(precision="bf16", micro_batch=8)),
    ("gpt2", 1024, dict(precision="bf16", micro_batch=16)),
    ("gpt2", 1024, dict(precision="bf16", micro_batch=16, activation_checkpointing="full")),
    ("gpt2", 1024, dict(precision="fp32", micro_batch=4)),
    ("gpt2", 1024, dict(precision="fp16", micro_batch=8)),
    ("gpt2", 1024, dict(precision="bf16", micro_batch=8, kernels="triton")),
    ("gpt2", 1024, dict(precision="bf16", micro_batch=8, zero_stage=2)),
    ("gpt2-medium", 1024, dict(precision="bf16", micro_batch=8)),
    ("gpt2-medium", 1024, dict(precision="bf16", micro_batch=8, activation_checkpointing="selective")),
    ("qwen2.5-0.5b", 1024, dict(precision="bf16", micro_batch=4)),
    ("qwen2.5-0.5b", 1024, dict(precision="bf16", micro_batch=8, activation_checkpointing="full")),
    ("qwen2.5-0.5b", 1024, dict(precision="bf16", micro_batch=4, kernels="triton")),
    ("qwen2.5-0.5b", 1024, dict(precision="bf16", micro_batch=4, zero_stage=3)),
    ("qwen2.5-0.5b", 1024, dict(precision="bf16", micro_batch=4, zero_stage=2, offload_optimizer=True)),
    ("llama-3.2-1b", 2048, dict(precision="bf16", micro_batch=1)),
    ("llama-3.2-1b", 2048, dict(precision="bf16", micro_batch=2)),
    ("llama-3.2-1b", 2048, dict(precision="bf16", micro_batch=4, activation_checkpointing="full")),
    ("llama-3.2-1b", 2048, dict(precision="bf16", micro_batch=4, activation_checkpointing="selective")),
    ("llama-3.2-1b", 2048, dict(precision="bf16", micro_batch=2, kernels="triton")),
    ("llama-3.2-1b", 2048, dict(precision="bf16", micro_batch=2, zero_stage=3)),
    ("llama-3.2-1b", 2048, dict(precision="fp32", micro_batch=1, activation_checkpointing="full")),
]
CPU_SET = [  # three plans: the fewest --calibrate's leave-one-out fit takes
    ("tiny", 64, dict(micro_batch=2)),
    ("tiny", 64, dict(micro_batch=4)),
    ("tiny-gpt2", 64, dict(micro_batch=4, activation_checkpointing="full")),
]


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


def probe(model: str, seq_len: int, plan: dict, steps: int, workdir: Path, timeout_s: float) -> dict:
    """One plan through the engine's probe, with its estimate on this (probed) machine."""
    overrides = [f"model={model}", f"job.seq_len={seq_len}", f"job.global_batch={2 * plan['micro_batch']}"]
    overrides += [f"plan.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in plan.items()]
    cfg = planner_config(overrides)
    hw = load_hardware(ClusterConfig())
    est = estimate(cfg.train, hw)
    path = workdir / f"{len(list(workdir.glob('*.yaml')))}.yaml"
    path.write_text(to_yaml(cfg.train))
    out = path.with_suffix(".json")
    path_env = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # keep carried packages
    try:
        subprocess.run([sys.executable, "-m", "autotune.engine.probe", str(path), "--steps", str(steps), "--warmup", "2",
                        "--out", str(out)], check=False, timeout=timeout_s, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=path_env))
        got = json.loads(out.read_text()) if out.exists() else {"status": "error"}
    except subprocess.TimeoutExpired:  # one plan that hangs is a row, not the end of the table
        got = {"status": "timeout"}
    return {
        "model": dataclasses.asdict(cfg.train.model), "job": dataclasses.asdict(cfg.train.job),
        "plan": dataclasses.asdict(cfg.train.plan), "status": got.get("status"),
        "step_time_s": got.get("step_time_s"), "peak_mem_bytes": got.get("peak_mem_bytes"),
        "peak_mem_kind": got.get("peak_mem_kind"), "device": got.get("device"),
        "est_step_time_s": est.step_time_s, "est_allocated_bytes": est.allocated_bytes, "est_fits": est.fits,
    }


def error_table(records: list[dict], key: str = "est") -> str:
    rows = ["| model | plan | measured mem GiB | est GiB | mem err | measured ms | est ms | time err |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    mem_err, time_err = [], []
    for r in records:
        if r["status"] != "ok":
            rows.append(f"| {r['model']['name']} | {_plan_text(r['plan'])} | {r['status']} | | | | | |")
            continue
        me = r[f"{key}_allocated_bytes"] / r["peak_mem_bytes"] - 1
        te = r[f"{key}_step_time_s"] / r["step_time_s"] - 1
        mem_err.append(abs(me))
        time_err.append(abs(te))
        rows.append(f"| {r['model']['name']} | {_plan_text(r['plan'])} | {r['peak_mem_bytes'] / 2**30:.2f} | "
                    f"{r[f'{key}_allocated_bytes'] / 2**30:.2f} | {me:+.1%} | {r['step_time_s'] * 1e3:.1f} | "
                    f"{r[f'{key}_step_time_s'] * 1e3:.1f} | {te:+.1%} |")
    if mem_err:
        rows.append(f"\nmemory error: median {statistics.median(mem_err):.1%}, max {max(mem_err):.1%}; "
                    f"step time error: median {statistics.median(time_err):.1%}, max {max(time_err):.1%} "
                    f"({len(mem_err)} plans)")
    return "\n".join(rows)


def _plan_text(p: dict) -> str:
    parts = [f"z{p['zero_stage']}", p["precision"], f"mb{p['micro_batch']}", p["activation_checkpointing"], p["kernels"]]
    return " ".join(parts + (["offload"] if p["offload_optimizer"] or p["offload_params"] else []))


def compare(which: str, steps: int, calibrate: bool, out: Path, timeout_s: float) -> None:
    plans = GPU_SET if which == "gpu" else CPU_SET
    hw = load_hardware(ClusterConfig())  # probed once per process; every estimate below reuses it
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the probes' buffers: leave the GPU's memory to the plans
    print(f"device: {hw.gpu}", flush=True)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for m, s, p in plans:
            records.append(probe(m, s, p, steps, Path(tmp), timeout_s))
            write_atomic(out, "".join(json.dumps(r) + "\n" for r in records))
            write_atomic(out.with_suffix(".md"), f"device: {hw.gpu}; {len(records)} of {len(plans)} plans so far\n\n"
                         f"{error_table(records)}\n")
            print(f"{len(records)}/{len(plans)} {m} {_plan_text(records[-1]['plan'])}: {records[-1]['status']}",
                  flush=True)
    ok = [r for r in records if r["status"] == "ok"]
    if calibrate and len(ok) >= 3:
        for i, r in enumerate(ok):
            calib = fit_calibration([o for j, o in enumerate(ok) if j != i], hw)
            est = estimate(build_train_config({k: r[k] for k in ("model", "job", "plan")}), hw, calib)
            r["cal_step_time_s"], r["cal_allocated_bytes"] = est.step_time_s, est.allocated_bytes
        write_atomic(out, "".join(json.dumps(r) + "\n" for r in records))
    table = f"device: {hw.gpu}; {len(records)} plans, {steps} measured steps each\n\n{error_table(records)}"
    if calibrate and len(ok) >= 3:
        table += f"\n\nleave-one-out calibrated:\n\n{error_table(ok, 'cal')}"
    write_atomic(out.with_suffix(".md"), table + "\n")
    print(table)
    print(f"records: {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--probe", choices=["gpu", "cpu"], help="compare with the engine's probe instead")
    parser.add_argument("--steps", type=int, default=5, help="measured probe steps per plan")
    parser.add_argument("--calibrate", action="store_true")
    parser.add_argument("--plan-timeout", type=float, default=300.0, help="seconds per probed plan")
    parser.add_argument("--plans", type=int, default=100_000)
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--cluster", default="4x8xh100")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="JSON (speed) or JSONL (--probe) file to write")
    args = parser.parse_args(argv)
    if args.probe:
        out = Path(args.out) if args.out else RESULTS / f"estimate_vs_probe-{args.probe}.jsonl"
        compare(args.probe, args.steps, args.calibrate, out, args.plan_timeout)
        return
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
        write_atomic(args.out, json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
