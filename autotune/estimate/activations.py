"""What one micro-batch saves for backward on a rank, per plan: the bytes measured on the engine's
model (autotune.profile) for the plan's precision x cast x checkpointing x kernels, as a
tensor-parallel rank holds them, and a MoE block's routed experts as the busiest expert-parallel
rank holds them ([Activations] in docs/formulas.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from autotune.engine.config import KERNELS, PRECISIONS, ModelConfig
from autotune.estimate.arrays import PlanArrays
from autotune.estimate.context import unrepeated_kv_bytes
from autotune.estimate.routing import Routing
from autotune.profile import (
    BLOCK_FEATURES, EXPERT_FEATURES, MEASURED_CHECKPOINTING, MOE_FEATURES, OUTSIDE_FEATURES, activation_coefficients,
    activation_key, block_features, compiled_saving, cuda_norm_saving, expert_features, moe_activation_coefficients,
    moe_features, outside_features, sp_hidden_layout, tp_block_bytes, tp_outside_bytes,
)


@dataclass(frozen=True)
class SavedBytes:
    """Bytes one micro-batch saves, per plan."""

    block: np.ndarray  # one block without checkpointing
    checkpointed_block: np.ndarray  # one checkpointed block: its input (full, selective), or what op / attention keep
    outside_per_token: np.ndarray  # the per-token part outside the blocks: final norm, the head's input
    cast_weights: np.ndarray  # autocast's 16-bit weight copies one block saves (the fit's P term)
    cast_weights_checkpointed: np.ndarray  # the same for a checkpointed block
    logits: np.ndarray  # what the head and loss save per vocabulary entry (the fit's V term), whole model
    head: np.ndarray  # the head gradient or cast head the loss saves (the outside fit's P term)


def saved_bytes(model: ModelConfig, plans: PlanArrays, seq_len: int, routing: Routing,
                device: str = "cuda") -> SavedBytes:
    """What a tp rank's block saves (autotune.profile.tp_block_bytes) is the fit at its features;
    sequence parallel shards the hidden-width part except the two all-gathered linear inputs.
    (Korthikanti et al.'s (10 + 24/t)/34 fits fp32 but not bf16, whose norms keep fp32 parts;
    their 1/t assumes Megatron's re-gather in backward, which DTensor's linears do not do.)
    A MoE model's block is the mean over its dense and MoE blocks (`_with_moe_blocks`). Under cp a
    plain block saves k and v unrepeated (the ring's; estimate.context.unrepeated_kv_bytes). The
    fit is measured on the CPU; on a `device` of "cuda" the eager RMSNorms keep less (`_measured_terms`)."""
    terms = _measured_terms(model, plans, seq_len, device)
    if model.moe_layers:
        terms = _with_moe_blocks(model, plans, seq_len, routing, terms, device)
    shape = (plans.micro_batch, seq_len, model.d_model, plans.compute_bytes, plans.tp, plans.sequence_parallel)
    variant = _variants(plans)
    layouts = {v: sp_hidden_layout(model, v) for v in MEASURED_CHECKPOINTING}
    layout = tuple(np.select([variant == v for v in layouts], [layouts[v][i] for v in layouts], 0) for i in (0, 1))
    return SavedBytes(
        block=tp_block_bytes(terms["none_tok"] - unrepeated_kv_bytes(model, seq_len, plans), terms["none_hidden"],
                             *shape),
        checkpointed_block=tp_block_bytes(terms["ck_tok"], terms["ck_hidden"], *shape, layout),
        outside_per_token=tp_outside_bytes(terms["out_tok"], terms["out_hidden"], *shape),
        cast_weights=terms["none_P"], cast_weights_checkpointed=terms["ck_P"],
        logits=terms["out_V"], head=terms["out_P"],
    )


def _choices(plans: PlanArrays, kernels: np.ndarray) -> Iterator[tuple[str, str, str, np.ndarray]]:
    """(precision, cast, kernels, rows) for each choice some rows of the frame make (`kernels`: per row)."""
    for precision in PRECISIONS:
        for cast in ("autocast", "params"):
            same = (plans.precision == precision) & (plans.autocast == (cast == "autocast"))
            for kernel in KERNELS:
                rows = same & (kernels == kernel)
                if rows.any():
                    yield precision, cast, kernel, rows


def _measured_terms(model: ModelConfig, plans: PlanArrays, seq_len: int, device: str) -> dict[str, np.ndarray]:
    """The fitted terms for each row's (precision, cast, checkpointing, kernels), at the rank's
    features: per block (none_*, and ck_* for the row's checkpointed variant) its per-token part, the
    hidden-width part of that (tok and h terms) and its weights (P); outside the blocks the same plus
    V (logits). With the torch kernels, less what a compiled block recomputes (COMPILED_SAVING) or,
    eager on CUDA, what the fused RMSNorm does not keep (cuda_norm_saving: the block's two norms
    where not checkpointed, the final norm)."""
    coefs = activation_coefficients(model)
    variant = _variants(plans)
    block_at = block_features(model, plans.micro_batch, seq_len, plans.tp)  # a block as a tp rank holds it
    outside_at = outside_features(model, plans.micro_batch, seq_len)
    names = ("none_tok", "none_hidden", "none_P", "ck_tok", "ck_hidden", "ck_P", "out_tok", "out_hidden", "out_V", "out_P")
    terms = {k: np.zeros(plans.rows) for k in names}
    for precision, cast, kernel, rows in _choices(plans, plans.kernels):
        for name, fitted, some in [("none", "none", rows)] + [("ck", v, rows & (variant == v)) for v in MEASURED_CHECKPOINTING]:
            if some.any():
                coef = coefs[activation_key(precision, cast, fitted, kernel)]["block"]
                at = {k: v[some] for k, v in block_at.items()}
                terms[f"{name}_tok"][some] = sum(coef[k] * at[k] for k in BLOCK_FEATURES if k != "P")
                terms[f"{name}_hidden"][some] = coef["tok"] * at["tok"] + coef["h"] * at["h"]
                terms[f"{name}_P"][some] = coef["P"] * at["P"]
                if kernel == "torch":
                    per_h, per_f, per_block = compiled_saving(model.family, precision, cast, fitted)
                    eager_h = cuda_norm_saving(model.family, precision, cast, _cuda_norms(fitted, kernel, device))
                    compiled = plans.compiled[some]
                    terms[f"{name}_tok"][some] -= np.where(compiled, per_h * at["h"] + per_f * at["f"] + per_block,
                                                           eager_h * at["h"])
                    terms[f"{name}_hidden"][some] -= np.where(compiled, per_h, eager_h) * at["h"]
        coef = coefs[activation_key(precision, cast, "none", kernel)]["outside"]
        final_norm = cuda_norm_saving(model.family, precision, cast, int(kernel == "torch" and device == "cuda"))
        terms["out_tok"][rows] = sum(coef[k] * outside_at[k][rows] for k in OUTSIDE_FEATURES if k not in ("V", "P")) - (
            final_norm * outside_at["h"][rows])
        terms["out_hidden"][rows] = (coef["h"] - final_norm) * outside_at["h"][rows]
    # The head and loss save the V terms (logits) and the P term (head gradient or cast head) of the
    # loss actually run; the per-token terms (the final norm, and the hidden states the head saves or
    # the fused loss's d hidden, of one size) follow plan.kernels.
    for precision, cast, kernel, rows in _choices(plans, plans.loss_kernels):
        coef = coefs[activation_key(precision, cast, "none", kernel)]["outside"]
        terms["out_V"][rows] = coef["V"] * outside_at["V"][rows]
        terms["out_P"][rows] = coef["P"] * outside_at["P"][rows]
    return terms


def _cuda_norms(variant: str, kernel: str, device: str) -> int:
    """The eager RMSNorms of a block in `variant` that keep less on CUDA than the CPU fit counts:
    its two, unless checkpointing recomputes them (op, full) or the Triton kernels run them."""
    return 2 if variant in ("none", "attention") and kernel == "torch" and device == "cuda" else 0


def _with_moe_blocks(model: ModelConfig, plans: PlanArrays, seq_len: int, routing: Routing,
                     dense: dict[str, np.ndarray], device: str) -> dict[str, np.ndarray]:
    """The block terms as the mean over the model's dense and MoE blocks. A MoE block is its two
    measured parts: the block without its routed experts at the slots the rank routes, and the
    experts at the slots that reach the busiest rank (autotune.estimate.routing), E/ep of them; on
    CUDA less its eager RMSNorms' saving, as a dense block's (its compiled saving is not measured)."""
    coefs = moe_activation_coefficients(model)
    moe_at = moe_features(model, plans.micro_batch, seq_len, routing.sent)
    experts_at = expert_features(model, plans.micro_batch, seq_len, routing.arrived, plans.ep)
    n_moe = len(model.moe_layers)
    variant = _variants(plans)
    out = dict(dense)
    for name in ("none", "ck"):  # a checkpointed MoE block as its row's variant keeps it
        tok, weights = np.zeros(plans.rows), np.zeros(plans.rows)
        for precision, cast, kernel, rows, mode in _moe_choices(plans, variant if name == "ck" else None):
            coef = coefs[activation_key(precision, cast, mode, kernel)]
            norms = _cuda_norms(mode, kernel, device)
            tok[rows] = (sum(coef["moe"][k] * moe_at[k][rows] for k in MOE_FEATURES if k != "P")
                         + sum(coef["experts"][k] * experts_at[k][rows] for k in EXPERT_FEATURES if k != "Pe")
                         - cuda_norm_saving(model.family, precision, cast, norms) * moe_at["h"][rows])
            weights[rows] = coef["moe"]["P"] * moe_at["P"][rows] + coef["experts"]["Pe"] * experts_at["Pe"][rows]
        for term, moe in ((f"{name}_tok", tok), (f"{name}_P", weights)):
            out[term] = ((model.n_layers - n_moe) * dense[term] + n_moe * moe) / model.n_layers
    return out


def _moe_choices(plans: PlanArrays, variant: np.ndarray | None) -> Iterator[tuple[str, str, str, np.ndarray, str]]:
    """_choices split further by each row's checkpointed variant (none where `variant` is None)."""
    for precision, cast, kernel, rows in _choices(plans, plans.kernels):
        if variant is None:
            yield precision, cast, kernel, rows, "none"
            continue
        for v in MEASURED_CHECKPOINTING:
            if (some := rows & (variant == v)).any():
                yield precision, cast, kernel, some, v


def _variants(plans: PlanArrays) -> np.ndarray:
    """Each row's fitted variant of a checkpointed block (autotune.profile.checkpoint_variant)."""
    return np.select([plans.checkpointing == "op", plans.checkpointing == "attention"],
                     [np.char.add("op", plans.every_k.astype(str)), "attention"], "full")
