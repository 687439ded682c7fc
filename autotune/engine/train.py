"""Train a model under a plan: `autotune train CONFIG.yaml [key=value ...]` or
`torchrun --nproc_per_node N -m autotune.engine.train CONFIG.yaml [key=value ...]`.

`autotune train` launches torchrun itself (single node, `--standalone`) when the plan needs more
than one process; everything a user can get wrong (config, data, checkpoint) is checked before
that, so a mistake is one `error:` line and exit status 2, not N tracebacks.

`Engine` holds what a plan builds (model, optimizer, lr schedule, loss scaler) and `Engine.step`
is the one training step that both this loop and the probe (autotune/engine/probe.py) run.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psutil
import torch
import torch.distributed as tdist

from autotune.engine import checkpoint, dist
from autotune.engine.config import ConfigError, JobConfig, TrainConfig, load_train_config, to_yaml
from autotune.engine.context_parallel import shard_sequence
from autotune.engine.data import check_vocab, micro_batches
from autotune.engine.float8 import after_optimizer_step
from autotune.engine.files import write_atomic
from autotune.engine.model import build_model
from autotune.engine.moe import step_stats
from autotune.engine.pipeline import build_pipeline
from autotune.engine.tensor_parallel import loss_context
from autotune.engine.parallel import (
    apply_plan,
    autocast,
    build_grad_scaler,
    build_mesh,
    build_optimizer,
    check_supported,
    clip_grad_norm,
    fixed_loss_scale,
    gradient_sync,
    unwrap,
)
from autotune.hardware import catalog_gpu_of
from autotune.profile import flops_per_token

RUN_CONFIG = "config.yaml"  # the config a run trains, in its out_dir

# --- throughput accounting --------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's dense peak FLOP/s for the plan's compute dtype, from the GPU catalog (conf/gpu);
    None on a CPU or a GPU the catalog lacks."""
    hw = catalog_gpu_of(device_name(device))
    return hw.peak_flops[precision] if hw else None


def _peak_rss_bytes() -> int:
    """The resident set's high-water mark (VmHWM): psutil reads neither it nor its reset."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/self/status has no VmHWM")


class MemoryMeter:
    """Peak memory of this rank from when the meter is made. CUDA: max_memory_allocated /
    max_memory_reserved. CPU: the peak resident set (VmHWM, reset through /proc/self/clear_refs)
    minus the resident set at the start, i.e. what the run added at its peak."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        else:
            # Reset the high-water mark to the current resident set (Linux >= 4.0); where that is
            # refused, the peak is the process's own since it started.
            with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = psutil.Process().memory_info().rss

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return max(0, _peak_rss_bytes() - self.base)

    def reserved_bytes(self) -> int | None:
        return torch.cuda.max_memory_reserved(self.device) if self.device.type == "cuda" else None


