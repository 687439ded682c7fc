"""Forward+backward time and peak memory of the fused kernels against PyTorch eager, torch.compile
and Liger-Kernel (when installed), in bf16 at LLM shapes, with the fraction of the measured HBM
bandwidth that the memory-bound kernels reach.

    python benchmarks/bench_kernels.py --out benchmarks/results/kernels.json
    python benchmarks/bench_kernels.py --ops rms_norm,swiglu --tokens 4096 --hidden 4096 --out /tmp/k.json
    python benchmarks/bench_kernels.py --device cpu --tokens 64 --hidden 128 --vocab 256 --out /tmp/k.json

`--device auto` (the default) takes the GPU when there is one; on the CPU the Triton kernels run in
Triton's interpreter (TRITON_INTERPRET=1), times are wall clock and no memory figure is taken: a
smoke run of the same code, never a benchmark, and the JSON says which device ran.

Timing: CUDA events around one forward+backward, after warmup, median over repeats, fresh random
inputs per case. Memory: peak allocated during one forward+backward minus what was allocated before
(the inputs). Bandwidth: the minimum bytes each op must move (read inputs, write outputs, forward and
backward) over the median time, divided by the bandwidth of a large device-to-device copy measured
here. linear_cross_entropy is matmul-bound: it reports TFLOP/s of its three matmuls instead. The
JSON is rewritten after every row, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_tp_slice import resolve_device  # noqa: E402

OPS = ("rms_norm", "layer_norm", "swiglu", "apply_rope", "linear_cross_entropy")
FFN = {2048: 8192, 4096: 14336, 8192: 28672}  # llama-3 MLP widths for each hidden size
HEAD_DIM, KV_HEADS, SEQ = 128, 8, 4096


def liger_ops() -> dict[str, Callable] | None:
    try:
        from liger_kernel.transformers import functional as lf
    except ImportError:
        return None
    return {
        "rms_norm": lambda x, w: lf.liger_rms_norm(x, w, 1e-5),
        "layer_norm": lambda x, w, b: lf.liger_layer_norm(x, w, b, 1e-5),
        "swiglu": lf.liger_swiglu,
        "apply_rope": lf.liger_rope,
        "linear_cross_entropy": lambda h, w, t: lf.liger_fused_linear_cross_entropy(h, w, t),
    }


def implementations() -> dict[str, dict[str, Callable]]:
    """Eager, torch.compile'd eager and ours. Imported here, not at the top: Triton fixes compiled vs
    interpreted when `kernels` decorates its helpers, and main() chooses that (TRITON_INTERPRET) first."""
    from autotune import kernels
    from autotune.engine.model import apply_rope as eager_rope

    eager = {
        "rms_norm": lambda x, w: F.rms_norm(x, (x.shape[-1],), w, 1e-5),
        "layer_norm": lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, 1e-5),
        "swiglu": lambda g, u: F.silu(g) * u,
        "apply_rope": eager_rope,
        "linear_cross_entropy": lambda h, w, t: F.cross_entropy(F.linear(h, w).float(), t),
    }
    ours = {
        "rms_norm": lambda x, w: kernels.rms_norm(x, w, 1e-5, impl="triton"),
        "layer_norm": lambda x, w, b: kernels.layer_norm(x, w, b, 1e-5, impl="triton"),
        "swiglu": lambda g, u: kernels.swiglu(g, u, impl="triton"),
        "apply_rope": lambda q, k, c, s: kernels.apply_rope(q, k, c, s, impl="triton"),
        "linear_cross_entropy": lambda h, w, t: kernels.linear_cross_entropy(h, w, t, impl="triton"),
    }
    return {"eager": eager, "compile": {op: torch.compile(fn) for op, fn in eager.items()}, "triton": ours}


def cases(args) -> list[dict]:
    """One dict per (op, shape): its inputs are made later, on the device."""
    out = []
    for op in args.ops:
        for tokens in args.tokens:
            for hidden in args.hidden:
                if op == "linear_cross_entropy":
                    out += [dict(op=op, tokens=tokens, hidden=hidden, vocab=v) for v in args.vocab]
                elif op == "swiglu":
                    out.append(dict(op=op, tokens=tokens, hidden=hidden, ffn=FFN.get(hidden, 4 * hidden)))
                else:
                    out.append(dict(op=op, tokens=tokens, hidden=hidden))
    return out


def make_inputs(case: dict, impl: str, dtype: torch.dtype, device: str):
    """Inputs (those that take a gradient require it) in the layout each implementation expects."""
    op, t, h = case["op"], case["tokens"], case["hidden"]

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_()

    if op == "rms_norm":
        return [rand(t, h), rand(h)]
    if op == "layer_norm":
        return [rand(t, h), rand(h), rand(h)]
    if op == "swiglu":
        return [rand(t, case["ffn"]), rand(t, case["ffn"])]
    if op == "apply_rope":
        seq = min(SEQ, t)
        b, heads = t // seq, h // HEAD_DIM
        from autotune.engine.model import rope_tables

        cos, sin = (x.to(device) for x in rope_tables(HEAD_DIM, seq, 500000.0))
        if impl == "liger":  # [b, heads, s, d] and Hugging Face's [1, s, d] tables
            return [rand(b, heads, seq, HEAD_DIM), rand(b, KV_HEADS, seq, HEAD_DIM),
                    torch.cat((cos, cos), -1)[None].to(dtype), torch.cat((sin, sin), -1)[None].to(dtype)]
        return [rand(b, seq, heads, HEAD_DIM), rand(b, seq, KV_HEADS, HEAD_DIM), cos, sin]
    targets = torch.randint(0, case["vocab"], (t,), device=device)
    return [rand(t, h), rand(case["vocab"], h, scale=0.02), targets]


def bytes_moved(case: dict, itemsize: int) -> int | None:
    """The least HBM traffic of one forward+backward (statistics and weights neglected)."""
    op, t, h = case["op"], case["tokens"], case["hidden"]
    if op in ("rms_norm", "layer_norm"):
        return 5 * t * h * itemsize  # fwd: read x, write y; bwd: read x, dy, write dx
    if op == "swiglu":
        return 8 * t * case["ffn"] * itemsize  # fwd: read g, u, write out; bwd: read g, u, dout, write dg, du
    if op == "apply_rope":
        return 4 * t * (h // HEAD_DIM + KV_HEADS) * HEAD_DIM * itemsize  # read and write q, k, twice
    return None


def fwd_bwd(fn: Callable, inputs: list) -> None:
    for x in inputs:
        x.grad = None
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])


def seconds(fn: Callable, device: str) -> float:
    """Time of fn(): CUDA events on a GPU, the wall clock on a CPU (where every op is synchronous)."""
    if device != "cuda":
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def measure(fn: Callable, inputs: list, warmup: int, repeats: int, device: str) -> dict:
    for _ in range(warmup):
        fwd_bwd(fn, inputs)
    times = [seconds(lambda: fwd_bwd(fn, inputs), device) for _ in range(repeats)]
    if device != "cuda":
        return {"time_s": statistics.median(times), "peak_bytes": None}
    for x in inputs:
        x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fwd_bwd(fn, inputs)
    torch.cuda.synchronize()
    return {"time_s": statistics.median(times), "peak_bytes": torch.cuda.max_memory_allocated() - before}


def copy_bandwidth(device: str, gib: float, repeats: int = 20) -> float:
    """Bytes/s of a large copy within the device's memory (read + write)."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    return 2 * src.numel() / statistics.median(seconds(lambda: dst.copy_(src), device) for _ in range(repeats))


