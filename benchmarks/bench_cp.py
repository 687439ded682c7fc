"""One context-parallel rank's attention at long sequence on one device: the blocks of the engine's
ring (autotune/engine/context_parallel.py RingAttention) without the communication, against the
cost model's attention time and activation bytes for the same plan.

    python benchmarks/bench_cp.py --out benchmarks/results/cp.json          # Llama 3 8B, seq 32k-131k, cp 1-8
    python benchmarks/bench_cp.py --device cpu --seq 256 --cp 1 2 --heads 4 --kv-heads 2 --out /tmp/cp.json

A rank of cp holds seq/cp tokens of each sequence (two chunks, `shard_sequence`) and runs cp ring
steps: its own k/v causally, then cp - 1 half blocks of the other ranks' k/v. Here the "ring" hands
each step a copy of the rank's own k/v (`LocalRing`: same shapes, same kernels, the receive buffer
allocated as the real ring allocates it), so the figures are the rank's compute and memory alone:
forward and backward ms (median of --iters after --warmup; CUDA events on a GPU, the wall clock on
a CPU), the peak memory above the inputs (GPU only), and the bytes the ring saves for backward
(saved_tensors_hooks). Beside them, for the plan (the model, seq, cp, dp=tp=pp=1, bf16, no
checkpointing) on the catalog entry of the device (--gpu on a CPU): the estimate's attention
forward and backward of one layer, and the bytes its block saves (the whole block's, which hold
this attention's q, k, v, output and log-sum-exp); and what an unfused block's fp32 scores would
take (the largest block, s x s). Each row is written to --out as soon as it is measured.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_tp_slice import Stopwatch, load_model_config, resolve_device  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3-8b", help="a name in conf/model/")
    p.add_argument("--seq", nargs="+", type=int, default=[32768, 65536, 131072], help="whole sequence lengths")
    p.add_argument("--cp", nargs="+", type=int, default=[1, 2, 4, 8], help="context-parallel degrees")
    p.add_argument("--heads", type=int, help="query heads instead of the model's (a small CPU run)")
    p.add_argument("--kv-heads", type=int, help="kv heads instead of the model's")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=5, help="measured forward+backward passes")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--gpu", default="h100-sxm", help="catalog entry the cost model uses when the device is none")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cp.json"))
    return p.parse_args(argv)


class LocalRing:
    """The ring's interface (engine.context_parallel.Ring) for cp rank `rank` of `size` on one
    device: every step receives a copy of what the rank sends."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size

    def start(self, t, tag: int = 0):
        return t.clone(), []

    @staticmethod
    def finish(incoming, works):
        return incoming


def model_config(args: argparse.Namespace, seq: int):
    import dataclasses

    cfg = load_model_config(args.model)
    heads = args.heads or cfg.n_heads
    return dataclasses.replace(cfg, n_heads=heads, n_kv_heads=args.kv_heads or cfg.kv_heads,
                               attn_head_dim=cfg.head_dim, max_seq_len=max(cfg.max_seq_len, seq))


def measure(cfg, seq: int, cp: int, args: argparse.Namespace) -> dict:
    """Forward and backward ms, peak bytes above the inputs, and bytes saved for backward, of cp rank 0."""
    import torch

    from autotune.engine.context_parallel import RingAttention

    device, b, s, d = torch.device(args.device), args.micro_batch, seq // cp, cfg.head_dim
    q, k, v = (torch.randn(b, h, s, d, device=device, dtype=torch.bfloat16, requires_grad=True)
               for h in (cfg.n_heads, cfg.kv_heads, cfg.kv_heads))
    grad = torch.randn_like(q)
    saved: dict[int, int] = {}

    def pack(t):
        saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        RingAttention.apply(q, k, v, LocalRing(0, cp)).backward(grad)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    watch, fwd, bwd = Stopwatch(device), [], []
    for i in range(args.warmup + args.iters):
        q.grad = k.grad = v.grad = None
        watch.mark()
        out = RingAttention.apply(q, k, v, LocalRing(0, cp))
        watch.mark()
        out.backward(grad)
        watch.mark()
        f_ms, b_ms = watch.spans_ms()
        if i >= args.warmup:
            fwd.append(f_ms)
            bwd.append(b_ms)
        del out
    return {"fwd_ms": statistics.median(fwd), "bwd_ms": statistics.median(bwd),
            "peak_bytes": torch.cuda.max_memory_allocated(device) - base if cuda else None,
            "saved_bytes": sum(saved.values()),
            "unfused_scores_bytes": b * cfg.n_heads * s * s * 4}


