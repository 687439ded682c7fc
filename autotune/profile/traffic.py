"""Bytes the memory-bound ops move, counted on the engine's model and fitted like the activations.

Step time needs the bytes the memory-bound ops move (norms, activations, rotary, residual adds,
casts, the loss over the vocabulary): `measure_traffic` counts them with a TorchDispatchMode on
small real forwards and backwards (each op reads its inputs and writes its outputs once; matmuls
and SDPA are timed from their FLOPs instead; a Triton kernel touches each of its tensor arguments
once; F.rms_norm counted as CUDA's fused kernel) and fits them on the features of the activation
fit ([FLOPs and MFU] in docs/formulas.md).
"""
from __future__ import annotations

import functools
from contextlib import contextmanager, nullcontext
from typing import Callable

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from autotune.engine.config import KERNELS, ModelConfig
from autotune.engine.moe import MoE
from autotune.profile.features import (
    OUTSIDE_FEATURES, TRAFFIC_BLOCK_FEATURES, block_features, outside_features,
)
from autotune.profile.fits import FIT_BATCHES, cached_fit, fit_shapes, lstsq
from autotune.profile.measure import CASTS, DTYPE, cpu_model, triton_launches

# Ops whose time is FLOP-bound: the dense matmuls (timed from 6N) and SDPA (timed from its FLOPs).
MATMUL_OPS = frozenset({"mm", "addmm", "bmm", "baddbmm", "_grouped_mm"})
# Ops that write their first argument without reading it.
WRITE_ONLY = frozenset({"copy_", "fill_", "zero_", "zeros", "zeros_like", "full", "full_like", "ones", "ones_like",
                        "normal_", "uniform_", "new_zeros", "new_full"})
NO_TRAFFIC = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
                        "lift_fresh", "_local_scalar_dense", "set_", "resize_", "_unsafe_view", "clone_"})
TRAFFIC_PHASES = ("fwd", "bwd")


def _is_attention(name: str) -> bool:
    return "scaled_dot_product" in name or "flash_attention" in name or "efficient_attention" in name


def _same_data(dst: torch.Tensor, src: torch.Tensor) -> bool:
    """Whether a copy_ is of a view onto itself, which ATen's copy_ skips (aten/src/ATen/native/Copy.cpp)."""
    return (dst.untyped_storage().data_ptr() == src.untyped_storage().data_ptr() and dst.dtype == src.dtype
            and dst.storage_offset() == src.storage_offset() and dst.stride() == src.stride() and dst.shape == src.shape)


def _is_communication(func) -> bool:
    """A collective or point-to-point op (the cp ring's sends): timed as communication, not HBM traffic."""
    return func.namespace in ("c10d", "_c10d_functional")


def _touched(t: torch.Tensor) -> int:
    """Bytes an op reads or writes through `t`: its elements, but no more than its storage
    (a broadcast weight, expanded to the activation's shape, is read once)."""
    return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())