def run(args) -> dict:
    import triton

    device, dtype = args.device, torch.bfloat16
    for name in ("cache_size_limit", "recompile_limit"):  # one compiled graph per shape
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 1024)
    impls = implementations()
    liger = liger_ops() if device == "cuda" else None  # Liger's kernels are CUDA-only
    if liger is not None:
        impls["liger"] = liger
    impls = {k: v for k, v in impls.items() if k in args.impls}
    bandwidth = copy_bandwidth(device, 1.0 if device == "cuda" else 1 / 16)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"{name}: copy within device memory {bandwidth / 1e9:.0f} GB/s", flush=True)
    result = {
        "device": name, "torch": torch.__version__, "triton": triton.__version__,
        "triton_interpret": device != "cuda", "liger": liger is not None, "dtype": "bf16",
        "hbm_copy_bytes_per_s": bandwidth, "warmup": args.warmup, "repeats": args.repeats, "results": [],
    }
    rows = result["results"]
    for case in cases(args):
        for impl, table in impls.items():
            row, inputs = dict(case, impl=impl), None
            try:
                torch.manual_seed(0)
                inputs = make_inputs(case, impl, dtype, device)
                row.update(measure(table[case["op"]], inputs, args.warmup, args.repeats, device))
                moved = bytes_moved(case, 2)
                if moved is not None:
                    row["bandwidth_fraction"] = moved / row["time_s"] / bandwidth
                else:
                    row["tflops"] = 6 * case["tokens"] * case["hidden"] * case["vocab"] / row["time_s"] / 1e12
            except Exception as e:  # an OOM or a peer's failure is a result, not the end of the run
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            del inputs
            if device == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
            write_json(args.out, result)
    return result


