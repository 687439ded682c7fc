"""Float8 against bf16 on one device: the GEMM rate (torch._scaled_mm, e4m3, tensorwise and rowwise
scales) and a linear's forward + backward as the engine runs it (torchao's Float8Linear, eager and
compiled), per (tokens, in, out) shape.

    python benchmarks/bench_fp8.py --out /tmp/fp8.json              # a lent GPU: Llama 3 8B's shapes
    python benchmarks/bench_fp8.py --device cpu --shapes 64x64x64 --iters 2 --warmup 1 --modes eager --out /tmp/f.json

Per row: milliseconds (median of --iters after --warmup; CUDA-synchronized on a GPU, wall clock on
the CPU), TFLOP/s, and the speed-up over bf16. On a GPU the GEMM rows give the catalog's
fp8_matmul_efficiency (the float8 rate over the catalog's fp8 peak, conf/gpu/) and the linear rows
what the estimator's casts cost (autotune/estimate/float8.py). A CPU run is a smoke run of the same
code, labelled as such: its float8 GEMM is an emulation, not a speed.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

LLAMA3_8B = ["16384x4096x4096", "16384x4096x14336", "16384x14336x4096"]  # 2 x 8192 tokens; qkv/o, gate/up, down


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=LLAMA3_8B, help="TOKENSxINxOUT")
    p.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"],
                   help="the linear rows: eager, and/or under torch.compile")
    p.add_argument("--device", default="auto", help="cuda, cpu, or auto (the GPU when there is one)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def timed(fn, device: str, iters: int, warmup: int) -> float:
    """Median seconds of fn() after warmup calls."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemm_rows(m: int, k: int, n: int, device: str, args) -> list[dict]:
    """bf16 mm against _scaled_mm on e4m3 operands with one scale a tensor, then one a row."""
    import torch

    a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, k, device=device, dtype=torch.bfloat16)
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
    scales = {"tensorwise": (torch.ones((), device=device), torch.ones((), device=device)),
              "rowwise": (torch.ones(m, 1, device=device), torch.ones(1, n, device=device))}
    flops = 2 * m * k * n
    base = timed(lambda: a @ b.T, device, args.iters, args.warmup)
    rows = [dict(kind="gemm", recipe="bf16", seconds=base)]
    for recipe, (sa, sb) in scales.items():
        seconds = timed(lambda: torch._scaled_mm(a8, b8.T, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16),
                        device, args.iters, args.warmup)
        rows.append(dict(kind="gemm", recipe=recipe, seconds=seconds))
    return [dict(r, tflops=flops / r["seconds"] / 1e12, speedup=base / r["seconds"]) for r in rows]


def linear_rows(m: int, k: int, n: int, device: str, mode: str, args) -> list[dict]:
    """A bias-free linear's forward + backward in bf16, then as the engine's float8 linears."""
    import torch

    from autotune.engine.config import PlanConfig
    from autotune.engine.float8 import apply_float8

    x = torch.randn(m, k, device=device, dtype=torch.bfloat16, requires_grad=True)
    rows, base = [], None
    for recipe in ("none", "tensorwise", "rowwise"):
        holder = torch.nn.Module()
        holder.layers = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16))
        apply_float8(holder, PlanConfig(precision="bf16", fp8=recipe))
        linear = torch.compile(holder.layers) if mode == "compile" else holder.layers
        seconds = timed(lambda: linear(x).sum().backward(), device, args.iters, args.warmup)
        base = base or seconds
        rows.append(dict(kind=f"linear_{mode}", recipe="bf16" if recipe == "none" else recipe, seconds=seconds,
                         tflops=6 * m * k * n / seconds / 1e12, speedup=base / seconds))
    return rows


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    result = {"benchmark": "fp8", "device": device,
              "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
              "smoke_run": device != "cuda", "torch": torch.__version__,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "python benchmarks/bench_fp8.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "rows": []}
    out = Path(args.out)
    print("| tokens x in x out | kind | recipe | ms | TFLOP/s | vs bf16 |\n|---|---|---|---|---|---|")
    for shape in args.shapes:
        m, k, n = (int(v) for v in shape.split("x"))
        rows = gemm_rows(m, k, n, device, args)
        for mode in args.modes:
            rows += linear_rows(m, k, n, device, mode, args)
        for row in rows:
            row.update(shape=shape, ms=row.pop("seconds") * 1e3)
            result["rows"].append(row)
            print(f"| {shape} | {row['kind']} | {row['recipe']} | {row['ms']:.3f} | {row['tflops']:.1f} | {row['speedup']:.2f}x |")
            out.write_text(json.dumps(result, indent=1))  # after each row: a step cut short keeps what it measured
    return 0


if __name__ == "__main__":
    sys.exit(main())
