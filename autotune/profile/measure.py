"""What the measurements share: the engine's model on the CPU with placeholder values, the
Triton kernels' launches replaced (the kernels' autograd.Functions still run, on CPU tensors), and
the bytes the CPU allocator holds while something runs."""
from __future__ import annotations

import dataclasses
import os
import threading
from contextlib import contextmanager
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from autotune.engine.config import ModelConfig
from autotune.engine.model import build_model

DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# How 16-bit compute is applied: "autocast" keeps fp32 weights and casts per op (ZeRO-0: DDP);
# "params" computes with 16-bit parameter copies (FSDP2 MixedPrecisionPolicy, ZeRO 1-3).
CASTS = ("params", "autocast")


def cpu_model(model: ModelConfig, s: int, precision: str, cast: str, kernels: str) -> torch.nn.Module:
    """The engine's model on the CPU for sequences of `s`, every value 0.01, its parameters 16-bit
    when the plan computes with 16-bit parameter copies (cast="params"); buffers stay fp32."""
    # Values do not matter to what is saved or moved, only shapes and dtypes: skip the (slow) seeded init.
    net = build_model(dataclasses.replace(model, max_seq_len=max(model.max_seq_len, s)), device="meta", kernels=kernels)
    net = net.to_empty(device="cpu")
    with torch.no_grad():  # uninitialised memory may hold denormals, which make CPU matmuls crawl
        for t in [*net.parameters(), *net.buffers()]:
            t.fill_(0.01)
        if precision != "fp32" and cast == "params":
            for p in net.parameters():
                p.data = p.data.to(DTYPE[precision])
    return net


@contextmanager
def temporary_env(key: str, value: str):
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


_PATCHING = threading.RLock()  # held while triton_launches patches LazyKernel


@contextmanager
def triton_launches(launch: Callable[..., None]):
    """Every Triton kernel launch calls `launch(*args, **kwargs)` instead of running the kernel;
    TRITON_INTERPRET=1 lets impl="triton" accept CPU tensors."""
    from autotune.kernels._common import LazyKernel

    # One at a time: the patch is process-wide, and two searches in threads of one process (shared
    # studies) would otherwise restore each other's patch and leave launches skipped for good.
    with _PATCHING:
        original = LazyKernel.__getitem__
        LazyKernel.__getitem__ = lambda self, grid: launch
        try:
            with temporary_env("TRITON_INTERPRET", "1"):
                yield
        finally:
            LazyKernel.__getitem__ = original


def allocation_peak(step: Callable[[], object]) -> tuple[int, int]:
    """Run `step` and return the peak and the final change of the bytes the CPU allocator holds,
    from every allocation and free torch's profiler records in order (so temporaries inside an op's
    own implementation, DTensor's handlers or inductor's kernels, count too)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak, live