def markdown(result: dict) -> str:
    """The table for BENCHMARKS.md: each implementation's time and memory, and ours over the best other."""
    lines = [f"device: {result['device']}, {result['dtype']}, copy bandwidth "
             f"{result['hbm_copy_bytes_per_s'] / 1e9:.0f} GB/s, median of {result['repeats']}", "",
             "| op | shape | impl | fwd+bwd ms | peak MiB | HBM fraction | TFLOP/s | best other / triton |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows = result["results"]
    for r in rows:
        shape = " ".join(f"{k}={r[k]}" for k in ("tokens", "hidden", "ffn", "vocab") if k in r)
        if "error" in r:
            lines.append(f"| {r['op']} | {shape} | {r['impl']} | {r['error'][:80]} | | | | |")
            continue
        others = [o["time_s"] for o in rows if "error" not in o and o["impl"] != "triton"
                  and all(o.get(k) == r.get(k) for k in ("op", "tokens", "hidden", "ffn", "vocab"))]
        speedup = f"{min(others) / r['time_s']:.2f}" if r["impl"] == "triton" and others else ""
        peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:,.0f}"
        frac = f"{r['bandwidth_fraction']:.0%}" if "bandwidth_fraction" in r else ""
        tflops = f"{r['tflops']:.0f}" if "tflops" in r else ""
        lines.append(f"| {r['op']} | {shape} | {r['impl']} | {r['time_s'] * 1e3:.3f} | {peak} | {frac} | {tflops} "
                     f"| {speedup} |")
    return "\n".join(lines)


def write_json(path: str, data: dict) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f.name, path)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--ops", type=lambda s: s.split(","), default=list(OPS), help=f"comma list of {OPS}")
    parser.add_argument("--tokens", type=ints, default=[4096, 16384], help="tokens per call (comma list)")
    parser.add_argument("--hidden", type=ints, default=[2048, 4096, 8192], help="hidden sizes (comma list)")
    parser.add_argument("--vocab", type=ints, default=[32000, 128256], help="vocabularies (comma list)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--impls", type=lambda s: s.split(","), default=["eager", "compile", "triton", "liger"],
                        help="comma list of eager, compile, triton, liger (liger: when installed, CUDA only)")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="auto: cuda when available, else cpu (Triton's interpreter; a smoke run, not a benchmark)")
    args = parser.parse_args(argv)
    unknown = set(args.ops) - set(OPS)
    if unknown:
        parser.error(f"unknown ops {sorted(unknown)}; choose from {OPS}")
    if resolve_device(args) is None:
        return 2
    if args.device == "cpu":
        # The kernels are jitted at their first launch, which reads this: setting it here is in time.
        os.environ["TRITON_INTERPRET"] = "1"
    print(markdown(run(args)))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
