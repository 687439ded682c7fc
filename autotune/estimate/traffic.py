"""The bytes one micro-batch's memory-bound ops move and the ops the host dispatches, per plan: the
traffic measured on the engine's model (autotune.profile.measure_traffic) for each plan's
precision, cast and kernels ([FLOPs and MFU] in docs/formulas.md)."""
from __future__ import annotations

import numpy as np

from autotune.engine.config import KERNELS, PRECISIONS, ModelConfig
from autotune.estimate.arrays import PlanArrays
from autotune.profile import (
    OUTSIDE_FEATURES, TRAFFIC_BLOCK_FEATURES, block_features, outside_features, traffic_coefficients, traffic_key,
)


def micro_batch_traffic(model: ModelConfig, plans: PlanArrays, seq_len: int) -> dict[str, np.ndarray]:
    """Memory-bound bytes of one micro-batch per block and outside the blocks (block_fwd, block_bwd,
    outside_fwd, outside_bwd) and op counts (block_ops, block_fwd_ops, outside_ops). The outside
    (embedding, final norm, head and loss) follows the loss actually run. A block is as a tp rank
    holds it; sequence parallel runs its hidden-width ops (norms, residual adds) on s/tp rows."""
    coefs = traffic_coefficients(model)
    block_at = block_features(model, plans.micro_batch, seq_len, plans.tp)
    outside_at = outside_features(model, plans.micro_batch, seq_len)
    block_x = np.stack([np.broadcast_to(block_at[k], (plans.rows,)) for k in TRAFFIC_BLOCK_FEATURES], axis=1)
    outside_x = np.stack([np.broadcast_to(outside_at[k], (plans.rows,)) for k in OUTSIDE_FEATURES], axis=1)
    combos = [(precision, cast, kernel) for precision in PRECISIONS for cast in ("params", "autocast") for kernel in KERNELS]
    fits = [coefs[traffic_key(*c)] for c in combos]
    # one integer per row names its (precision, cast, kernels): tables indexed by it, no masks
    precision_code = np.select([plans.precision == p for p in PRECISIONS], range(len(PRECISIONS)), 0)
    cast_code = (precision_code * 2 + plans.autocast.astype(int)) * len(KERNELS)
    block = cast_code + np.select([plans.kernels == k for k in KERNELS], range(len(KERNELS)), 0)
    outside = cast_code + np.select([plans.loss_kernels == k for k in KERNELS], range(len(KERNELS)), 0)
    out = {}
    hidden = np.array([k in ("tok", "h") for k in TRAFFIC_BLOCK_FEATURES])
    shard = np.where(plans.sequence_parallel, 1 - 1 / plans.tp, 0.0)
    for phase in ("fwd", "bwd"):
        coef = np.array([[f[f"block_{phase}"][k] for k in TRAFFIC_BLOCK_FEATURES] for f in fits])[block]
        out[f"block_{phase}"] = (np.einsum("ij,ij->i", coef, block_x)
                                 - shard * np.einsum("ij,ij->i", coef[:, hidden], block_x[:, hidden]))
        coef = np.array([[f[f"outside_{phase}"][k] for k in OUTSIDE_FEATURES] for f in fits])[outside]
        out[f"outside_{phase}"] = np.einsum("ij,ij->i", coef, outside_x)
    out["block_ops"] = np.array([f["ops"]["block_fwd"] + f["ops"]["block_bwd"] for f in fits])[block]
    out["block_fwd_ops"] = np.array([f["ops"]["block_fwd"] for f in fits])[block]
    out["outside_ops"] = np.array([f["ops"]["outside_fwd"] + f["ops"]["outside_bwd"] for f in fits])[outside]
    return out