class TrafficCounter(TorchDispatchMode):
    """HBM bytes and op counts of everything that is not a matmul or attention, as the engine's
    model dispatches it: each op reads its tensor inputs and writes its outputs once (the
    first-principles cost of a memory-bound kernel); views move nothing; an embedding reads the
    rows it gathers. A Triton kernel (kernels=triton, launches counted by `count_launch`) touches
    each tensor argument once: the passes its fusion saves are the ops it replaces."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "fwd"
        self.in_block = False  # set by the blocks' hooks (measure_traffic)
        self.part = ""  # in a MoE block: "moe", or "experts" inside its routed experts (measure_traffic)
        self.bytes = {p: 0.0 for p in TRAFFIC_PHASES}
        self.ops = {p: 0 for p in TRAFFIC_PHASES}
        self.block_bytes = {p: 0.0 for p in TRAFFIC_PHASES}
        self.block_ops = {p: 0 for p in TRAFFIC_PHASES}
        self.part_bytes = {(part, p): 0.0 for part in ("moe", "experts") for p in TRAFFIC_PHASES}
        self.part_ops = {(part, p): 0 for part in ("moe", "experts") for p in TRAFFIC_PHASES}

    def _add(self, nbytes: float, ops: int = 1) -> None:
        self.bytes[self.phase] += nbytes
        self.ops[self.phase] += ops
        if self.in_block:
            self.block_bytes[self.phase] += nbytes
            self.block_ops[self.phase] += ops
        if self.part:
            self.part_bytes[self.part, self.phase] += nbytes
            self.part_ops[self.part, self.phase] += ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if (func.is_view or name in NO_TRAFFIC or name.rstrip("_") in MATMUL_OPS or _is_attention(name)
                or _is_communication(func)):
            self._add(0, int(not func.is_view and name not in NO_TRAFFIC))
            return out
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        ins = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if name == "copy_" and _same_data(*ins[:2]):  # `x[i] += y` copies x[i] onto itself: ATen returns at once
            self._add(0)
            return out
        if name in WRITE_ONLY and ins:
            ins = ins[1:] if name.endswith("_") else []  # copy_(dst, src) reads src only
        if name == "embedding":
            ins = ins[1:]  # the indices; the rows read are the output's size
            outs = outs * 2
        self._add(sum(map(_touched, ins)) + sum(map(_touched, outs)))
        return out

    def count_launch(self, args) -> None:
        self._add(sum(_touched(a) for a in args if isinstance(a, torch.Tensor)))

    @contextmanager
    def paused(self):
        names = ("bytes", "ops", "block_bytes", "block_ops", "part_bytes", "part_ops")
        saved = [dict(getattr(self, name)) for name in names]
        try:
            yield
        finally:
            for name, value in zip(names, saved):
                setattr(self, name, value)


class _FusedRMSNorm(torch.autograd.Function):
    """F.rms_norm as CUDA runs it (aten._fused_rms_norm: one kernel each way, fp32 rstd per row);
    the CPU decomposes it into five ops. Only shapes matter here, not values."""

    @staticmethod
    def forward(ctx, x, weight, counter):
        with counter.paused():
            y = torch.empty(x.shape, dtype=torch.result_type(x, weight) if weight is not None else x.dtype)
            rstd = torch.empty(x.shape[:-1] + (1,), dtype=torch.float32)
        counter.count_launch((x, weight, y, rstd))
        ctx.save_for_backward(x, weight, rstd)
        ctx.counter = counter
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        with ctx.counter.paused():
            dx, dw = torch.zeros_like(x), torch.zeros_like(weight) if weight is not None else None
        ctx.counter.count_launch((dy, x, weight, rstd, dx, dw))
        return dx, dw, None


@contextmanager
def _fused_rms_norm(counter: TrafficCounter):
    """F.rms_norm counted as CUDA's one fused kernel each way (_FusedRMSNorm)."""
    rms_norm = torch.nn.functional.rms_norm
    torch.nn.functional.rms_norm = lambda x, shape, weight=None, eps=None: _FusedRMSNorm.apply(x, weight, counter)
    try:
        yield
    finally:
        torch.nn.functional.rms_norm = rms_norm


def measure_traffic(model: ModelConfig, b: int, s: int, precision: str = "fp32", cast: str = "params",
                    kernels: str = "torch") -> dict[str, float]:
    """Bytes moved by the memory-bound ops of one forward and one backward of the engine's model
    (loss included) on the CPU, and their op counts: {"fwd", "bwd", "fwd_ops", "bwd_ops"}, and
    the blocks' share of each ("block_fwd", ...: all blocks together; module hooks mark where a
    block's forward and backward begin and end); of a MoE model, the MoE blocks' share without
    their routed experts ("moe_fwd", ...) and the routed experts' ("experts_fwd", ...), each over
    all MoE layers. Parameter updates, gradient communication and FSDP's copies are not in it (the
    estimate times those itself)."""
    net = cpu_model(model, s, precision, cast, kernels)
    tokens = torch.randint(0, model.vocab_size, (b, s))
    counter = TrafficCounter()
    for block in net.layers.values():
        part = "moe" if isinstance(block.mlp, MoE) else ""
        _mark(block, lambda on, part=part: (setattr(counter, "in_block", on), setattr(counter, "part", part if on else "")))
        if part:
            _mark(block.mlp.experts, lambda on: setattr(counter, "part", "experts" if on else "moe"))
    autocast = torch.autocast("cpu", dtype=DTYPE[precision]) if precision != "fp32" and cast == "autocast" else nullcontext()
    with triton_launches(lambda *args, **kwargs: counter.count_launch(args)), _fused_rms_norm(counter), counter:
        with autocast:
            loss = net(tokens, tokens)
        counter.phase = "bwd"
        loss.backward()
    out = {}
    for p in TRAFFIC_PHASES:
        out |= {p: counter.bytes[p], f"{p}_ops": float(counter.ops[p]),
                f"block_{p}": counter.block_bytes[p], f"block_{p}_ops": float(counter.block_ops[p])}
        if model.moe_layers:
            for part in ("moe", "experts"):
                out |= {f"{part}_{p}": counter.part_bytes[part, p], f"{part}_{p}_ops": float(counter.part_ops[part, p])}
    return out


