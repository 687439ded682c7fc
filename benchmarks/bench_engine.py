"""Tokens/s, MFU and peak memory of the engine on one GPU in bf16, next to a plain PyTorch eager
training loop and torch.compile on the same model, for micro-batches 1..16.

    python benchmarks/bench_engine.py --out benchmarks/results/engine.json
    python benchmarks/bench_engine.py --models gpt2 --micro-batches 1 4 --modes engine eager --out /tmp/e.json
    python benchmarks/bench_engine.py --device cpu --models tiny --micro-batches 1 --seq-len 32 --out /tmp/e.json

`--device auto` (the default) takes the GPU when there is one and otherwise the CPU; the JSON and the
table name the device, so a CPU smoke run is never read as a GPU figure.

Modes:
- engine          `python -m autotune.engine.probe` with plan zero_stage=0, precision=bf16, micro_batch=b
                  (one micro-batch per step): the engine's own step, data pipeline and optimizer
- engine_compile  the same with plan.compile=true (each block torch.compiled)
- eager           the textbook loop: bf16 autocast, model(x, y).backward(), clip, fused AdamW
- compile         that loop on torch.compile(model)

Every (model, mode, micro-batch) runs in its own process, so an OOM is one row's status and the
peak memory (torch.cuda.max_memory_allocated) is that configuration's alone. Timing: median wall
time of the measured steps, each ending in a device sync (a loss.item()); MFU against the dense
bf16 peak with 6N + 12·L·a·d·s FLOPs per token ([FLOPs and MFU] in docs/formulas.md).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_tp_slice import resolve_device  # noqa: E402

MODES = ("engine", "engine_compile", "eager", "compile")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["gpt2", "llama-3.2-1b"], help="names in conf/model/")
    p.add_argument("--micro-batches", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10, help="measured steps")
    p.add_argument("--warmup", type=int, default=3, help="steps before measuring (compile, allocator)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: cuda when available, else cpu (a smoke run, not a benchmark)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "engine.json"))
    p.add_argument("--one", nargs=3, metavar=("MODEL", "MODE", "MICRO"), help=argparse.SUPPRESS)  # worker
    return p.parse_args(argv)


def train_config(model: str, micro: int, seq_len: int, steps: int, out_dir: str, compile_blocks: bool = False) -> dict:
    """The engine config of one row: the named architecture, one micro-batch per step, bf16, ZeRO 0."""
    from omegaconf import OmegaConf

    return {
        "model": OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / f"{model}.yaml")),
        "job": {"seq_len": seq_len, "global_batch": micro, "steps": steps, "out_dir": out_dir},
        "plan": {"zero_stage": 0, "precision": "bf16", "micro_batch": micro, "compile": compile_blocks},
    }


def plain_loop(model_name: str, mode: str, micro: int, args: argparse.Namespace) -> dict:
    """The baseline: what a user writes by hand with PyTorch, eager or torch.compile'd."""
    import torch

    from autotune.engine.config import build_train_config
    from autotune.engine.model import build_model
    from autotune.engine.train import MemoryMeter, device_name, peak_flops
    from autotune.profile import flops_per_token

    cfg = build_train_config(train_config(model_name, micro, args.seq_len, args.steps + args.warmup, "unused"))
    device = torch.device(args.device)
    meter = MemoryMeter(device)  # the probe's meter, so both columns mean the same thing
    torch.manual_seed(0)
    model = build_model(cfg.model, device=device, seed=0)
    step_model = torch.compile(model) if mode == "compile" else model
    on_cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, **({"fused": True} if on_cuda else {"foreach": True}))
    tokens = torch.randint(cfg.model.vocab_size, (micro, args.seq_len + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    times = []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = step_model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)  # as the engine (job default)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    step_time = statistics.median(times)
    tokens_per_s = micro * args.seq_len / step_time
    peak = peak_flops(device, "bf16")
    return {
        "status": "ok", "step_time_s": step_time, "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * flops_per_token(cfg.model, args.seq_len)["total"] / peak if peak else None,
        "peak_mem_bytes": meter.peak_bytes(), "device": device_name(device), "error": None,
    }


def engine_probe(model_name: str, mode: str, micro: int, args: argparse.Namespace) -> dict:
    """The engine, measured by its own probe (the same numbers the search sees)."""
    import yaml

    from autotune.engine.config import build_train_config

    with tempfile.TemporaryDirectory() as tmp:
        raw = train_config(model_name, micro, args.seq_len, args.steps + args.warmup, tmp,
                           compile_blocks=mode == "engine_compile")
        build_train_config(raw)  # validate here: a bad name is this script's error, not a row
        config, out = Path(tmp) / "config.yaml", Path(tmp) / "metrics.json"
        config.write_text(yaml.safe_dump(raw))
        subprocess.run(
            [sys.executable, "-m", "autotune.engine.probe", str(config), "--steps", str(args.steps), "--warmup",
             str(args.warmup), "--out", str(out)],
            cwd=ROOT, env=probe_env(args.device), timeout=args.timeout,
        )
        r = json.loads(out.read_text())
    return {k: r[k] for k in ("status", "step_time_s", "tokens_per_s", "mfu", "peak_mem_bytes", "device", "error")}


def probe_env(device: str) -> dict[str, str]:
    """The probe takes the GPU whenever it sees one: hiding it is how it runs on the CPU."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_one(model: str, mode: str, micro: int, args: argparse.Namespace) -> dict:
    import torch

    try:
        if mode.startswith("engine"):
            return engine_probe(model, mode, micro, args)
        return plain_loop(model, mode, micro, args)
    except torch.OutOfMemoryError as e:
        return {"status": "oom", "error": str(e).splitlines()[0]}
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"the probe ran past --timeout {args.timeout} s"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        model, mode, micro = args.one
        print(json.dumps(run_one(model, mode, int(micro), args)))
        return 0
    import torch

    from autotune.engine.files import write_atomic

    device = resolve_device(args)
    if device is None:
        return 2
    print(f"device: {device}", flush=True)
    rows = []
    result = {"benchmark": "engine", "device": device, "dtype": "bf16",
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup, "rows": rows}
    for model in args.models:
        for micro in args.micro_batches:
            for mode in args.modes:
                argv_one = [sys.executable, __file__, "--one", model, mode, str(micro), "--seq-len", str(args.seq_len),
                            "--steps", str(args.steps), "--warmup", str(args.warmup), "--timeout", str(args.timeout),
                            "--device", args.device]
                try:
                    proc = subprocess.run(argv_one, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout + 60)
                    lines = proc.stdout.strip().splitlines()
                    row = json.loads(lines[-1]) if proc.returncode == 0 and lines else {
                        "status": "error", "error": (proc.stderr.strip().splitlines() or [None])[-1]}
                except subprocess.TimeoutExpired:
                    row = {"status": "timeout"}
                row = {"model": model, "mode": mode, "micro_batch": micro, "seq_len": args.seq_len, **row}
                rows.append(row)
                tps, mfu, mem = row.get("tokens_per_s"), row.get("mfu"), row.get("peak_mem_bytes")
                print(f"{model:14s} {mode:15s} b={micro:<3d} {row['status']:7s} {tps or 0:>12,.0f} tok/s  "
                      f"mfu {'-' if mfu is None else f'{mfu:.1%}':>6s}  mem {(mem or 0) / 2**30:6.2f} GiB", flush=True)
                write_atomic(args.out, json.dumps(result, indent=2) + "\n")  # a run cut short keeps its rows
    print(markdown(result))
    print(f"wrote {args.out}")
    return 0


def markdown(result: dict) -> str:
    """The table for BENCHMARKS.md: each mode's row, and the engine's speed over the best baseline."""
    lines = [f"device: {result['device']}, bf16, seq_len {result['seq_len']}, median of {result['steps']} steps", "",
             "| model | micro-batch | mode | tokens/s | MFU | peak GiB | engine / best baseline |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['micro_batch']} | {r['mode']} | {r['status']} | | | |")
            continue
        baselines = [b["tokens_per_s"] for b in result["rows"] if b["status"] == "ok" and b["mode"] in ("eager", "compile")
                     and (b["model"], b["micro_batch"]) == (r["model"], r["micro_batch"])]
        ratio = f"{r['tokens_per_s'] / max(baselines):.2f}" if r["mode"].startswith("engine") and baselines else ""
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        lines.append(f"| {r['model']} | {r['micro_batch']} | {r['mode']} | {r['tokens_per_s']:,.0f} | {mfu} | "
                     f"{r['peak_mem_bytes'] / 2**30:.2f} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
