"""Process group and device of this process: one process per GPU under torchrun, or a lone process.

A lone process gets a one-rank process group too (an in-memory store, no network), so that the
same code path (device mesh, FSDP2, DCP) serves one process and many.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def device_for_rank() -> torch.device:
    """CUDA device LOCAL_RANK when there are GPUs, else the CPU."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def init_distributed(timeout_s: float = 1800.0) -> torch.device:
    """Join the job's process group (NCCL on GPUs, gloo on CPUs) and return this rank's device."""
    device = device_for_rank()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            kwargs = {"device_id": device} if device.type == "cuda" else {}
            dist.init_process_group(backend, timeout=timeout, **kwargs)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
