"""Activation bytes measured on the engine's model and fitted per element of its widths.

The bytes every block saves for backward are counted with `torch.autograd.graph.saved_tensors_hooks`
on small real forwards (unique storages counted once, parameters and buffers excluded) and fitted
on the features of autotune.profile.features, for every precision x cast x checkpointing x kernels
choice ([Activations] in docs/formulas.md).
"""
from __future__ import annotations

import functools
import gc
from contextlib import nullcontext
from typing import Iterable

import torch

from autotune.engine.config import KERNELS, ModelConfig, PlanConfig
from autotune.engine.context_parallel import apply_cp
from autotune.engine.moe import MoE
from autotune.engine.parallel import apply_activation_checkpointing, apply_compile, checkpointed_blocks
from autotune.profile.features import (
    BLOCK_FEATURES, OUTSIDE_FEATURES, block_features, checkpoint_variant, outside_features, sp_hidden_layout,
    tp_block_bytes, tp_outside_bytes,
)
from autotune.profile.fits import FIT_BATCHES, cached_fit, fit_shapes, lstsq
from autotune.profile.measure import CASTS, DTYPE, allocation_peak, cpu_model, temporary_env, triton_launches

# the fitted variants (features.checkpoint_variant): selective mixes none and full per block, op
# keeps every matmul's output (op1) or every other one's (op2)
MEASURED_CHECKPOINTING = {"none": ("none", 2), "full": ("full", 2), "op1": ("op", 1), "op2": ("op", 2),
                          "attention": ("attention", 2)}


def measure_saved_bytes(
    model: ModelConfig, b: int, s: int, precision: str = "fp32", cast: str = "params",
    checkpointing: str = "none", kernels: str = "torch", triton_arithmetic: bool = False, every_k: int = 2,
    cp_group=None,
) -> dict[str, float]:
    """Bytes saved for backward by one real forward (+ loss) of the engine's model on the CPU, with
    the engine's own activation checkpointing: {"block": mean over blocks, "outside": embedding +
    final norm + head + loss, "total": all of it}; for a MoE model also "moe_block" (the mean over
    its MoE blocks without their routed experts), "experts" (the routed experts' mean per MoE
    layer) and "dense_block" (the mean over its dense blocks, 0 without any).

    With kernels="triton" the kernels' launches are skipped: what a kernel keeps for backward is
    decided by its autograd.Function (`ctx.save_for_backward` on tensors allocated by torch), not by
    its arithmetic, so shapes, dtypes and storages are those of a real run. triton_arithmetic: run
    them through Triton's interpreter instead (about a second per tiny forward; TRITON_INTERPRET=1
    must be set before the kernels are imported).

    cp_group: attention by the context-parallel ring over that process group (a group of one runs
    the ring's first step alone; what the ring keeps per token is the same at any cp).
    """
    net = cpu_model(model, s, precision, cast, kernels)
    if cp_group is not None:
        apply_cp(net, cp_group)
    held = {t.untyped_storage().data_ptr() for t in [*net.parameters(), *net.buffers()]}
    owner = ["outside"]
    seen: dict[int, tuple[str, int]] = {}
    for name, block in net.layers.items():
        block.register_forward_pre_hook(lambda mod, args, name=name: owner.__setitem__(0, name))
        block.register_forward_hook(lambda mod, args, out: owner.__setitem__(0, "outside"))
        if isinstance(block.mlp, MoE):  # the routed experts' bytes apart: expert parallelism moves them
            block.mlp.experts.register_forward_pre_hook(lambda mod, args, name=name: owner.__setitem__(0, f"{name}.experts"))
            block.mlp.experts.register_forward_hook(lambda mod, args, out, name=name: owner.__setitem__(0, name))

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in held and ptr not in seen and storage.nbytes() > 0:
            seen[ptr] = (owner[0], storage.nbytes())
        return t

    # what a per-operator policy keeps is cached by the checkpoint, not saved through autograd's hooks
    plan = PlanConfig(activation_checkpointing=checkpointing, checkpoint_every_k=every_k)
    apply_activation_checkpointing(net, plan, on_keep=lambda out: [pack(t) for t in _tensors(out)])

    tokens = torch.randint(0, model.vocab_size, (b, s))
    autocast = torch.autocast("cpu", dtype=DTYPE[precision]) if precision != "fp32" and cast == "autocast" else nullcontext()
    if kernels != "triton":
        triton = nullcontext()
    elif triton_arithmetic:
        triton = temporary_env("TRITON_INTERPRET", "1")
    else:
        triton = triton_launches(lambda *args, **kwargs: None)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast, triton:
        net(tokens, tokens)
    return _by_owner(model, seen.values())


