"""The model profile: exact parameters, FLOPs per token, and activation bytes measured on the engine.

Activation memory is not guessed from a paper's formula: the bytes every block saves for backward
are measured on the engine's own model (`torch.autograd.graph.saved_tensors_hooks` on small real
forwards, unique storages counted once, parameters and buffers excluded) and fitted as per-element
coefficients of the model's widths:

    block bytes   = b·s·(c_tok + c_h·h + c_f·f + c_kv·g·d + c_a·a) + c_P·P_block
    outside bytes = b·s·(c_tok + c_h·h + c_V·V) + c_s·s + c_P·P_outside   (embedding, final norm, head, loss)

(b micro-batch, s sequence, h hidden, f MLP, g·d kv width, a heads, V vocab; the P terms are the
bf16 weight copies that autocast saves for backward; c_s the learned-position indices of gpt2.) The fit is made on a few shrunk models of
the same family and attention kind (grouped-query or not) with different widths, so the
coefficients are bytes per element and scale to any width: a llama-3-70b block is predicted from
tiny llama blocks, and the tests hold predictions to fresh measurements at shapes larger than the
fit. SDPA keeps no s x s matrix (flash/efficient/CPU-flash kernels save out + logsumexp), so there
is no s² term. One fit per (family, gqa) group is cached in memory and on disk.

Step time needs the bytes the memory-bound ops move (norms, activations, rotary, residual adds,
casts, the loss over the vocabulary): `measure_traffic` counts them with a TorchDispatchMode on
the same real forwards and backwards (each op reads its inputs and writes its outputs once;
matmuls and SDPA are timed from their FLOPs instead; a Triton kernel touches each of its tensor
arguments once; F.rms_norm counted as CUDA's fused kernel) and fits them on the same features.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from autotune.engine.config import KERNELS, PRECISIONS, ModelConfig, PlanConfig, TrainConfig
from autotune.engine.files import write_atomic
from autotune.engine.model import build_model, param_counts
from autotune.engine.parallel import apply_activation_checkpointing, checkpointed_blocks

DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# per token: hidden (h), MLP (f), query-width (q: heads x head_dim, d_model unless the heads are
# narrower, as on a tensor-parallel rank's share) and kv widths, heads (a); per block: parameters (P)
BLOCK_FEATURES = ("tok", "h", "f", "q", "kv", "a", "P")
TRAFFIC_BLOCK_FEATURES = (*BLOCK_FEATURES, "sd")
# what a tensor-parallel rank's block holds 1/tp of: n_heads/tp heads, d_ff/tp MLP units
# (autotune/engine/tensor_parallel.py); hidden-width tensors stay whole
TP_SPLIT_FEATURES = ("f", "q", "kv", "a")
OUTSIDE_FEATURES = ("tok", "h", "V", "P", "s")
# How 16-bit compute is applied: "autocast" keeps fp32 weights and casts per op (DDP, ZeRO-1);
# "params" computes with 16-bit parameter copies (FSDP2 MixedPrecisionPolicy, ZeRO-2/3).
CASTS = ("params", "autocast")
MEASURED_CHECKPOINTING = ("none", "full")  # selective = a mix of the two, per block
CACHE_DIR = Path(os.environ.get("AUTOTUNE_CACHE", Path.home() / ".cache" / "autotune"))


# --- parameters and FLOPs --------------------------------------------------------------------

def matmul_params(model: ModelConfig) -> int:
    """N of 6N: the weights that do matmul work (linear weights and the LM head; not the input
    embedding unless tied, nor norms, biases or positions), as nanoGPT/torchtitan count it."""
    d, f, v = model.d_model, model.d_ff, model.vocab_size
    q, kv = model.n_heads * model.head_dim, model.kv_heads * model.head_dim
    attn = d * q + 2 * d * kv + q * d
    mlp = (3 if model.family == "llama" else 2) * d * f
    return model.n_layers * (attn + mlp) + v * d


def flops_per_token(model: ModelConfig, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token, 6N + 12·L·a·d·s (PaLM appendix B; REFERENCE.md "FLOPs and MFU").

    The attention term counts the full s x s score matrix (as PaLM and FlopCounterMode do), not
    the causal half that llm.c and Megatron count.
    """
    n = matmul_params(model)
    attention = 12 * model.n_layers * model.n_heads * model.head_dim * seq_len
    return {"matmul_params": n, "dense": 6.0 * n, "attention": float(attention), "total": 6.0 * n + attention}


