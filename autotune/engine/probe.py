"""A short measured training run of one plan: the search's trial.

    python -m autotune.engine.probe CONFIG.yaml --steps N --warmup W --out metrics.json \
        [--progress PATH] [--max-memory-bytes B] [--timeout S] [key=value ...]

(under torchrun for several ranks). It runs W + N real steps of `engine.train.Engine.step` and
writes ONE JSON object to --out (atomically):

    status          ok | oom | error | timeout
    step_time_s     median wall time of the N measured steps (each ends with a device sync)
    tokens_per_s    global tokens per second at that median
    tflops_per_gpu  model FLOPs (6N + 12·L·a·d·s per token, N the active matmul weights:
                    autotune.profile.flops_per_token) per
                    second per rank, in TFLOP/s
    mfu             tflops_per_gpu / the device's dense peak for the precision in the GPU catalog
                    (conf/gpu; null on a CPU or a GPU the catalog lacks)
    peak_mem_bytes  max over ranks; CUDA: torch.cuda.max_memory_allocated; CPU: the peak
                    resident set (VmHWM, reset when the probe starts) minus the resident set
                    before the model was built (`peak_mem_kind` names which)
    reserved_bytes  max over ranks of torch.cuda.max_memory_reserved (null on a CPU)
    loss_first, loss_last, device, world_size, versions {torch, triton, python}
    moe             a MoE model's medians over the measured steps of moe.step_stats: aux_loss,
                    imbalance (most tokens per expert over the mean, per layer, mean over layers),
                    imbalance_max, dropped (null for a dense model)
    breakdown       median seconds per step in {forward_s, backward_s, optimizer_s}; comm_s is
                    null: the collectives overlap compute and are not timed apart; under pp the
                    schedule interleaves forwards and backwards: forward_backward_s holds both
                    (forward_s and backward_s are null), elsewhere it is null
    error           the failure's message (null when ok), plan (the plan that ran)

`--progress PATH`: rank 0 appends a flushed JSON line {"step", "step_time_s", "loss"} per step, so
the search can prune a trial while it runs. `--max-memory-bytes`: a per-process memory cap
(`torch.cuda.set_per_process_memory_fraction` on a GPU; on a CPU an address-space limit,
RLIMIT_AS, of the current size plus B). Running out of memory is a result (status "oom", exit 0),
not a crash. The probe writes no checkpoint and never talks to Optuna.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import psutil
import torch
import torch.distributed as tdist

from autotune.engine import dist
from autotune.engine.config import ConfigError, TrainConfig, load_train_config
from autotune.engine.files import write_atomic
from autotune.engine.train import Engine, MemoryMeter, device_name, reduce_loss

OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory", "std::bad_alloc")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m autotune.engine.probe", description="Measure a few training steps of a plan.")
    p.add_argument("config", help="training config (model, job, plan)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--steps", type=int, default=5, help="measured steps")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps first (allocator, autotuning, compile)")
    p.add_argument("--out", required=True, help="where to write the JSON result")
    p.add_argument("--progress", help="append one JSON line per step here (rank 0)")
    p.add_argument("--max-memory-bytes", type=int, help="per-process memory cap")
    p.add_argument("--timeout", type=float, help="stop after this many seconds with status timeout")
    args = p.parse_intermixed_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    for flag, path in (("--out", args.out), ("--progress", args.progress)):
        # checked before the run, which would otherwise be measured for nothing
        if path and (Path(path).is_dir() or not _can_make_folder(Path(path).parent)):
            p.error(f"{flag} {path}: not a file path that can be written")
    return args


def _can_make_folder(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def versions() -> dict[str, str | None]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "python": platform.python_version()}


def is_oom(e: BaseException) -> bool:
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e).lower() for m in OOM_MESSAGES)


class MemoryCap:
    """A per-process memory limit, lifted again before the result is written."""

    def __init__(self, limit_bytes: int | None, device: torch.device):
        self.device, self.saved = device, None
        if limit_bytes is None:
            return
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, limit_bytes / total), device)
        else:
            # Start the OpenMP thread pool first: its thread stacks would not fit under the cap.
            x = torch.ones(512, 512)
            (x @ x).add_(1.0).sum()
            self.saved = resource.getrlimit(resource.RLIMIT_AS)
            size = psutil.Process().memory_info().vms  # the address space RLIMIT_AS counts
            resource.setrlimit(resource.RLIMIT_AS, (size + limit_bytes, self.saved[1]))

    def lift(self) -> None:
        if self.saved is not None:
            resource.setrlimit(resource.RLIMIT_AS, self.saved)
            self.saved = None


def run(cfg: TrainConfig, args: argparse.Namespace, device: torch.device) -> dict:
    """Run the steps; returns the measured fields of the result (status ok or timeout)."""
    meter = MemoryMeter(device)
    engine = Engine(cfg, device, timed=True)
    rank0 = dist.rank() == 0
    progress = open(args.progress, "a") if args.progress and rank0 else None
    times, losses, phases, moe = [], [], [], []
    status, start = "ok", time.perf_counter()
    try:
        for step in range(args.warmup + args.steps):
            t = time.perf_counter()
            result = engine.step(step)
            loss, _ = reduce_loss(result.loss)  # also the step's device sync
            elapsed = time.perf_counter() - t
            losses.append(loss)
            phase = engine.timer.seconds()
            if step >= args.warmup:
                times.append(elapsed)
                phases.append(phase)
                moe.append(result.moe)
            if progress:
                progress.write(json.dumps({"step": step, "step_time_s": elapsed, "loss": loss}) + "\n")
                progress.flush()
            if args.timeout and time.perf_counter() - start > args.timeout and step + 1 < args.warmup + args.steps:
                status = "timeout"
                break
    finally:
        if progress:
            progress.close()
    peak = _max_over_ranks(meter.peak_bytes(), device)
    reserved = meter.reserved_bytes()
    step_time = statistics.median(times) if times else None
    tokens_per_s = engine.tokens_per_step / step_time if step_time else None
    return {
        "status": status,
        "step_time_s": step_time,
        "tokens_per_s": tokens_per_s,
        "tflops_per_gpu": tokens_per_s * engine.flops_per_token / dist.world_size() / 1e12 if tokens_per_s else None,
        "mfu": engine.mfu(tokens_per_s) if tokens_per_s else None,
        "peak_mem_bytes": peak,
        "reserved_bytes": _max_over_ranks(reserved, device) if reserved is not None else None,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "moe": {k: statistics.median(m[k] for m in moe) for k in moe[0]} if moe and moe[0] else None,
        "breakdown": {
            f"{k}_s": statistics.median(p[k] for p in phases) if phases and k in phases[0] else None
            for k in ("forward", "backward", "forward_backward", "optimizer")
        } | {"comm_s": None},
    }


def _max_over_ranks(value: int, device: torch.device) -> int:
    if dist.world_size() == 1:
        return int(value)
    t = torch.tensor([value], dtype=torch.int64, device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return int(t.item())


def result_template(cfg: TrainConfig | None, device: torch.device | None) -> dict:
    return {
        "status": "error", "step_time_s": None, "tokens_per_s": None, "tflops_per_gpu": None, "mfu": None,
        "peak_mem_bytes": None,
        "peak_mem_kind": "cuda_max_memory_allocated" if device and device.type == "cuda" else "cpu_peak_rss_growth",
        "reserved_bytes": None, "loss_first": None, "loss_last": None, "moe": None,
        "device": device_name(device) if device else None, "world_size": dist.world_size(),
        "versions": versions(),
        "breakdown": {"forward_s": None, "backward_s": None, "forward_backward_s": None, "optimizer_s": None,
                      "comm_s": None},
        "error": None, "plan": dataclasses.asdict(cfg.plan) if cfg else None,
    }


def write_result(path: str, result: dict, exclusive: bool) -> None:
    """Atomically. `exclusive`: keep a result already there (the first rank to fail tells what
    happened; peers then fail on its absence)."""
    write_atomic(path, json.dumps(result, indent=2) + "\n", keep_existing=exclusive)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = device = cap = None
    result = result_template(None, None)
    code = 0
    try:
        cfg = load_train_config(args.config, args.overrides)
        device = dist.init_distributed(timeout_s=600.0)  # a peer that died ends this rank, not hangs it
        result = result_template(cfg, device)
        cap = MemoryCap(args.max_memory_bytes, device)
        result.update(run(cfg, args, device))
    except ConfigError as e:
        result.update(status="error", error=str(e))
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except Exception as e:  # a trial's failure is data: report it, do not crash the search
        # Under an address-space cap, a thread that cannot get its stack fails with EAGAIN: memory too.
        capped = cap is not None and cap.saved is not None
        oom = is_oom(e) or (capped and "resource temporarily unavailable" in str(e).lower())
        if cap:
            cap.lift()
        result.update(status="oom" if oom else "error", error=f"{type(e).__name__}: {str(e)[:2000]}")
        code = 0 if oom else 1
    if cap:
        cap.lift()
    if result["status"] in ("ok", "timeout"):
        if dist.rank() == 0:
            write_result(args.out, result, exclusive=False)
    else:
        write_result(args.out, result, exclusive=True)
        if dist.world_size() > 1:
            # The collective teardown could wait forever on peers that are stuck or gone.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    dist.shutdown()
    return code

if __name__ == "__main__":
    sys.exit(main())