# What a compiled block (plan.compile) keeps for backward less than the eager one, per family and
# "precision/cast/variant": bytes per token per element of h and of f, and per block. Inductor's
# partitioner keeps a fused chain's inputs and recomputes the rest in backward: the norms' fp32
# intermediates (an eager F.rms_norm on the CPU keeps its fp32 upcast and product; under autocast
# the fp32 residual's too), silu(gate), and with op checkpointing one 16-bit copy of the block's
# input. Measured by `measure_compiled_saving` on four shapes per key (h 64-96, f 96-160, 48-64
# tokens; exact, zero residual), torch 2.13.0+cpu, 2026-12-06;
# tests/test_profile_compiled_and_cuda.py measures it again. fp16 keeps what bf16 keeps; full
# checkpointing keeps only the block's input.
COMPILED_SAVING = {
    "llama": {
        "bf16/params/none": (12, 2, 0), "bf16/params/op1": (2, 0, 5056), "bf16/params/op2": (2, 0, 5056),
        "bf16/params/attention": (14, 2, 0),
        "bf16/autocast/none": (16, 2, 0), "bf16/autocast/op1": (2, 0, 5056), "bf16/autocast/op2": (2, 0, 5056),
        "bf16/autocast/attention": (18, 2, 0),
        "fp32/params/none": (8, 4, 0), "fp32/params/op1": (4, 0, 5056), "fp32/params/op2": (4, 0, 5056),
        "fp32/params/attention": (12, 4, 0),
    },
    "gpt2": {
        "bf16/params/none": (0, 0, 0), "bf16/params/op1": (2, 0, 5056), "bf16/params/op2": (0, 0, 5056),
        "bf16/params/attention": (2, 0, 0),
        "bf16/autocast/none": (6, 0, 0), "bf16/autocast/op1": (2, 0, 5056), "bf16/autocast/op2": (0, 0, 5056),
        "bf16/autocast/attention": (8, 0, 0),
        "fp32/params/none": (0, 0, 0), "fp32/params/op1": (4, 0, 5056), "fp32/params/op2": (0, 0, 5056),
        "fp32/params/attention": (4, 0, 0),
    },
}


def compiled_saving(family: str, precision: str, cast: str, variant: str) -> tuple[int, int, int]:
    """COMPILED_SAVING's (per token and element of h, of f; per block) for a fitted variant."""
    if variant == "full":
        return 0, 0, 0
    key = activation_key("bf16" if precision == "fp16" else precision, cast, variant, "torch").removesuffix("/torch")
    return COMPILED_SAVING[family][key]


def cuda_norm_saving(family: str, precision: str, cast: str, norms: int) -> int:
    """Bytes a token per element of h that `norms` eager RMSNorms keep on the CPU beyond what they
    keep on CUDA. CUDA runs F.rms_norm as one kernel (aten._fused_rms_norm) that keeps its input and
    an fp32 rstd a row; the CPU decomposes it and keeps the fp32 upcast of its input (the input
    itself when that is fp32: the residual stream under autocast or fp32) and the fp32 normalized
    product: 8 - β_r bytes an element (tests/test_profile_compiled_and_cuda.py measures it against
    a stand-in of the CUDA kernel). gpt2's LayerNorm is one kernel on both."""
    if family != "llama":
        return 0
    residual = 2 if precision != "fp32" and cast == "params" else 4
    return norms * (8 - residual)


def measure_compiled_saving(model: ModelConfig, b: int, s: int, precision: str, cast: str, checkpointing: str,
                            every_k: int = 2) -> float:
    """Bytes one block keeps for backward eagerly beyond what it keeps compiled as the engine
    compiles it (engine.parallel.apply_compile, the loss left eager): the CPU allocator's live bytes
    after a forward and loss, eager minus compiled, over the blocks (the rest runs the same)."""
    tokens = torch.randint(0, model.vocab_size, (b, s))
    autocast = torch.autocast("cpu", dtype=DTYPE[precision]) if precision != "fp32" and cast == "autocast" else nullcontext()
    held = {}
    for compiled in (False, True):
        torch._dynamo.reset()  # past its recompile limit dynamo would run the blocks eagerly
        plan = PlanConfig(activation_checkpointing=checkpointing, checkpoint_every_k=every_k, compile=compiled,
                          compile_loss=False)
        net = cpu_model(model, s, precision, cast, "torch")
        apply_activation_checkpointing(net, plan)
        apply_compile(net, plan)
        out = {}

        def forward():
            with autocast:
                out["loss"] = net(tokens, tokens)

        forward()  # compiles, outside the count
        out.clear()
        gc.collect()  # a free of memory allocated before the count would go uncounted
        held[compiled] = allocation_peak(forward)[1]
    return (held[False] - held[True]) / model.n_layers


