"""Per-rank compute of a tensor-parallel-sliced transformer block against the unsliced block, on
one GPU, bf16: what a tp rank computes, without the communication (which one GPU cannot show).

    python benchmarks/bench_tp_slice.py --out benchmarks/results/tp_slice.json
    python benchmarks/bench_tp_slice.py --models llama-3-8b --tp 1 2 --seq-len 2048 --out /tmp/t.json
    python benchmarks/bench_tp_slice.py --device cpu --models tiny --tp 1 2 --seq-len 32 --out /tmp/t.json

A tp rank of autotune/engine/tensor_parallel.py holds n_heads/tp query heads, n_kv_heads/tp kv heads and
d_ff/tp MLP units: wq/wk/wv/w_gate/w_up are 1/tp as wide, wo/w_down 1/tp as deep, attention runs
on the local heads, and the two norms and residual adds stay full width (without sequence
parallel). This script builds exactly that block (engine.model.Block of the rank's model)
for tp in --tp and times forward and backward (CUDA events, median of --iters after --warmup) on
[micro_batch, seq_len, d_model] inputs. Per row: fwd/bwd/total ms, the ratio to tp=1 (ideal:
1/tp), the scaling efficiency t(1) / (tp * t(tp)), and the matmul+attention TFLOP/s reached. The
estimator's tp model reads the efficiency: narrow matmuls run further from peak. `--device auto`
takes the GPU when there is one, else the CPU (wall clock, no memory figure): a smoke run of the
same code, labelled as such in the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["llama-3-8b", "llama-3-70b"], help="names in conf/model/")
    p.add_argument("--tp", nargs="+", type=int, default=[1, 2, 4, 8], help="tensor-parallel degrees to slice by")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=20, help="measured forward+backward passes")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: cuda when available, else cpu (a smoke run, not a benchmark)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tp_slice.json"))
    return p.parse_args(argv)


def load_model_config(name: str):
    from omegaconf import OmegaConf

    from autotune.engine.config import build_train_config

    path = ROOT / "conf" / "model" / f"{name}.yaml"
    return build_train_config({"model": OmegaConf.to_container(OmegaConf.load(path))}).model


def sliced_block(cfg, tp: int):
    """autotune.engine.model.Block as one tp rank holds it (on meta: materialise with to_empty): the block of
    the rank's model (autotune.local_share.tp_rank_model, what a search measures for such a plan)."""
    import torch

    from autotune.local_share import tp_rank_model
    from autotune.engine.model import Block

    if cfg.n_heads % tp or cfg.kv_heads % tp or cfg.d_ff % tp:
        raise ValueError(f"tp={tp} does not divide the heads ({cfg.n_heads}, {cfg.kv_heads}) or d_ff ({cfg.d_ff})")
    with torch.device("meta"):
        return Block(tp_rank_model(cfg, tp))


def block_flops(cfg, tp: int, tokens: int, seq_len: int) -> float:
    """Forward + backward FLOPs of one rank's sliced block: matmuls (2 per multiply-add, x3 for
    backward) and causal attention (QK^T and PV over half the score matrix)."""
    d, hd = cfg.d_model, cfg.head_dim
    q, kv, f = cfg.n_heads * hd // tp, cfg.kv_heads * hd // tp, cfg.d_ff // tp
    mlp_mats = 3 if cfg.family == "llama" else 2
    linear = 2 * tokens * (d * q + 2 * d * kv + q * d + mlp_mats * d * f)
    attention = 2 * 2 * tokens * seq_len * q / 2
    return 3.0 * (linear + attention)


