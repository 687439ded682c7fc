"""A fake probe for the search-logic tests, through the search's probe hook (autotune/search/__init__.py):
no process starts, and a plan's speed and memory are a made-up function of the plan, so a test
knows what the search should find. A fixed CPU (`HARDWARE`) keeps the estimates the same on any
machine."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Callable, Optional

from autotune.engine.config import TrainConfig
from autotune.hardware import Hardware
from autotune.runner import ProbeRun

# this project's 2-core CPU as `cluster=local` measured it once
HARDWARE = Hardware(
    gpu="cpu", device="cpu", memory_bytes=24_582_340_608, hbm_bytes_per_s=58.25e9,
    peak_flops={"fp32": 195.8e9, "tf32": 195.8e9, "bf16": 322.2e9, "fp16": 3.19e9}, matmul_efficiency=1.0,
    attention_efficiency=0.133, memory_efficiency=1.0, intra_node_bytes_per_s=2e9, inter_node_bytes_per_s=2e9,
    host_device_bytes_per_s=58.25e9, host_memory_bytes=24_582_340_608, measured=True,
)


def step_time(train: TrainConfig) -> float:
    """Seconds per optimizer step: bf16 slower than fp32 (as on this CPU), larger micro-batches
    faster, each ZeRO stage and offload a cost, recompute a third more (less for the finer modes)."""
    p = train.plan
    tokens = train.job.global_batch * train.job.seq_len
    seconds = 2e-5 * tokens * (1.6 if p.precision == "bf16" else 1.0) / min(p.micro_batch, 4) ** 0.5
    seconds *= (1 + 0.1 * p.zero_stage) * (2.0 if p.offload_optimizer or p.offload_params else 1.0)
    return seconds * {"none": 1.0, "full": 1.33, "selective": 1.15, "op": 1.1, "attention": 1.05}[str(p.activation_checkpointing)]


def peak_memory(train: TrainConfig) -> float:
    """Bytes at the peak: a fixed part and activations per sequence of a micro-batch."""
    ckpt = {"none": 1.0, "op": 0.5, "attention": 0.95}.get(str(train.plan.activation_checkpointing), 0.3)
    return 20e6 + 4e6 * train.plan.micro_batch * ckpt * train.job.seq_len / 32


class FakeProbe:
    """Called as autotune.runner.run_probe; keeps every config it was asked to run."""

    def __init__(self, step_time: Callable[[TrainConfig], float] = step_time,
                 peak_memory: Callable[[TrainConfig], float] = peak_memory, status: str = "ok"):
        self.step_time, self.peak_memory, self.status = step_time, peak_memory, status
        self.ran: list[TrainConfig] = []

    def __call__(self, train: TrainConfig, trial_dir: Path, *, steps: int, warmup: int, timeout_s: float,
                 memory_cap_bytes: Optional[int] = None, on_progress=None, on_poll=None,
                 log_path: Optional[Path] = None) -> ProbeRun:
        self.ran.append(train)
        seconds, peak = self.step_time(train), self.peak_memory(train)
        if self.status != "ok":
            return ProbeRun(self.status, None, f"fake probe: {self.status}", 0.01, [], "")
        if memory_cap_bytes and peak > memory_cap_bytes:
            return ProbeRun("oom", {"status": "oom", "error": "out of memory", "peak_mem_bytes": None},
                            "out of memory at step 0", 0.01, [], "RuntimeError: out of memory")
        rows = []
        for step in range(warmup + steps):
            rows.append({"step": step, "step_time_s": seconds * (1.0 + 0.02 * (step % 3))})  # a little noise
            if on_poll is not None:
                on_poll()
            if on_progress is not None and on_progress(step, rows[-1]["step_time_s"]):
                return ProbeRun("pruned", None, f"pruned after {len(rows)} step(s)", 0.01, rows, "")
        median = statistics.median(r["step_time_s"] for r in rows[warmup:])
        metrics = {"status": "ok", "step_time_s": median,
                   "tokens_per_s": train.job.global_batch * train.job.seq_len / median,
                   "peak_mem_bytes": peak, "tflops_per_gpu": None, "mfu": None, "reserved_bytes": None,
                   "loss_first": 5.5, "loss_last": 5.4, "device": "fake", "error": None}
        return ProbeRun("ok", metrics, "", 0.01, rows, "")