def _tensors(out) -> list[torch.Tensor]:
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]


def _by_owner(model: ModelConfig, saved: Iterable[tuple[str, int]]) -> dict[str, float]:
    """measure_saved_bytes's result from the saved storages' (owner, bytes)."""
    total: dict[str, float] = {}
    for who, nbytes in saved:
        total[who] = total.get(who, 0.0) + nbytes
    blocks = sum(n for who, n in total.items() if who != "outside")
    out = {"block": blocks / model.n_layers, "outside": total.get("outside", 0.0), "total": sum(total.values())}
    if model.moe_layers:
        moe, dense = model.moe_layers, [i for i in range(model.n_layers) if not model.is_moe_layer(i)]
        out["moe_block"] = sum(total.get(str(i), 0.0) for i in moe) / len(moe)
        out["experts"] = sum(total.get(f"{i}.experts", 0.0) for i in moe) / len(moe)
        out["dense_block"] = sum(total.get(str(i), 0.0) for i in dense) / max(len(dense), 1)
    return out


def activation_key(precision: str, cast: str, checkpointing: str, kernels: str) -> str:
    return f"{precision}/{cast if precision != 'fp32' else 'params'}/{checkpointing}/{kernels}"


def fp16_as_bf16(fits: dict[str, dict]) -> dict[str, dict]:
    """A table measured for fp32 and bf16, with bf16's fits under fp16's keys too: fp16 saves exactly
    what bf16 saves (the same autocast op lists, two bytes an element; tests/test_profile.py checks)."""
    return fits | {"fp16" + key.removeprefix("bf16"): fit for key, fit in fits.items() if key.startswith("bf16/")}


def _fit_group(family: str, gqa: bool) -> dict[str, dict]:
    """Coefficients for every precision x cast x checkpointing x kernels choice of one (family, gqa) group."""
    fits = {}
    for precision in ("fp32", "bf16"):  # fp16: fp16_as_bf16
        for cast in CASTS if precision != "fp32" else ("params",):
            for ckpt, (mode, k) in MEASURED_CHECKPOINTING.items():
                for kernels in KERNELS:
                    rows_b, rows_o, yb, yo = [], [], [], []
                    for m in fit_shapes(family, gqa):
                        for b, s in FIT_BATCHES:
                            got = measure_saved_bytes(m, b, s, precision, cast, mode, kernels, every_k=k)
                            rows_b.append(block_features(m, b, s))
                            rows_o.append(outside_features(m, b, s))
                            yb.append(got["block"])
                            yo.append(got["outside"])
                    fits[activation_key(precision, cast, ckpt, kernels)] = {
                        "block": lstsq(rows_b, yb, BLOCK_FEATURES), "outside": lstsq(rows_o, yo, OUTSIDE_FEATURES),
                    }
    return fp16_as_bf16(fits)


@functools.cache
def activation_fit(family: str, gqa: bool) -> dict[str, dict]:
    """The coefficient table of one (family, gqa) group (fitted once per engine version)."""
    return cached_fit("activations", family, gqa, lambda: _fit_group(family, gqa))


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

    def block(variant: str) -> float:
        c = coefs[activation_key(precision, cast, variant, kernels)]["block"]
        plain = sum(c[k] * fb[k] for k in BLOCK_FEATURES if k != "P") + c["P"] * fb["P"] / tp  # weights: tp shards
        hidden = c["tok"] * fb["tok"] + c["h"] * fb["h"]
        layout = sp_hidden_layout(model, variant)
        return float(tp_block_bytes(plain, hidden, b, s, model.d_model, beta, tp, sp, layout))

    c = coefs[activation_key(precision, cast, "none", kernels)]["outside"]
    per_token = sum(c[k] * fo[k] for k in OUTSIDE_FEATURES if k not in ("V", "P"))
    outside = float(tp_outside_bytes(per_token, c["h"] * fo["h"], b, s, model.d_model, beta, tp, sp)
                    + (c["V"] * fo["V"] + c["P"] * fo["P"]) / tp)
    plan = PlanConfig(activation_checkpointing=checkpointing, checkpoint_every_k=every_k)
    n_ck = len(checkpointed_blocks(plan, model.n_layers))
    variant = checkpoint_variant(checkpointing, every_k)
    total = n_ck * block(variant) + (model.n_layers - n_ck) * block("none") + outside
    return {"block": block(variant if checkpointing in ("full", "op", "attention") else "none"),
            "outside": outside, "total": total}