class Stopwatch:
    """Marks on the device's timeline: CUDA events on a GPU, the wall clock on a CPU (where every op
    is synchronous). Milliseconds between consecutive marks, read after a sync."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def mark(self) -> None:
        import torch

        if self.cuda:
            self.marks.append(torch.cuda.Event(enable_timing=True))
            self.marks[-1].record()
        else:
            self.marks.append(time.perf_counter())

    def spans_ms(self) -> list[float]:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            spans = [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        else:
            spans = [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]
        self.marks = []
        return spans


def time_block(cfg, tp: int, args: argparse.Namespace) -> dict:
    import torch

    from autotune.engine.model import rope_tables

    device = torch.device(args.device)
    block = sliced_block(cfg, tp).to_empty(device=device).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn_like(p) * 0.02)
    rope = None
    if cfg.family == "llama":
        cos, sin = rope_tables(cfg.head_dim, args.seq_len, cfg.rope_theta, device=device)
        rope = (cos, sin)
    x = torch.randn(args.micro_batch, args.seq_len, cfg.d_model, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)
    fwd, bwd = [], []
    watch = Stopwatch(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.warmup + args.iters):
        watch.mark()
        y = block(x, rope)
        watch.mark()
        y.backward(grad)
        watch.mark()
        f_ms, b_ms = watch.spans_ms()
        if i >= args.warmup:
            fwd.append(f_ms)
            bwd.append(b_ms)
        block.zero_grad(set_to_none=True)
        x.grad = None
    f_ms, b_ms = statistics.median(fwd), statistics.median(bwd)
    tokens = args.micro_batch * args.seq_len
    return {
        "fwd_ms": f_ms, "bwd_ms": b_ms, "total_ms": f_ms + b_ms,
        "tflops": block_flops(cfg, tp, tokens, args.seq_len) / ((f_ms + b_ms) / 1e3) / 1e12,
        "peak_mem_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }


def resolve_device(args: argparse.Namespace) -> str | None:
    """Settle `--device auto` to cuda or cpu; the device's name, or None (after a one-line error) for cuda without one."""
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA GPU; use --device cpu for a smoke run", file=sys.stderr)
        return None
    return torch.cuda.get_device_name() if args.device == "cuda" else "cpu"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    device = resolve_device(args)
    if device is None:
        return 2
    print(f"device: {device}", flush=True)
    rows = []
    for name in args.models:
        cfg = load_model_config(name)
        base = None
        for tp in sorted(args.tp):
            row = {"model": name, "tp": tp, "seq_len": args.seq_len, "micro_batch": args.micro_batch}
            try:
                row.update(time_block(cfg, tp, args), status="ok")
            except (ValueError, torch.OutOfMemoryError) as e:
                row.update(status="oom" if isinstance(e, torch.OutOfMemoryError) else "error",
                           error=str(e).splitlines()[0])
                if args.device == "cuda":
                    torch.cuda.empty_cache()
            if row["status"] == "ok":
                base = row["total_ms"] if tp == 1 else base
                if base is not None:
                    row["ratio_to_tp1"] = row["total_ms"] / base
                    row["efficiency"] = base / (tp * row["total_ms"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "benchmark": "tp_slice", "device": device, "dtype": "bf16", "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "iters": args.iters, "warmup": args.warmup, "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(result, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    print(markdown(result))
    print(f"wrote {out}")
    return 0


def markdown(result: dict) -> str:
    """The table for BENCHMARKS.md."""
    lines = [f"device: {result['device']}, {result['dtype']}, micro-batch {result['micro_batch']} x seq_len "
             f"{result['seq_len']}, median of {result['iters']} passes", "",
             "| model | tp | fwd ms | bwd ms | total ms | / tp=1 | efficiency | TFLOP/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['tp']} | {r['status']}: {r['error']} | | | | | |")
            continue
        ratio, eff = r.get("ratio_to_tp1"), r.get("efficiency")
        lines.append(f"| {r['model']} | {r['tp']} | {r['fwd_ms']:.2f} | {r['bwd_ms']:.2f} | {r['total_ms']:.2f} | "
                     f"{'-' if ratio is None else f'{ratio:.3f}'} | {'-' if eff is None else f'{eff:.2f}'} | "
                     f"{r['tflops']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