# --- measured activations ---------------------------------------------------------------------

def block_features(model: ModelConfig, b, s, tp=1) -> dict:
    """The features of BLOCK_FEATURES for micro-batch b and sequence s (numbers or numpy arrays),
    of one block as a rank of `tp` tensor-parallel ranks holds it (P stays the whole block's)."""
    bs = b * s
    pc = param_counts(model)
    final_norm = pc["norms"] // (2 * model.n_layers + 1)
    block_params = (pc["attention"] + pc["mlp"] + pc["norms"] - final_norm) / model.n_layers
    features = {
        "tok": bs, "h": bs * model.d_model, "f": bs * model.d_ff, "q": bs * model.n_heads * model.head_dim,
        "kv": bs * model.kv_heads * model.head_dim,
        "a": bs * model.n_heads, "P": block_params + 0 * bs,
        "sd": s * model.head_dim + 0 * bs,  # rotary tables, read once per block whatever the batch (traffic only)
    }
    return {k: v / tp if k in TP_SPLIT_FEATURES else v for k, v in features.items()}


def tp_block_bytes(plain, hidden, b, s, h: int, beta, tp, sp, checkpointed: bool = False):
    """Bytes one block saves on a tensor-parallel rank (numbers or numpy arrays).

    `plain` is the fit at the rank's features (block_features(..., tp)): exactly what the engine's
    block saves under tp. Sequence parallelism shards the hidden-width part over the sequence
    (`hidden`: the fit's tok and h terms), except the attention's and the MLP's all-gathered
    inputs, which their linears save whole: 2·b·s·h elements of `beta` bytes (none in a checkpointed
    block, which keeps only its input). Measured on the engine: tests/tp_pp_worker.py.
    (Korthikanti et al.'s 1/tp for sequence parallel assumes Megatron's re-gather in backward.)"""
    shard = np.where(sp, 1 - 1 / tp, 0.0)
    return plain - shard * (hidden - (0 if checkpointed else 2 * b * s * h * beta))


def tp_outside_bytes(per_token, hidden, b, s, h: int, beta, tp, sp):
    """The per-token part of what the final norm, head and loss save on a tensor-parallel rank
    (`per_token`: the outside fit without its V and P terms, which tp divides). Under sequence
    parallel the final norm's hidden-width tensors (`hidden`: the fit's h term) are sharded but
    the head's all-gathered input, b·s·h elements of `beta` bytes, is saved whole."""
    return per_token - np.where(sp, 1 - 1 / tp, 0.0) * (hidden - b * s * h * beta)


def outside_features(model: ModelConfig, b, s) -> dict:
    bs = b * s
    head = model.vocab_size * model.d_model
    # s: learned-position indices (gpt2), one row shared by the micro-batch
    return {"tok": bs, "h": bs * model.d_model, "V": bs * model.vocab_size, "P": head + 0 * bs, "s": s + 0 * b}


@contextmanager
def _triton_shapes_only():
    """Run the Triton path on the CPU without its arithmetic: launches become no-ops.

    What a kernel keeps for backward is decided by its autograd.Function (`ctx.save_for_backward`
    on tensors allocated by torch), not by the kernel's arithmetic, so shapes, dtypes and storages
    are those of a real run; the values are not needed. (Triton's interpreter would take about a
    second per tiny forward; tests compare the two at one shape.)
    """
    from autotune.kernels._common import LazyKernel

    launch, interpret = LazyKernel.__getitem__, os.environ.get("TRITON_INTERPRET")
    LazyKernel.__getitem__ = lambda self, grid: (lambda *args, **kwargs: None)
    os.environ["TRITON_INTERPRET"] = "1"  # lets impl="triton" accept CPU tensors
    try:
        yield
    finally:
        LazyKernel.__getitem__ = launch
        if interpret is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = interpret


