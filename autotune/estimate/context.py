"""Context parallelism (plan.cp) in the cost model: the k/v ring's exposed time
([Context parallelism] in docs/formulas.md; the engine's ring: autotune/engine/context_parallel.py).

Everything per token is costed on a rank's seq_len / cp tokens (estimate_frame); its attention,
over the whole sequence's keys, is the causal attention's 1/cp (step_time). Here: each layer's ring
of cp steps. Forward: at each of the first cp - 1 steps a rank sends its k/v on (b·s·2·kv heads/tp·d
in the compute dtype, s the rank's tokens) while it attends to the k/v in hand, 1/cp of its
attention; what the send takes beyond that attention is exposed. Backward: the k/v again, with the
fp32 gradients of the previous step's k/v beside them, against 1/cp of attention's backward; the
last gradients' hop home is exposed whole. A recomputed attention runs the forward ring again.
The cp ranks sit next to tp's (mesh pp, dp, cp, tp): across nodes once tp·cp exceeds a node.
"""
from __future__ import annotations

import numpy as np

from autotune.engine.config import ModelConfig
from autotune.estimate.arrays import PlanArrays
from autotune.estimate.collectives import send_time
from autotune.hardware import Hardware

ATTENTION_BACKWARD = 2.5  # attention's backward over its forward (5 matmuls of 2), as step_time


def kv_bytes(model: ModelConfig, seq_len: int, plans: PlanArrays, element_bytes) -> np.ndarray:
    """One rank's k and v for one layer and micro-batch (seq_len: the rank's tokens)."""
    return 2 * plans.micro_batch * seq_len * model.kv_heads / plans.tp * model.head_dim * element_bytes


def unrepeated_kv_bytes(model: ModelConfig, seq_len: int, plans: PlanArrays) -> np.ndarray:
    """What a block under cp saves less than the measured one (SDPA keeps k and v repeated over each
    kv head's group, the ring keeps them unrepeated), per cp rank's tokens, and 0 without cp."""
    repeated = (model.n_heads - model.kv_heads) / model.kv_heads
    return np.where(plans.cp > 1, kv_bytes(model, seq_len, plans, plans.compute_bytes) * repeated, 0.0)


def ring_exchange(model: ModelConfig, seq_len: int, plans: PlanArrays, layers: np.ndarray, attention: np.ndarray,
                  recomputed: np.ndarray, hw: Hardware, eff: float) -> np.ndarray:
    """Exposed ring time of one micro-batch on a rank holding `layers` blocks; `attention`: their
    attention forward (all layers, this micro-batch), `recomputed`: the share of it recomputed."""
    cp = plans.cp
    across = plans.tp * cp > hw.gpus_per_node
    kv = send_time(kv_bytes(model, seq_len, plans, plans.compute_bytes), across, hw, eff)
    grads = send_time(kv_bytes(model, seq_len, plans, 4.0), across, hw, eff)
    step = attention / np.maximum(layers, 1) / cp  # one ring step's attention forward, one layer
    forward = (cp - 1) * np.maximum(0.0, kv - step)
    backward = (cp - 1) * np.maximum(0.0, kv + grads - ATTENTION_BACKWARD * step) + grads
    return np.where(cp > 1, layers * ((1 + recomputed) * forward + backward), 0.0)