class PhaseTimer:
    """Seconds spent in forward / backward / optimizer. CUDA events on a GPU (no extra syncs: read
    after the step's own sync), wall clock on a CPU (where every op is synchronous). Disabled, it
    times nothing (the training loop, which never reads it)."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.cuda, self.enabled = device.type == "cuda", enabled
        self.spans: dict[str, list] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if not self.enabled:
            yield
        elif self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.spans.setdefault(phase, []).append((start, end))
        else:
            t = time.perf_counter()
            yield
            self.spans.setdefault(phase, []).append(time.perf_counter() - t)

    def seconds(self) -> dict[str, float]:
        """Totals per phase since the last call (call after the step has synchronised)."""
        if self.cuda:
            totals = {k: sum(s.elapsed_time(e) for s, e in v) / 1e3 for k, v in self.spans.items()}
        else:
            totals = {k: sum(v) for k, v in self.spans.items()}
        self.spans = {}
        return totals


# --- the engine: model, optimizer and the training step --------------------------------------

def lr_factor(job: JobConfig, step: int) -> float:
    """The multiple of the peak lr at (0-based) step `step`: linear warmup from lr / warmup_steps,
    then cosine decay to min_lr_ratio at the last step."""
    o, steps = job.optimizer, job.steps
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    progress = min(1.0, (step - o.warmup_steps) / max(1, steps - o.warmup_steps))
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class StepResult:
    loss: torch.Tensor  # this rank's mean loss over its micro-batches (not yet reduced across ranks)
    grad_norm: torch.Tensor  # global (all shards), before clipping
    moe: dict[str, float] | None = None  # a MoE model's aux loss, load imbalance, dropped share (moe.step_stats)


class Engine:
    """Everything a plan builds on this rank, and the training step."""

    def __init__(self, cfg: TrainConfig, device: torch.device, timed: bool = False):
        self.cfg, self.device = cfg, device
        model_cfg, job, plan = cfg.model, cfg.job, cfg.plan
        check_supported(plan)
        if plan.world_size != dist.world_size():
            raise ConfigError(
                f"the plan needs dp x cp x tp x pp = {plan.world_size} processes but {dist.world_size()} were "
                f"launched; launch with --nproc_per_node {plan.world_size} (or `autotune train`, which does)"
            )
        torch.manual_seed(job.seed)
        self.mesh = build_mesh(plan, device.type)
        self.dp_rank, self.dp_size = self.mesh["dp"].get_local_rank(), plan.dp
        if model_cfg.init_from:
            from autotune.engine.hf import load_hf_weights

            offload = plan.offload_optimizer or plan.offload_params  # FSDP2's CPUOffloadPolicy takes host shards
            model = build_model(model_cfg, device="cpu" if offload else device, seed=job.seed, kernels=plan.kernels)
            load_hf_weights(model, model_cfg.init_from)  # before sharding: every rank loads, then keeps its shard
        else:
            # materialised after sharding (apply_plan), so no rank ever holds the whole model
            model = build_model(model_cfg, device="meta", kernels=plan.kernels)
        self.pipeline = build_pipeline(model, plan, self.mesh, device, job.seed) if plan.pp > 1 else None
        # under pp, this rank's stages as one module with the full model's parameter names
        self.model = self.pipeline.model if self.pipeline else apply_plan(model, plan, self.mesh, device, job.seed)
        self.pp_group = self.mesh["pp"].get_group() if plan.pp > 1 else None
        self.optimizer = build_optimizer(self.model, job)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, functools.partial(lr_factor, job))
        self.scaler = build_grad_scaler(plan, device)
        self.fixed_scale = fixed_loss_scale(plan)
        self.timer = PhaseTimer(device, enabled=timed)  # the probe's forward/backward/optimizer breakdown
        self.tokens_per_step = job.global_batch * job.seq_len
        self.flops_per_token = flops_per_token(model_cfg, job.seq_len)["total"]
        self.peak_flops = peak_flops(device, plan.precision)

    def batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches; under context parallelism its chunks of its dp rank's sequences."""
        plan = self.cfg.plan
        batches = micro_batches(self.cfg.job, self.cfg.model, plan, step, self.dp_rank, self.dp_size)
        if plan.cp == 1:
            return batches
        rank = self.mesh["cp"].get_local_rank()
        return [(shard_sequence(x, rank, plan.cp), shard_sequence(y, rank, plan.cp)) for x, y in batches]

    def step(self, step: int) -> StepResult:
        """One optimizer step over this rank's micro-batches of global step `step` (0-based)."""
        model, plan, timer = self.model, self.cfg.plan, self.timer
        batches = self.batches(step)
        loss_sum = torch.zeros((), device=self.device)
        if self.pipeline:
            # the schedule interleaves the micro-batches' forwards and backwards: one phase. The
            # scale as a tensor (scaling 1 also sets up the scaler on stages that compute no loss).
            scale = self.scaler.scale(torch.ones((), device=self.device)) if self.scaler else None
            with timer("forward_backward"), loss_context(plan), autocast(plan, self.device):
                loss_sum = self.pipeline.step(batches, scale)
        else:
            for i, (inputs, targets) in enumerate(batches):
                inputs = inputs.to(self.device, non_blocking=True)
                targets = targets.to(self.device, non_blocking=True)
                with gradient_sync(model, plan, enabled=i == len(batches) - 1), loss_context(plan):
                    with timer("forward"), autocast(plan, self.device):
                        loss = model(inputs, targets) / len(batches)
                    with timer("backward"):
                        (self.scaler.scale(loss) if self.scaler else loss).backward()
                loss_sum += loss.detach()
        with timer("optimizer"):
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            duplicates = self.pipeline.duplicate_grads if self.pipeline else ()
            grad_norm = clip_grad_norm(model, self.cfg.job.optimizer.grad_clip, self.pp_group, duplicates)
            if self.scaler:
                self.scaler.step(self.optimizer)  # skipped when the scaled gradients overflowed
                self.scaler.update(self.fixed_scale)
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            after_optimizer_step(self.model, plan)
        moe = step_stats(self.model if self.pipeline else unwrap(model), self.device, len(batches), plan.dp)
        return StepResult(loss_sum, grad_norm, moe)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def mfu(self, tokens_per_s: float) -> float | None:
        if self.peak_flops is None:
            return None
        return tokens_per_s * self.flops_per_token / (dist.world_size() * self.peak_flops)

    # --- checkpoint state ---
    def extra_state(self, next_step: int) -> dict:
        return {
            "step": next_step,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else {},
        }

    def save(self, root: Path, next_step: int) -> Path:
        return checkpoint.save(root, next_step, self.model, self.optimizer, self.extra_state(next_step))

    def load(self, path: Path) -> int:
        """Restore from a checkpoint; returns the step to continue from."""
        extra = checkpoint.load(path, self.model, self.optimizer, self.extra_state(0))
        self.scheduler.load_state_dict(extra["scheduler"])
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr  # the schedule's lr, whatever the optimizer state carried
        if self.scaler and extra["scaler"]:
            self.scaler.load_state_dict(extra["scaler"])
        return int(extra["step"])


