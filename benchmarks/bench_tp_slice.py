"""Per-rank compute of a tensor-parallel-sliced transformer block against the unsliced block, on
one GPU, bf16: what a tp rank computes, without the communication (which one GPU cannot show).

    python benchmarks/bench_tp_slice.py --out benchmarks/results/tp_slice.json
    python benchmarks/bench_tp_slice.py --models llama-3-8b --tp 1 2 --seq-len 2048 --out /tmp/t.json

A tp rank of engine/tensor_parallel.py holds n_heads/tp query heads, n_kv_heads/tp kv heads and
d_ff/tp MLP units: wq/wk/wv/w_gate/w_up are 1/tp as wide, wo/w_down 1/tp as deep, attention runs
on the local heads, and the two norms and residual adds stay full width (without sequence
parallel). This script builds exactly that block (engine.model.Block with its projections sliced)
for tp in --tp and times forward and backward (CUDA events, median of --iters after --warmup) on
[micro_batch, seq_len, d_model] inputs. Per row: fwd/bwd/total ms, the ratio to tp=1 (ideal:
1/tp), the scaling efficiency t(1) / (tp * t(tp)), and the matmul+attention TFLOP/s reached. The
estimator's tp model reads the efficiency: narrow matmuls run further from peak.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
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
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tp_slice.json"))
    return p.parse_args(argv)


def load_model_config(name: str):
    from omegaconf import OmegaConf

    from engine.config import build_train_config

    path = ROOT / "conf" / "model" / f"{name}.yaml"
    return build_train_config({"model": OmegaConf.to_container(OmegaConf.load(path))}).model


def sliced_block(cfg, tp: int):
    """engine.model.Block as one tp rank holds it (on meta: materialise with to_empty)."""
    import torch
    import torch.nn as nn

    from engine.model import Block

    if cfg.n_heads % tp or cfg.kv_heads % tp or cfg.d_ff % tp:
        raise ValueError(f"tp={tp} does not divide the heads ({cfg.n_heads}, {cfg.kv_heads}) or d_ff ({cfg.d_ff})")
    d, hd = cfg.d_model, cfg.head_dim
    q, kv, f = cfg.n_heads * hd // tp, cfg.kv_heads * hd // tp, cfg.d_ff // tp
    bias = cfg.family == "gpt2"
    qkv_bias = bias or cfg.qkv_bias
    with torch.device("meta"):
        block = Block(cfg)
        block.attn.wq = nn.Linear(d, q, bias=qkv_bias)
        block.attn.wk = nn.Linear(d, kv, bias=qkv_bias)
        block.attn.wv = nn.Linear(d, kv, bias=qkv_bias)
        block.attn.wo = nn.Linear(q, d, bias=bias)  # row-parallel: its bias is added once, after the reduction
        if block.mlp.gated:
            block.mlp.w_gate = nn.Linear(d, f, bias=False)
        block.mlp.w_up = nn.Linear(d, f, bias=bias)
        block.mlp.w_down = nn.Linear(f, d, bias=bias)
    return block


def block_flops(cfg, tp: int, tokens: int, seq_len: int) -> float:
    """Forward + backward FLOPs of one rank's sliced block: matmuls (2 per multiply-add, x3 for
    backward) and causal attention (QK^T and PV over half the score matrix)."""
    d, hd = cfg.d_model, cfg.head_dim
    q, kv, f = cfg.n_heads * hd // tp, cfg.kv_heads * hd // tp, cfg.d_ff // tp
    mlp_mats = 3 if cfg.family == "llama" else 2
    linear = 2 * tokens * (d * q + 2 * d * kv + q * d + mlp_mats * d * f)
    attention = 2 * 2 * tokens * seq_len * q / 2
    return 3.0 * (linear + attention)


def time_block(cfg, tp: int, args: argparse.Namespace) -> dict:
    import torch

    from engine.model import rope_tables

    device = torch.device("cuda")
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
    torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.warmup + args.iters):
        events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        events[0].record()
        y = block(x, rope)
        events[1].record()
        y.backward(grad)
        events[2].record()
        torch.cuda.synchronize(device)
        if i >= args.warmup:
            fwd.append(events[0].elapsed_time(events[1]))
            bwd.append(events[1].elapsed_time(events[2]))
        block.zero_grad(set_to_none=True)
        x.grad = None
    f_ms, b_ms = statistics.median(fwd), statistics.median(bwd)
    tokens = args.micro_batch * args.seq_len
    return {
        "fwd_ms": f_ms, "bwd_ms": b_ms, "total_ms": f_ms + b_ms,
        "tflops": block_flops(cfg, tp, tokens, args.seq_len) / ((f_ms + b_ms) / 1e3) / 1e12,
        "peak_mem_bytes": torch.cuda.max_memory_allocated(device),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("error: bench_tp_slice.py needs a CUDA GPU; run it on one (see BENCHMARKS.md)", file=sys.stderr)
        return 2
    rows = []
    for name in args.models:
        cfg = load_model_config(name)
        base = None
        for tp in sorted(args.tp):
            row = {"model": name, "tp": tp, "seq_len": args.seq_len, "micro_batch": args.micro_batch}
            try:
                row.update(time_block(cfg, tp, args), status="ok")
            except (ValueError, torch.cuda.OutOfMemoryError) as e:
                row.update(status="error", error=str(e).splitlines()[0])
                torch.cuda.empty_cache()
            if row["status"] == "ok":
                base = row["total_ms"] if tp == 1 else base
                if base is not None:
                    row["ratio_to_tp1"] = row["total_ms"] / base
                    row["efficiency"] = base / (tp * row["total_ms"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "benchmark": "tp_slice", "device": torch.cuda.get_device_name(), "dtype": "bf16",
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
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
