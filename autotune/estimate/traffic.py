"""The bytes one micro-batch's memory-bound ops move and the ops the host dispatches, per plan: the
traffic measured on the engine's model (autotune.profile.measure_traffic) for each plan's
precision, cast and kernels, a MoE block's routed experts at the busiest expert-parallel rank's
slots ([FLOPs and MFU] in docs/formulas.md)."""
from __future__ import annotations

import numpy as np

from autotune.engine.config import KERNELS, PRECISIONS, ModelConfig
from autotune.estimate.arrays import PlanArrays
from autotune.estimate.fusion import compiled_block_traffic
from autotune.estimate.routing import Routing
from autotune.profile import (
    EXPERT_FEATURES, OUTSIDE_FEATURES, TRAFFIC_BLOCK_FEATURES, TRAFFIC_MOE_FEATURES, block_features, expert_features,
    moe_features, moe_traffic_coefficients, outside_features, traffic_coefficients, traffic_key,
)


# the traffic terms of the ops between the q/k/v projections and wo (model.Attention.core): rotary
# and the kv repeat move query-, kv- and head-width tensors and read the rotary tables (the
# projections' bias adds of gpt2 are q-width too: counted here, a small excess)
ATTENTION_CORE_FEATURES = ("q", "kv", "a", "sd")
COMPILED_LOSS_PASSES = {"fwd": 1, "bwd": 2}  # passes over the logits of the compiled loss's fused kernels


def micro_batch_traffic(model: ModelConfig, plans: PlanArrays, seq_len: int, routing: Routing) -> dict[str, np.ndarray]:
    """Memory-bound bytes of one micro-batch per block and outside the blocks (block_fwd, block_bwd,
    outside_fwd, outside_bwd; block_fwd_core: a dense block_fwd's attention core) and op counts
    (block_ops, block_fwd_ops, outside_ops). The outside
    (embedding, final norm, head and loss) follows the loss actually run. A block is as a tp rank
    holds it; sequence parallel runs its hidden-width ops (norms, residual adds) on s/tp rows. A MoE
    model's block is the mean over its dense and MoE blocks (`_moe_blocks`). A compiled dense block
    moves what its fused kernels move (autotune.estimate.fusion); a MoE block is counted eager."""
    coefs = traffic_coefficients(model)
    block_at = block_features(model, plans.micro_batch, seq_len, plans.tp)
    # the weight term (casts, gradient accumulation) moves the rank's own share of the block's
    # weights: 1/tp of them under tensor parallelism (norms, replicated, are a rounding error)
    block_at = block_at | {"P": block_at["P"] / plans.tp}
    outside_at = outside_features(model, plans.micro_batch, seq_len)
    block_x = _stacked(block_at, TRAFFIC_BLOCK_FEATURES, plans.rows)
    outside_x = _stacked(outside_at, OUTSIDE_FEATURES, plans.rows)
    fits = [coefs[traffic_key(*c)] for c in COMBOS]
    fused = [compiled_block_traffic(model, precision, cast) for precision, cast, _ in COMBOS]
    block, outside = _combo(plans, plans.kernels), _combo(plans, plans.loss_kernels)
    # compiled torch ops fuse (autotune.estimate.fusion); the Triton kernels already are one pass each,
    # which inductor leaves as they are; the weight term (P) is the eager one either way
    compiled = plans.compiled & (plans.kernels == "torch")
    activation = np.array([k != "P" for k in TRAFFIC_BLOCK_FEATURES])
    out = {}
    hidden = np.array([k in ("tok", "h") for k in TRAFFIC_BLOCK_FEATURES])
    shard = np.where(plans.sequence_parallel, 1 - 1 / plans.tp, 0.0)
    for phase in ("fwd", "bwd"):
        coef = np.array([[f[f"block_{phase}"][k] for k in TRAFFIC_BLOCK_FEATURES] for f in fits])[block]
        fused_coef = np.array([[f[f"block_{phase}"].get(k, 0.0) for k in TRAFFIC_BLOCK_FEATURES] for f in fused])[block]
        coef = np.where(compiled[:, None] & activation, fused_coef, coef)
        out[f"block_{phase}"] = (np.einsum("ij,ij->i", coef, block_x)
                                 - shard * np.einsum("ij,ij->i", coef[:, hidden], block_x[:, hidden]))
        if phase == "fwd":  # the attention core's ops (rotary, the kv repeat): its query/kv/head-width terms
            core = np.array([k in ATTENTION_CORE_FEATURES for k in TRAFFIC_BLOCK_FEATURES])
            out["block_fwd_core"] = np.einsum("ij,ij->i", coef[:, core], block_x[:, core])
        coef = np.array([[f[f"outside_{phase}"][k] for k in OUTSIDE_FEATURES] for f in fits])[outside]
        # a compiled loss reads the logits once forward (online softmax), and once backward to
        # write their gradient, in the logits' width: its V term (the loss's ops) in place of eager's
        vocab = OUTSIDE_FEATURES.index("V")
        coef[:, vocab] = np.where(plans.compiled_loss, COMPILED_LOSS_PASSES[phase] * plans.compute_bytes, coef[:, vocab])
        out[f"outside_{phase}"] = np.einsum("ij,ij->i", coef, outside_x)
    for key, phases in (("block_ops", ("fwd", "bwd")), ("block_fwd_ops", ("fwd",))):
        eager, fused_ops = ([sum(f["ops"][f"block_{p}"] for p in phases) for f in table] for table in (fits, fused))
        out[key] = np.where(compiled, np.array(fused_ops)[block], np.array(eager)[block])
    out["outside_ops"] = np.array([f["ops"]["outside_fwd"] + f["ops"]["outside_bwd"] for f in fits])[outside]
    if model.moe_layers:
        n_moe = len(model.moe_layers)
        for key, moe in _moe_blocks(model, plans, seq_len, routing).items():
            out[key] = ((model.n_layers - n_moe) * out[key] + n_moe * moe) / model.n_layers
    return out