def reduce_loss(loss: torch.Tensor, flag: bool = False) -> tuple[float, bool]:
    """Mean loss over the data-parallel ranks, and whether any rank raised `flag` (one all-reduce)."""
    both = torch.stack([loss.float(), torch.tensor(float(flag), device=loss.device)])
    if dist.world_size() > 1:
        tdist.all_reduce(both)
        both[0] /= dist.world_size()
    loss_value, any_flag = both.tolist()
    return loss_value, any_flag > 0


# --- the training loop -----------------------------------------------------------------------

class StopFlag:
    """Set by SIGTERM while the loop runs: it saves at the end of the current step and exits 0."""

    def __init__(self):
        self.raised = False

    def __enter__(self) -> "StopFlag":
        self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self.previous)

    def _handle(self, signum, frame) -> None:
        self.raised = True


def train(cfg: TrainConfig) -> int:
    device = dist.init_distributed()
    try:
        with StopFlag() as stop:
            return _train(cfg, device, stop)
    finally:
        dist.shutdown()


def _train(cfg: TrainConfig, device: torch.device, stop: StopFlag) -> int:
    job, rank0 = cfg.job, dist.rank() == 0
    engine = Engine(cfg, device)
    root = checkpoint.checkpoint_root(job)
    start = 0
    resume_from = checkpoint.start_checkpoint(job)
    if resume_from is not None:
        start = engine.load(resume_from)
        if rank0:
            print(f"resumed from {resume_from} at step {start}", flush=True)
            if start >= job.steps:
                print(f"nothing to train: job.steps={job.steps} is reached; raise job.steps to train on", flush=True)
    out_dir = Path(job.out_dir)
    if rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
        forget_metrics_after(out_dir / "metrics.jsonl", start)
        write_atomic(out_dir / RUN_CONFIG, to_yaml(cfg))  # what `autotune export` rebuilds the model from
    metrics = open(out_dir / "metrics.jsonl", "a") if rank0 else None
    meter = MemoryMeter(device)
    try:
        t_last, steps_since_log = time.perf_counter(), 0
        for step in range(start, job.steps):
            lr = engine.lr()
            result = engine.step(step)
            loss, stopping = reduce_loss(result.loss, stop.raised)
            done = step + 1
            steps_since_log += 1
            if done % job.log_every == 0 or done == job.steps or stopping:
                elapsed = time.perf_counter() - t_last
                tokens_per_s = engine.tokens_per_step * steps_since_log / elapsed
                record = {
                    "step": done,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": float(result.grad_norm),
                    "tokens_per_s": tokens_per_s,
                    "mfu": engine.mfu(tokens_per_s),
                    "peak_mem_bytes": meter.peak_bytes(),
                    **{f"moe_{k}": v for k, v in (result.moe or {}).items()},
                }
                if rank0:
                    log_record(record, metrics)
                t_last, steps_since_log = time.perf_counter(), 0
            if stopping or done == job.steps or (job.checkpoint_every and done % job.checkpoint_every == 0):
                t_save = time.perf_counter()
                path = engine.save(root, done)
                t_last += time.perf_counter() - t_save  # tokens/s counts training, not saving
                if rank0:
                    print(f"saved {path}", flush=True)
            if stopping:
                if rank0:
                    print(f"stopped by SIGTERM after step {done}", flush=True)
                break
    finally:
        if metrics:
            metrics.close()
    return 0


