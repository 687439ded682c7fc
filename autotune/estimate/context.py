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
Beside the sends, the ring's own memory-bound ops (`ring_traffic`): each step merges its block into
an fp32 output by log-sum-exp and repeats the visiting k/v over the kv heads' groups; backward adds
each step's gradients into fp32 accumulators.
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


def ring_traffic(model: ModelConfig, seq_len: int, plans: PlanArrays) -> dict[str, np.ndarray]:
    """HBM bytes of the ring's memory-bound ops beyond those of SDPA's path (one repeat of k/v over
    the groups and its sum in backward), per layer and micro-batch, the mean over the cp ranks
    (autotune/engine/context_parallel.py RingAttention; seq_len: the rank's tokens). Each op reads
    its inputs and writes its output once, as the measured traffic counts them ([Context parallelism]).

    A step meets `rows` local queries with `keys` visiting keys: step 0 all with all; after it, on
    the mean rank, half the steps all queries with half the keys, half the other way (`_block`).
    """
    cp, b, beta = plans.cp, plans.micro_batch, plans.compute_bytes
    heads, kv_heads, d, s = model.n_heads / plans.tp, model.kv_heads / plans.tp, model.head_dim, seq_len
    later = (cp - 1) * 0.75 * s  # the query rows (and key rows) of all steps after the first, mean rank
    out, lse = b * heads * d, b * heads  # per query row: output elements, log-sum-exp entries
    kv, repeated = b * kv_heads * d, b * heads * d  # per key row: one of k, v; the same over the groups
    repeat = 2 * (kv + repeated) * beta  # read k and v, write them repeated (a step after the first)
    cast = np.where(beta < 4, 1.0, 0.0)  # fp32 results cast to a 16-bit compute dtype (fp32 plans: none)
    forward = (
        out * s * 4 + lse * s * 4 + 4 * kv * s * beta  # zeroed fp32 output, log-sum-exp, k and v stacked
        # per step: output x scale (fp32), block x scale (into fp32), their sum, copied in; the
        # log-sum-exp's logaddexp, two scales' exp(difference), its copy
        + (s + later) * (out * (32 + beta) + lse * 68) + later * repeat
        + cast * out * s * (4 + beta)  # the merged output cast to the compute dtype
        - 2 * out * s * beta)  # laid out as the model reads it: SDPA's output is copied there, the ring's not
    half_rows = (cp - 1) / 2 * s / 2  # the steps that take half the queries copy their log-sum-exp rows
    backward = (
        # the output's gradient made contiguous (the model's layout), dq and dk/dv zeroed, k/v stacked
        2 * out * s * beta + out * s * 4 + 4 * kv * s * beta + 2 * kv * s * 4
        + (s + later) * out * (8 + beta)  # dq += the block's dq
        + (s + later) * (2 * kv * (8 + beta) + repeat)  # k/v repeated again, dk/dv += their group sums
        + later * 2 * (repeated + kv) * beta  # the group sums after the first step (SDPA's path sums once)
        + half_rows * lse * 8
        + cast * (out + 2 * kv) * s * (4 + beta))  # dq, dk, dv cast to the compute dtype
    return {"fwd": np.where(cp > 1, forward, 0.0), "bwd": np.where(cp > 1, backward, 0.0)}
