"""Activation bytes and memory traffic of mixture-of-experts blocks, measured on the engine's MoE
layer (autotune/engine/moe.py) and fitted per element of its widths, as autotune.profile.activations
and autotune.profile.traffic do for dense blocks ([Mixture of experts] in docs/formulas.md).

A MoE block is fitted in two parts (autotune.profile.features): the block without its routed
experts (attention, router, shared experts, the combine of the routed slots) and the routed experts
themselves, whose work and bytes follow the token slots that reach the rank holding them: under
expert parallelism those are not the rank's own (autotune.estimate.routing). One fit per MoE kind:
family and attention kind as the dense fit, plus the choices that change which tensors the layer
saves or moves (where the softmax runs, renormalisation, shared experts and their gate, the
load-balancing loss, a capacity); its shapes vary the widths and the experts' count, k and widths,
so every feature separates.
"""
from __future__ import annotations

import dataclasses
import functools

from autotune.engine.config import KERNELS, ModelConfig
from autotune.profile.activations import MEASURED_CHECKPOINTING, activation_key, fp16_as_bf16, measure_saved_bytes
from autotune.profile.features import (
    EXPERT_FEATURES, MOE_FEATURES, TRAFFIC_MOE_FEATURES, checkpoint_variant, expert_features, moe_features,
)
from autotune.profile.fits import FIT_BATCHES, cached_fit, fit_shapes, lstsq
from autotune.profile.measure import CASTS
from autotune.profile.traffic import TRAFFIC_PHASES, measure_traffic, traffic_key

# Per fit shape (the dense fit's widths, each twice): experts, k, expert width, shared expert width.
# Twice as many shapes as the dense fit: a MoE block has nine per-token features, not six. Widths
# are multiples of 8: torch's grouped matmul wants 16-byte rows in 16 bits.
MOE_SHAPES = ((4, 2, 40, 24), (6, 1, 24, 40), (3, 3, 56, 16), (8, 2, 32, 48), (5, 1, 48, 24), (4, 3, 16, 56),
              (7, 2, 40, 32), (6, 3, 32, 40), (8, 1, 56, 16), (5, 2, 16, 48), (3, 2, 48, 56), (7, 1, 64, 24),
              (4, 1, 24, 32), (6, 2, 48, 40))


def moe_kind(model: ModelConfig) -> tuple:
    """What of a MoE model decides which tensors its MoE blocks save and move, beyond widths."""
    return (model.family, model.kv_heads != model.n_heads, str(model.router_softmax), model.router_norm_topk,
            model.n_shared_experts > 0, model.shared_expert_gate, model.aux_loss_coef > 0,
            model.capacity_factor is not None)


def moe_fit_shapes(kind: tuple) -> list[ModelConfig]:
    """Small two-block MoE models of one kind (every block a MoE block), widths as the dense fit's.
    A capacity, where the kind has one, is never reached (E x the slots): its code runs, nothing drops."""
    family, gqa, softmax, norm_topk, shared, gate, aux, capacity = kind
    dense = fit_shapes(family, gqa)
    shapes = []
    for i, (experts, k, expert_d_ff, shared_d_ff) in enumerate(MOE_SHAPES):
        shapes.append(dataclasses.replace(
            dense[i % len(dense)], name=f"moe-fit{i}", n_experts=experts, experts_per_token=k, moe_d_ff=expert_d_ff,
            n_shared_experts=int(shared), shared_d_ff=shared_d_ff if shared else None, shared_expert_gate=gate,
            router_softmax=softmax, router_norm_topk=norm_topk, aux_loss_coef=0.01 if aux else 0.0,
            capacity_factor=float(experts) if capacity else None))
    return shapes


def _choices() -> list[tuple[str, str, str]]:
    """The measured precision x cast x kernels choices: fp16 saves and moves what bf16 does."""
    return [(p, c, k) for p in ("fp32", "bf16") for c in (CASTS if p != "fp32" else ("params",)) for k in KERNELS]


def _fit_activations(kind: tuple) -> dict[str, dict]:
    """Per precision x cast x checkpointing x kernels: the MoE block's and its experts' coefficients."""
    fits = {}
    for precision, cast, kernels in _choices():
        for ckpt, (mode, every_k) in MEASURED_CHECKPOINTING.items():
            rows_m, rows_e, ym, ye = [], [], [], []
            # one batch shape per model, the two in turn: no per-sequence term to tell apart here
            for i, m in enumerate(moe_fit_shapes(kind)):
                b, s = FIT_BATCHES[i % len(FIT_BATCHES)]
                got = measure_saved_bytes(m, b, s, precision, cast, mode, kernels, every_k=every_k)
                rows_m.append(moe_features(m, b, s))
                rows_e.append(expert_features(m, b, s))
                ym.append(got["moe_block"])
                ye.append(got["experts"])
            fits[activation_key(precision, cast, ckpt, kernels)] = {
                "moe": lstsq(rows_m, ym, MOE_FEATURES), "experts": lstsq(rows_e, ye, EXPERT_FEATURES)}
    return fp16_as_bf16(fits)