def _mark(module: torch.nn.Module, inside: Callable[[bool], object]) -> None:
    """Call inside(True) where the module's forward and its backward begin, inside(False) where they end."""
    def begin(*_) -> None:  # a hook that returns a value would replace the module's inputs or outputs
        inside(True)

    def end(*_) -> None:
        inside(False)

    module.register_forward_pre_hook(begin)
    module.register_forward_hook(end)
    module.register_full_backward_pre_hook(begin)
    module.register_full_backward_hook(end)


def _fit_traffic_measured(family: str, gqa: bool) -> dict[str, dict]:
    """Per (precision, cast, kernels): bytes per block and outside the blocks, forward and
    backward, fitted on the features of the activation fit; op counts per block and outside."""
    fits = {}
    for precision in ("fp32", "bf16"):  # fp16 moves the bytes bf16 does
        for cast in CASTS if precision != "fp32" else ("params",):
            for kernels in KERNELS:
                rows_b, rows_o, ys = [], [], {f"{w}_{p}": [] for w in ("block", "outside") for p in TRAFFIC_PHASES}
                ops = {}
                for m in fit_shapes(family, gqa):
                    for b, s in FIT_BATCHES:
                        got = measure_traffic(m, b, s, precision, cast, kernels)
                        rows_b.append(block_features(m, b, s))
                        rows_o.append(outside_features(m, b, s))
                        for p in TRAFFIC_PHASES:
                            ys[f"block_{p}"].append(got[f"block_{p}"] / m.n_layers)
                            ys[f"outside_{p}"].append(got[p] - got[f"block_{p}"])
                            ops[f"block_{p}"] = got[f"block_{p}_ops"] / m.n_layers
                            ops[f"outside_{p}"] = got[f"{p}_ops"] - got[f"block_{p}_ops"]
                fit = {k: lstsq(rows_b if k.startswith("block") else rows_o, y,
                                 TRAFFIC_BLOCK_FEATURES if k.startswith("block") else OUTSIDE_FEATURES) for k, y in ys.items()}
                fits[traffic_key(precision, cast, kernels)] = fit | {"ops": ops}
                if precision == "bf16":
                    fits[traffic_key("fp16", cast, kernels)] = fits[traffic_key(precision, cast, kernels)]
    return fits


def traffic_key(precision: str, cast: str, kernels: str) -> str:
    return f"{precision}/{cast if precision != 'fp32' else 'params'}/{kernels}"


@functools.cache
def traffic_fit(family: str, gqa: bool) -> dict[str, dict]:
    """The memory-traffic table of one (family, gqa) group (fitted once per engine version)."""
    return cached_fit("traffic", family, gqa, lambda: _fit_traffic_measured(family, gqa))


def traffic_coefficients(model: ModelConfig) -> dict[str, dict]:
    return traffic_fit(model.family, model.kv_heads != model.n_heads)


def predict_traffic(model: ModelConfig, b, s, precision: str, cast: str, kernels: str = "torch") -> dict[str, float]:
    """Predicted memory-bound bytes of one whole-model forward and backward (as `measure_traffic`)
    and per block: {"fwd", "bwd", "block_fwd", "block_bwd", "outside_fwd", "outside_bwd"}."""
    fit = traffic_coefficients(model)[traffic_key(precision, cast, kernels)]
    fb, fo = block_features(model, b, s), outside_features(model, b, s)
    out = {}
    for p in TRAFFIC_PHASES:
        out[f"block_{p}"] = sum(fit[f"block_{p}"][k] * fb[k] for k in TRAFFIC_BLOCK_FEATURES)
        out[f"outside_{p}"] = sum(fit[f"outside_{p}"][k] * fo[k] for k in OUTSIDE_FEATURES)
        out[p] = model.n_layers * out[f"block_{p}"] + out[f"outside_{p}"]
    return out