# every (precision, cast, kernels), in the order of the tables indexed by `_combo`
COMBOS = [(precision, cast, kernel) for precision in PRECISIONS for cast in ("params", "autocast") for kernel in KERNELS]


def _combo(plans: PlanArrays, kernels: np.ndarray) -> np.ndarray:
    """One integer per row naming its (precision, cast, kernels) in COMBOS: tables indexed by it, no masks."""
    precision_code = np.select([plans.precision == p for p in PRECISIONS], range(len(PRECISIONS)), 0)
    cast_code = (precision_code * 2 + plans.autocast.astype(int)) * len(KERNELS)
    return cast_code + np.select([kernels == k for k in KERNELS], range(len(KERNELS)), 0)


def _stacked(features: dict, names: tuple[str, ...], rows: int) -> np.ndarray:
    return np.stack([np.broadcast_to(features[k], (rows,)) for k in names], axis=1)


def _moe_blocks(model: ModelConfig, plans: PlanArrays, seq_len: int, routing: Routing) -> dict[str, np.ndarray]:
    """A MoE block's bytes and ops: the block without its routed experts at the slots the rank
    routes, and its experts at the slots that reach the busiest rank (E/ep of them)."""
    coefs = moe_traffic_coefficients(model)
    fits = [coefs[traffic_key(*c)] for c in COMBOS]
    combo = _combo(plans, plans.kernels)
    moe_x = _stacked(moe_features(model, plans.micro_batch, seq_len, routing.sent), TRAFFIC_MOE_FEATURES, plans.rows)
    experts_x = _stacked(expert_features(model, plans.micro_batch, seq_len, routing.arrived, plans.ep),
                         EXPERT_FEATURES, plans.rows)
    out = {}
    for phase in ("fwd", "bwd"):
        moe = np.array([[f[f"moe_{phase}"][k] for k in TRAFFIC_MOE_FEATURES] for f in fits])[combo]
        experts = np.array([[f[f"experts_{phase}"][k] for k in EXPERT_FEATURES] for f in fits])[combo]
        out[f"block_{phase}"] = np.einsum("ij,ij->i", moe, moe_x) + np.einsum("ij,ij->i", experts, experts_x)
    ops = {p: np.array([f["ops"][f"moe_{p}"] + f["ops"][f"experts_{p}"] for f in fits])[combo] for p in ("fwd", "bwd")}
    return out | {"block_ops": ops["fwd"] + ops["bwd"], "block_fwd_ops": ops["fwd"]}