def _fit_traffic(kind: tuple) -> dict[str, dict]:
    """Per precision x cast x kernels: bytes the MoE block's and its experts' memory-bound ops move,
    forward and backward, per MoE layer, and their op counts."""
    fits = {}
    for precision, cast, kernels in _choices():
        rows_m, rows_e, ys, ops = [], [], {f"{part}_{p}": [] for part in ("moe", "experts") for p in TRAFFIC_PHASES}, {}
        for m in moe_fit_shapes(kind):
            for b, s in FIT_BATCHES:
                got = measure_traffic(m, b, s, precision, cast, kernels)
                rows_m.append(moe_features(m, b, s))
                rows_e.append(expert_features(m, b, s))
                for key in ys:
                    ys[key].append(got[key] / m.n_layers)
                    ops[key] = got[f"{key}_ops"] / m.n_layers
        fit = {key: lstsq(rows_m if key.startswith("moe") else rows_e, y,
                          TRAFFIC_MOE_FEATURES if key.startswith("moe") else EXPERT_FEATURES) for key, y in ys.items()}
        fits[traffic_key(precision, cast, kernels)] = fit | {"ops": ops}
        if precision == "bf16":
            fits[traffic_key("fp16", cast, kernels)] = fits[traffic_key(precision, cast, kernels)]
    return fits


def _name(kind: tuple) -> str:
    family, gqa, softmax, norm_topk, shared, gate, aux, capacity = kind
    flags = [f"softmax-{softmax}", "norm" if norm_topk else "", "shared" if shared else "", "gate" if gate else "",
             "aux" if aux else "", "capacity" if capacity else ""]
    return "-".join([family, *filter(None, flags)])


@functools.cache
def moe_activation_fit(kind: tuple) -> dict[str, dict]:
    return cached_fit("moe-activations", _name(kind), kind[1], lambda: _fit_activations(kind))


@functools.cache
def moe_traffic_fit(kind: tuple) -> dict[str, dict]:
    return cached_fit("moe-traffic", _name(kind), kind[1], lambda: _fit_traffic(kind))


def moe_activation_coefficients(model: ModelConfig) -> dict[str, dict]:
    """{activation_key: {"moe": coefficients of MOE_FEATURES, "experts": of EXPERT_FEATURES}}."""
    return moe_activation_fit(moe_kind(model))


def moe_traffic_coefficients(model: ModelConfig) -> dict[str, dict]:
    """{traffic_key: {"moe_fwd", "moe_bwd": of TRAFFIC_MOE_FEATURES, "experts_fwd", "experts_bwd": of
    EXPERT_FEATURES, "ops": per MoE layer}}."""
    return moe_traffic_fit(moe_kind(model))


def predict_moe_saved_bytes(model: ModelConfig, b, s, precision: str, cast: str, checkpointing: str = "none",
                            kernels: str = "torch", every_k: int = 2) -> dict[str, float]:
    """Predicted bytes one MoE block saves without its routed experts ("moe_block", its P term
    included) and its experts ("experts"), at one rank's own tokens (as measure_saved_bytes runs);
    a checkpointed block (every one under full, op and attention) as its variant keeps it."""
    variant = checkpoint_variant(checkpointing, every_k) if checkpointing != "none" else "none"
    fit = moe_activation_coefficients(model)[activation_key(precision, cast, variant, kernels)]
    fm, fe = moe_features(model, b, s), expert_features(model, b, s)
    return {"moe_block": sum(fit["moe"][k] * fm[k] for k in MOE_FEATURES),
            "experts": sum(fit["experts"][k] * fe[k] for k in EXPERT_FEATURES)}


def predict_moe_traffic(model: ModelConfig, b, s, precision: str, cast: str, kernels: str = "torch") -> dict[str, float]:
    """Predicted memory-bound bytes per MoE layer, as measure_traffic's moe_* and experts_* over n_moe layers."""
    fit = moe_traffic_coefficients(model)[traffic_key(precision, cast, kernels)]
    fm, fe = moe_features(model, b, s), expert_features(model, b, s)
    return {f"{part}_{p}": sum(fit[f"{part}_{p}"][k] * (fm if part == "moe" else fe)[k]
                               for k in (TRAFFIC_MOE_FEATURES if part == "moe" else EXPERT_FEATURES))
            for part in ("moe", "experts") for p in TRAFFIC_PHASES}