def measure_saved_bytes(
    model: ModelConfig, b: int, s: int, precision: str = "fp32", cast: str = "params",
    checkpointing: str = "none", kernels: str = "torch", triton_arithmetic: bool = False, every_k: int = 2,
) -> dict[str, float]:
    """Bytes saved for backward by one real forward (+ loss) of the engine's model on the CPU, with
    the engine's own activation checkpointing: {"block": mean over blocks, "outside": embedding +
    final norm + head + loss, "total": all of it}.

    triton_arithmetic: run kernels=triton through Triton's interpreter (slow; TRITON_INTERPRET=1
    must be set before the kernels are imported) instead of skipping the kernels' arithmetic.
    """
    # Values do not matter to what is saved, only shapes and dtypes: skip the (slow) seeded init.
    net = build_model(dataclasses.replace(model, max_seq_len=max(model.max_seq_len, s)), device="meta", kernels=kernels)
    net = net.to_empty(device="cpu")
    dtype = DTYPE[precision]
    with torch.no_grad():  # uninitialised memory may hold denormals, which make CPU matmuls crawl
        for t in [*net.parameters(), *net.buffers()]:
            t.fill_(0.01)
        if precision != "fp32" and cast == "params":  # 16-bit parameters, fp32 buffers (rotary tables)
            for p in net.parameters():
                p.data = p.data.to(dtype)
    held = {t.untyped_storage().data_ptr() for t in [*net.parameters(), *net.buffers()]}
    apply_activation_checkpointing(net, PlanConfig(activation_checkpointing=checkpointing, checkpoint_every_k=every_k))
    owner = ["outside"]
    seen: dict[int, tuple[str, int]] = {}
    for name, block in net.layers.items():
        block.register_forward_pre_hook(lambda mod, args, name=name: owner.__setitem__(0, name))
        block.register_forward_hook(lambda mod, args, out: owner.__setitem__(0, "outside"))

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in held and ptr not in seen and storage.nbytes() > 0:
            seen[ptr] = (owner[0], storage.nbytes())
        return t

    tokens = torch.randint(0, model.vocab_size, (b, s))
    autocast = torch.autocast("cpu", dtype=dtype) if precision != "fp32" and cast == "autocast" else nullcontext()
    triton = _triton_shapes_only() if kernels == "triton" and not triton_arithmetic else nullcontext()
    interpret = temporary_env("TRITON_INTERPRET", "1") if kernels == "triton" and triton_arithmetic else nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast, triton, interpret:
        net(tokens, tokens)
    blocks = sum(n for who, n in seen.values() if who != "outside")
    outside = sum(n for who, n in seen.values() if who == "outside")
    return {"block": blocks / model.n_layers, "outside": float(outside), "total": float(blocks + outside)}


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


