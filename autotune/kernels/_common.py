"""What every kernel shares: choosing the implementation, validating inputs, compiling lazily.

Triton is optional: without it the PyTorch references still run (impl="torch", or "auto" anywhere),
and impl="triton" raises a clear error. Kernels are jitted on their first launch rather than at
import, because Triton decides between compiling and its CPU interpreter (TRITON_INTERPRET=1) when a
function is decorated: importing `kernels` early (the engine does) must not fix that choice. Triton's
own library functions (tl.math, ...) are decorated at `import triton`, so TRITON_INTERPRET must be
set before triton is first imported (tests/conftest.py and benchmarks/bench_kernels.py do).
"""
from __future__ import annotations

import os
from typing import Callable

import torch
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.tensor import DTensor

try:
    import triton
except ImportError:  # the references work without it
    triton = None

IMPLS = ("auto", "triton", "torch")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def use_triton(impl: str, *tensors: torch.Tensor, contiguous: bool = True) -> bool:
    """True to run the Triton kernel, False for the reference; raises if Triton was chosen but cannot run.

    contiguous: the kernel reads these tensors through raw pointers, row-major.
    """
    if impl == "torch":
        return False
    if impl == "auto":
        if triton is None or not all(t.is_cuda for t in tensors):
            return False
    elif impl != "triton":
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    elif triton is None:
        raise RuntimeError("impl='triton' needs the triton package, which is not installed; use impl='torch'")
    if any(isinstance(t, DTensor) for t in tensors):
        raise ValueError("the Triton kernels take plain tensors, not DTensors (tensor parallelism); "
                         "run them on the local shards (.to_local(), as engine.tensor_parallel.local_rows "
                         "does for the norms) or use impl='torch'")
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if not tensors[0].is_cuda and not interpreting():
        raise ValueError(f"impl='triton' needs CUDA tensors (got {tensors[0].device}); "
                         "set TRITON_INTERPRET=1 to run Triton's interpreter on the CPU, or use impl='torch'")
    for t in tensors:
        if contiguous and not t.is_contiguous():
            raise ValueError(f"the Triton kernels need contiguous tensors, got shape {tuple(t.shape)} with strides "
                             f"{t.stride()}; call .contiguous() first")
    return True


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


class LazyKernel:
    """A Triton kernel jitted at its first launch (`kernel[grid](...)`).

    Tensor parallelism hands over the outputs of its collectives still in flight, wrapped as
    AsyncCollectiveTensor (the residual stream after an all-reduce, the gradient reaching a norm in
    backward): torch ops wait for them on first use, a kernel reading raw pointers must wait first.
    """

    def __init__(self, fn: Callable):
        self.fn = fn
        self._jitted = None

    def __getitem__(self, grid):
        if self._jitted is None:
            self._jitted = triton.jit(self.fn)
        launch = self._jitted[grid]
        return lambda *args, **kwargs: launch(
            *(a.wait() if isinstance(a, AsyncCollectiveTensor) else a for a in args), **kwargs)


def row_block(n: int, max_block: int) -> int:
    """Columns one program handles at a time: the whole row when it fits, else a loop over blocks."""
    return min(triton.next_power_of_2(n), max_block)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def num_warps(block: int) -> int:
    """Warps for a row of `block` columns: at most 32 values per thread and tensor (register pressure)."""
    return 4 if block < 2048 else 8 if block < 8192 else 16


def num_programs(device: torch.device, rows: int) -> int:
    """Programs for a row-parallel backward that reduces weight gradients: a few per SM."""
    if device.type == "cuda":
        return max(1, min(rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(rows, 4))  # the interpreter runs programs one after another