def forget_metrics_after(path: Path, step: int) -> None:
    """Drop the logged steps after `step`: a run that died after its last checkpoint repeats them,
    and metrics.jsonl should hold each step once."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        write_atomic(path, "".join(kept))


def log_record(record: dict, metrics) -> None:
    mfu = f"{record['mfu']:.1%}" if record["mfu"] is not None else "n/a"
    print(
        f"step {record['step']:>6} | loss {record['loss']:.4f} | lr {record['lr']:.3e} | "
        f"grad_norm {record['grad_norm']:.3f} | {record['tokens_per_s']:,.0f} tok/s | mfu {mfu} | "
        f"mem {record['peak_mem_bytes'] / 2**30:.2f} GiB",
        flush=True,
    )
    metrics.write(json.dumps(record) + "\n")
    metrics.flush()


# --- command line ----------------------------------------------------------------------------

def preflight(cfg: TrainConfig) -> None:
    """Everything a user can get wrong, checked before a process is launched or a file written."""
    check_supported(cfg.plan)
    if cfg.model.init_from:
        from autotune.engine.hf import check_hf_weights

        check_hf_weights(cfg.model, cfg.model.init_from)  # names, shapes, dtypes: headers only
    micro_batches(cfg.job, cfg.model, cfg.plan, 0, 0, cfg.plan.dp)  # data source readable
    check_vocab(cfg.job, cfg.model)
    start = checkpoint.start_checkpoint(cfg.job)
    if start is not None:
        checkpoint.check_readable(start, cfg.model)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="autotune train", description="Train a model under a plan.")
    parser.add_argument("config", help="a training config (model, job, plan), e.g. outputs/<run>/best.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. plan.micro_batch=4")
    return parser.parse_intermixed_args(argv)


def cli(argv: list[str]) -> int:
    """`autotune train`: run in this process, or launch torchrun when the plan needs several."""
    args = parse_args(argv)
    cfg = load_train_config(args.config, args.overrides)
    preflight(cfg)
    if cfg.plan.world_size == 1 or "WORLD_SIZE" in os.environ:
        return train(cfg)
    return launch_workers("autotune.engine.train", cfg.plan.world_size, [args.config, *args.overrides])


def launch_workers(module: str, world: int, arguments: list[str]) -> int:
    """Run `python -m module *arguments` in `world` processes under torchrun (one node) and wait."""
    if torch.cuda.is_available() and world > torch.cuda.device_count():
        raise ConfigError(
            f"the plan needs {world} GPUs but this machine has {torch.cuda.device_count()}; run "
            f"`torchrun --nnodes ... -m {module}` on several nodes or pick a plan with fewer ranks"
        )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               "-m", module, *arguments]
    # Its own session: a signal meant for this job reaches it only through us (below).
    child = subprocess.Popen(command, start_new_session=True)
    signal.signal(signal.SIGTERM, lambda signum, frame: _terminate_workers(child.pid))
    signal.signal(signal.SIGINT, lambda signum, frame: child.send_signal(signal.SIGINT))  # Ctrl-C: stop all
    return child.wait()


def _terminate_workers(torchrun_pid: int) -> None:
    """SIGTERM the workers themselves: each saves and exits 0, and torchrun then exits 0 too (a
    SIGTERM to torchrun would reach them as well, but torchrun itself would exit with an error)."""
    try:
        torchrun = psutil.Process(torchrun_pid)
        for process in torchrun.children() or [torchrun]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.terminate()  # SIGTERM, to this process (psutil checks the pid was not reused)
    except psutil.NoSuchProcess:
        pass  # torchrun has ended already


def main() -> int:
    try:
        args = parse_args(sys.argv[1:])
        cfg = load_train_config(args.config, args.overrides)
        preflight(cfg)  # under a user's own torchrun too: another model's checkpoint is refused, not loaded
        return train(cfg)
    except ConfigError as e:
        if os.environ.get("RANK", "0") == "0":  # one line, not one per rank
            print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