def _fit_shapes(family: str, gqa: bool) -> list[ModelConfig]:
    """Small models of one family and attention kind, widths varied so every feature separates;
    the last two with heads narrower (or wider) in total than d_model, so q separates from h."""
    widths = [(32, 4, 80, None), (48, 6, 64, None), (64, 4, 112, None), (48, 3, 160, None), (80, 10, 96, None),
              (64, 4, 96, 8), (32, 2, 64, 24)]
    shapes = []
    for i, (h, a, f, head_dim) in enumerate(widths):
        g = (a // 2 if a % 2 == 0 else 1) if gqa else a
        if family == "gpt2" or (head_dim or h // a) % 2 == 0:
            shapes.append(ModelConfig(
                name=f"fit{i}", family=family, n_layers=2, d_model=h, n_heads=a, n_kv_heads=g, d_ff=f,
                vocab_size=96 + 32 * i, max_seq_len=64, tie_embeddings=family == "gpt2", attn_head_dim=head_dim,
            ))
    return shapes


# a long sequence and a batch of short ones: per-token and per-sequence terms (rotary tables) separate
FIT_BATCHES = ((1, 20), (3, 8))


def _engine_fingerprint() -> str:
    """What the measured bytes depend on: the engine's model, checkpointing and kernels, this file, torch."""
    from autotune import kernels
    from autotune.engine import model, parallel

    files = [Path(model.__file__), Path(parallel.__file__), Path(__file__),
             *sorted(Path(kernels.__file__).parent.glob("*.py"))]
    src = b"".join(f.read_bytes() for f in files)
    return hashlib.sha256(src + torch.__version__.encode()).hexdigest()[:16]


def _lstsq(rows: list[dict], ys: list[float], names: tuple[str, ...]) -> dict[str, float]:
    x = np.array([[r[n] for n in names] for r in rows], dtype=np.float64)
    coef = np.linalg.lstsq(x, np.array(ys, dtype=np.float64), rcond=None)[0]
    return {n: float(c) for n, c in zip(names, coef)}


def _fit_group(family: str, gqa: bool) -> dict[str, dict]:
    """Coefficients for every precision x cast x checkpointing choice of one (family, gqa) group."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: more threads only contend (seconds -> minutes on a busy host)
    try:
        return _fit_group_measured(family, gqa)
    finally:
        torch.set_num_threads(threads)


def _fit_group_measured(family: str, gqa: bool) -> dict[str, dict]:
    fits = {}
    for precision in PRECISIONS:
        for cast in CASTS if precision != "fp32" else ("params",):
            for ckpt in MEASURED_CHECKPOINTING:
                for kernels in KERNELS:
                    rows_b, rows_o, yb, yo = [], [], [], []
                    for m in _fit_shapes(family, gqa):
                        for b, s in FIT_BATCHES:
                            got = measure_saved_bytes(m, b, s, precision, cast, ckpt, kernels)
                            rows_b.append(block_features(m, b, s))
                            rows_o.append(outside_features(m, b, s))
                            yb.append(got["block"])
                            yo.append(got["outside"])
                    fits[activation_key(precision, cast, ckpt, kernels)] = {
                        "block": _lstsq(rows_b, yb, BLOCK_FEATURES), "outside": _lstsq(rows_o, yo, OUTSIDE_FEATURES),
                    }
    return fits


def activation_key(precision: str, cast: str, checkpointing: str, kernels: str) -> str:
    return f"{precision}/{cast if precision != 'fp32' else 'params'}/{checkpointing}/{kernels}"


def _cached_fit(kind: str, family: str, gqa: bool, fit: Callable[[], dict]) -> dict[str, dict]:
    """A fitted table of one (family, gqa) group from the cache (a file per engine version), else
    `fit()`, written there for the next process."""
    path = CACHE_DIR / f"{kind}-{family}-{'gqa' if gqa else 'mha'}-{_engine_fingerprint()}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        pass
    fits = fit()
    try:
        write_atomic(path, json.dumps(fits, indent=2))
    except OSError:
        pass  # a read-only home: the fit is cheap and stays in memory
    return fits


@functools.cache
def activation_fit(family: str, gqa: bool) -> dict[str, dict]:
    """The coefficient table of one (family, gqa) group (fitted once per engine version)."""
    return _cached_fit("activations", family, gqa, lambda: _fit_group(family, gqa))


def activation_coefficients(model: ModelConfig) -> dict[str, dict]:
    return activation_fit(model.family, model.kv_heads != model.n_heads)


def predict_saved_bytes(model: ModelConfig, b, s, precision: str, cast: str, checkpointing: str,
                        kernels: str = "torch", every_k: int = 2, tp: int = 1, sp: bool = False) -> dict[str, float]:
    """Predicted saved bytes from the fitted coefficients: {"block" (plain), "outside", "total"}
    with the engine's choice of checkpointed blocks (engine.parallel.checkpointed_blocks); the
    blocks as one of `tp` tensor-parallel ranks holds them (`sp`: with sequence parallelism).

    One whole model, as measured. Under tp or pp the engine runs torch's loss even with
    kernels="triton" (the fused loss needs the whole head); autotune.estimate then takes the
    outside's V and P terms (logits, head) from the "torch" fit and its per-token terms from this one.
    """
    coefs = activation_coefficients(model)
    fb, fo = block_features(model, b, s, tp), outside_features(model, b, s)
    beta = 4 if precision == "fp32" else 2

    def block(mode: str) -> float:
        c = coefs[activation_key(precision, cast, mode, kernels)]["block"]
        plain = sum(c[k] * fb[k] for k in BLOCK_FEATURES if k != "P") + c["P"] * fb["P"] / tp  # weights: tp shards
        hidden = c["tok"] * fb["tok"] + c["h"] * fb["h"]
        return float(tp_block_bytes(plain, hidden, b, s, model.d_model, beta, tp, sp, checkpointed=mode == "full"))

    c = coefs[activation_key(precision, cast, "none", kernels)]["outside"]
    per_token = sum(c[k] * fo[k] for k in OUTSIDE_FEATURES if k not in ("V", "P"))
    outside = float(tp_outside_bytes(per_token, c["h"] * fo["h"], b, s, model.d_model, beta, tp, sp)
                    + (c["V"] * fo["V"] + c["P"] * fo["P"]) / tp)
    plan = PlanConfig(activation_checkpointing=checkpointing, checkpoint_every_k=every_k)
    n_ck = len(checkpointed_blocks(plan, model.n_layers))
    total = n_ck * block("full") + (model.n_layers - n_ck) * block("none") + outside
    return {"block": block("full" if checkpointing == "full" else "none"), "outside": outside, "total": total}


# --- measured memory traffic ----------------------------------------------------------------

# Ops whose time is FLOP-bound: the dense matmuls (timed from 6N) and SDPA (timed from its FLOPs).
MATMUL_OPS = frozenset({"mm", "addmm", "bmm", "baddbmm"})
# Ops that write their first argument without reading it.
WRITE_ONLY = frozenset({"copy_", "fill_", "zero_", "zeros", "zeros_like", "full", "full_like", "ones", "ones_like",
                        "normal_", "uniform_", "new_zeros", "new_full"})
NO_TRAFFIC = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
                        "lift_fresh", "_local_scalar_dense", "set_", "resize_", "_unsafe_view", "clone_"})
TRAFFIC_PHASES = ("fwd", "bwd")


def _is_attention(name: str) -> bool:
    return "scaled_dot_product" in name or "flash_attention" in name or "efficient_attention" in name


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
        self.bytes = {p: 0.0 for p in TRAFFIC_PHASES}
        self.ops = {p: 0 for p in TRAFFIC_PHASES}
        self.block_bytes = {p: 0.0 for p in TRAFFIC_PHASES}
        self.block_ops = {p: 0 for p in TRAFFIC_PHASES}

    def _add(self, nbytes: float, ops: int = 1) -> None:
        self.bytes[self.phase] += nbytes
        self.ops[self.phase] += ops
        if self.in_block:
            self.block_bytes[self.phase] += nbytes
            self.block_ops[self.phase] += ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func.is_view or name in NO_TRAFFIC or name.rstrip("_") in MATMUL_OPS or _is_attention(name):
            self._add(0, int(not func.is_view and name not in NO_TRAFFIC))
            return out
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        ins = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
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
        saved = [dict(d) for d in (self.bytes, self.ops, self.block_bytes, self.block_ops)]
        try:
            yield
        finally:
            self.bytes, self.ops, self.block_bytes, self.block_ops = saved


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


def measure_traffic(model: ModelConfig, b: int, s: int, precision: str = "fp32", cast: str = "params",
                    kernels: str = "torch") -> dict[str, float]:
    """Bytes moved by the memory-bound ops of one forward and one backward of the engine's model
    (loss included) on the CPU, and their op counts: {"fwd", "bwd", "fwd_ops", "bwd_ops"}, and
    the blocks' share of each ("block_fwd", ...: all blocks together; module hooks mark where a
    block's forward and backward begin and end). Parameter updates, gradient communication and
    FSDP's copies are not in it (the estimate times those itself)."""
    from autotune.kernels._common import LazyKernel

    net = build_model(dataclasses.replace(model, max_seq_len=max(model.max_seq_len, s)), device="meta", kernels=kernels)
    net = net.to_empty(device="cpu")
    dtype = DTYPE[precision]
    with torch.no_grad():
        for t in [*net.parameters(), *net.buffers()]:
            t.fill_(0.01)
        if precision != "fp32" and cast == "params":
            for p in net.parameters():
                p.data = p.data.to(dtype)
    tokens = torch.randint(0, model.vocab_size, (b, s))
    counter = TrafficCounter()
    for block in net.layers.values():
        block.register_forward_pre_hook(lambda *_: setattr(counter, "in_block", True))
        block.register_forward_hook(lambda *_: setattr(counter, "in_block", False))
        block.register_full_backward_pre_hook(lambda *_: setattr(counter, "in_block", True))
        block.register_full_backward_hook(lambda *_: setattr(counter, "in_block", False))
    autocast = torch.autocast("cpu", dtype=dtype) if precision != "fp32" and cast == "autocast" else nullcontext()
    launch, interpret = LazyKernel.__getitem__, os.environ.get("TRITON_INTERPRET")
    LazyKernel.__getitem__ = lambda self, grid: (lambda *args, **kwargs: counter.count_launch(args))
    os.environ["TRITON_INTERPRET"] = "1"  # lets impl="triton" accept CPU tensors
    rms_norm = torch.nn.functional.rms_norm
    torch.nn.functional.rms_norm = lambda x, shape, weight=None, eps=None: _FusedRMSNorm.apply(x, weight, counter)
    try:
        with counter:
            with autocast:
                loss = net(tokens, tokens)
            counter.phase = "bwd"
            loss.backward()
    finally:
        LazyKernel.__getitem__ = launch
        torch.nn.functional.rms_norm = rms_norm
        if interpret is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = interpret
    out = {}
    for p in TRAFFIC_PHASES:
        out |= {p: counter.bytes[p], f"{p}_ops": float(counter.ops[p]),
                f"block_{p}": counter.block_bytes[p], f"block_{p}_ops": float(counter.block_ops[p])}
    return out


def _fit_traffic_measured(family: str, gqa: bool) -> dict[str, dict]:
    """Per (precision, cast, kernels): bytes per block and outside the blocks, forward and
    backward, fitted on the features of the activation fit; op counts per block and outside."""
    fits = {}
    for precision in ("fp32", "bf16"):  # fp16 moves the bytes bf16 does
        for cast in CASTS if precision != "fp32" else ("params",):
            for kernels in KERNELS:
                rows_b, rows_o, ys = [], [], {f"{w}_{p}": [] for w in ("block", "outside") for p in TRAFFIC_PHASES}
                ops = {}
                for m in _fit_shapes(family, gqa):
                    for b, s in FIT_BATCHES:
                        got = measure_traffic(m, b, s, precision, cast, kernels)
                        rows_b.append(block_features(m, b, s))
                        rows_o.append(outside_features(m, b, s))
                        for p in TRAFFIC_PHASES:
                            ys[f"block_{p}"].append(got[f"block_{p}"] / m.n_layers)
                            ys[f"outside_{p}"].append(got[p] - got[f"block_{p}"])
                            ops[f"block_{p}"] = got[f"block_{p}_ops"] / m.n_layers
                            ops[f"outside_{p}"] = got[f"{p}_ops"] - got[f"block_{p}_ops"]
                fit = {k: _lstsq(rows_b if k.startswith("block") else rows_o, y,
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

    def fit() -> dict[str, dict]:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _fit_traffic_measured(family, gqa)
        finally:
            torch.set_num_threads(threads)

    return _cached_fit("traffic", family, gqa, fit)


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


# --- the profile ------------------------------------------------------------------------------

def model_profile(model: ModelConfig, seq_len: int | None = None, micro_batch: int = 1) -> dict:
    """Parameters per module, FLOPs per token at `seq_len`, and the measured activation model."""
    s = seq_len or model.max_seq_len
    coefs = activation_coefficients(model)
    per_choice = {}
    for key, fit in coefs.items():
        fb, fo = block_features(model, micro_batch, s), outside_features(model, micro_batch, s)
        per_choice[key] = {
            "block_bytes": sum(fit["block"][k] * fb[k] for k in BLOCK_FEATURES),
            "outside_bytes": sum(fit["outside"][k] * fo[k] for k in OUTSIDE_FEATURES),
        }
    traffic = {key: {k: v for k, v in predict_traffic(model, micro_batch, s, *key.split("/")).items()}
               for key in traffic_coefficients(model)}
    return {
        "model": dataclasses.asdict(model),
        "params": param_counts(model),
        "traffic": {
            "formula": "bytes moved by memory-bound ops (not matmuls, not SDPA), per block and outside, forward and "
                       "backward: the activation fit's features; ops: ops dispatched (host overhead)",
            "coefficients": traffic_coefficients(model),
            "at": {"micro_batch": micro_batch, "seq_len": s, "bytes": traffic},
        },
        "flops_per_token": flops_per_token(model, s) | {"seq_len": s, "convention": "6N + 12·L·a·d·s, N = matmul weights"},
        "activations": {
            "formula": "block = b·s·(tok + h·h + f·f + kv·g·d + a·a) + P·P_block; outside = b·s·(tok + h·h + V·V) + s·s + P·P_head",
            "coefficients": coefs,
            "at": {"micro_batch": micro_batch, "seq_len": s, "bytes": per_choice},
            "kernels_triton": "measured with the Triton kernels' launches skipped (what they save does not depend on their arithmetic)",
        },
    }


def cli(argv: list[str]) -> int:
    from autotune.config import planner_config
    from autotune.hardware import load_hardware

    parser = argparse.ArgumentParser(prog="autotune profile", description="model and hardware profile -> profile.json")
    parser.add_argument("--out", default=None, help="folder for profile.json (default: print only)")
    args, overrides = parser.parse_known_args(argv)
    cfg = planner_config(overrides)
    train: TrainConfig = cfg.train
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: measure the collectives too
        from autotune.engine.dist import init_distributed, rank, shutdown

        init_distributed()
        me = rank()
        try:
            hw = load_hardware(cfg.cluster)
        finally:
            shutdown()
        if me != 0:
            return 0
    else:
        hw = load_hardware(cfg.cluster)
    prof = model_profile(train.model, train.job.seq_len, train.plan.micro_batch)
    prof["hardware"] = hw.to_dict()
    prof["cluster"] = dataclasses.asdict(cfg.cluster)
    pc, fl = prof["params"], prof["flops_per_token"]
    print(f"model {train.model.name}: {pc['total']:,} parameters "
          + ", ".join(f"{k} {v:,}" for k, v in pc.items() if k != "total" and v))
    print(f"FLOPs per token at seq_len {fl['seq_len']}: {fl['total']:.4g} (6N, N = {fl['matmul_params']:,}; "
          f"attention {fl['attention']:.3g})")
    print(f"saved for backward per block at micro_batch {train.plan.micro_batch}, seq_len {fl['seq_len']}:")
    for key, v in prof["activations"]["at"]["bytes"].items():
        print(f"  {key:28s} block {v['block_bytes'] / 2**20:10.2f} MiB   outside {v['outside_bytes'] / 2**20:10.2f} MiB")
    print(f"memory-bound bytes per block at micro_batch {train.plan.micro_batch} (forward / backward):")
    for key, v in prof["traffic"]["at"]["bytes"].items():
        print(f"  {key:28s} {v['block_fwd'] / 2**20:10.2f} / {v['block_bwd'] / 2**20:10.2f} MiB   "
              f"outside {v['outside_fwd'] / 2**20:10.2f} / {v['outside_bwd'] / 2**20:10.2f} MiB")
    kind = "measured" if hw.measured else "catalog"
    print(f"hardware ({kind}): {hw.n_gpus} x {hw.gpu}, {hw.memory_bytes / 2**30:.1f} GiB, "
          + ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in hw.peak_flops.items())
          + f", memory {hw.hbm_bytes_per_s / 1e9:.0f} GB/s, link {hw.intra_node_bytes_per_s / 1e9:.0f} GB/s"
          + "".join(f", {k} {v / 1e9:.2f} GB/s" for k, v in hw.collectives.items()))
    print(f"time model factors: matmul {hw.matmul_efficiency:.3g}, attention {hw.attention_efficiency:.3g}, "
          f"memory {hw.memory_efficiency:.3g} of peak; overlap slowdown {hw.overlap_slowdown:.3g}; "
          f"collective latency {hw.collective_latency_s * 1e6:.0f} us")
    if args.out:
        path = Path(args.out) / "profile.json"
        write_atomic(path, json.dumps(prof, indent=2))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