def modelled(cfg: dict, seq: int, cp: int, args: argparse.Namespace, hw) -> dict:
    """The estimate's attention of one layer and micro-batch (forward, backward: 2.5 times it) and
    the bytes one block saves (no checkpointing), for the plan of cp ranks on `hw`."""
    from autotune.engine.config import build_train_config
    from autotune.estimate import estimate
    from autotune.estimate.activations import saved_bytes
    from autotune.estimate.arrays import PlanArrays
    from autotune.estimate.calibration import Calibration
    from autotune.estimate.routing import expert_routing
    from autotune.plans import plans_frame

    plan = dict(cp=cp, dp=1, micro_batch=args.micro_batch, precision="bf16", activation_checkpointing="none")
    train = build_train_config({"model": cfg, "job": dict(seq_len=seq, global_batch=args.micro_batch), "plan": plan})
    forward = estimate(train, hw).compute["attention_s"] / 3.5 / train.model.n_layers
    arrays, local = PlanArrays.of(plans_frame([train.plan]), train.job), seq // cp
    block = saved_bytes(train.model, arrays, local, expert_routing(train.model, arrays, local, Calibration())).block
    return {"model_fwd_ms": forward * 1e3, "model_bwd_ms": 2.5 * forward * 1e3, "model_block_bytes": float(block[0])}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import dataclasses

    import torch

    from autotune.engine.files import write_atomic
    from autotune.hardware import catalog_gpu, catalog_gpu_of

    device = resolve_device(args)
    if device is None:
        return 2
    hw = (catalog_gpu_of(device) if args.device == "cuda" else None) or catalog_gpu(args.gpu)
    print(f"device: {device}; cost model: {hw.gpu}", flush=True)
    result = {
        "benchmark": "cp", "device": device, "cost_model_gpu": hw.gpu, "model": args.model, "dtype": "bf16",
        "micro_batch": args.micro_batch, "iters": args.iters, "warmup": args.warmup,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "command": " ".join(["python", "benchmarks/bench_cp.py", *(argv if argv is not None else sys.argv[1:])]),
        "rows": [],
    }
    for seq in args.seq:
        cfg = model_config(args, seq)
        for cp in sorted(args.cp):
            row = {"seq": seq, "cp": cp, "tokens_per_rank": seq // cp, "heads": cfg.n_heads, "kv_heads": cfg.kv_heads}
            if seq % (2 * cp):
                row.update(status="error", error=f"seq {seq} does not split into 2 x cp = {2 * cp} equal chunks")
            else:
                try:
                    row.update(measure(cfg, seq, cp, args), status="ok")
                except torch.OutOfMemoryError as e:
                    row.update(status="oom", error=str(e).splitlines()[0])
                    torch.cuda.empty_cache()
                row.update(modelled(dataclasses.asdict(cfg), seq, cp, args, hw))
            result["rows"].append(row)
            write_atomic(Path(args.out), json.dumps(result, indent=2))
            print(json.dumps(row), flush=True)
    print(markdown(result))
    print(f"wrote {args.out}")
    return 0


def markdown(result: dict) -> str:
    """The table for BENCHMARKS.md."""
    gib = 2 ** 30
    lines = [f"device: {result['device']} (cost model: {result['cost_model_gpu']}), {result['model']}, bf16, "
             f"micro-batch {result['micro_batch']}, one cp rank's ring blocks, median of {result['iters']}", "",
             "| seq | cp | fwd ms | model fwd ms | bwd ms | model bwd ms | peak GiB | saved GiB | model block GiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['seq']} | {r['cp']} | {r['status']}: {r['error']} | | | | | | |")
            continue
        peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / gib:.2f}"
        lines.append(f"| {r['seq']} | {r['cp']} | {r['fwd_ms']:.2f} | {r['model_fwd_ms']:.2f} | {r['bwd_ms']:.2f} | "
                     f"{r['model_bwd_ms']:.2f} | {peak} | {r['saved_bytes'] / gib:.3f} | "
                     f"{r['model_block_bytes'] / gib:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
