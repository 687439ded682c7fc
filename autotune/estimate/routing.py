"""Where a mixture-of-experts plan's routed tokens go, and what that costs the busiest rank
([Mixture of experts] in docs/formulas.md).

Per MoE layer and micro-batch each rank routes its b·s tokens to k experts each: b·s·k slots, of
which a capacity factor cf below 1 keeps at most cf of them (`sent`, autotune/engine/moe.py's
capacity rule: an expert takes ceil(cf·b·s·k/E)). Without expert parallelism a rank computes its
own slots. Under expert parallelism (plan.ep) the ep ranks of a group exchange them all-to-all
and each computes those routed to its E/ep experts: the busiest rank, the one the others wait for,
computes more than its share when the router is unbalanced.

- Imbalance: the most slots any expert gets over the mean, per micro-batch and ep group. The
  prior is what a perfectly balanced router still shows, the largest of E multinomial counts:
  1 + z_E·sqrt((E−1)/N) for N slots routed in the group, z_E the expected largest of E standard
  normals (Blom: Φ⁻¹((E − 0.375)/(E + 0.25))); a calibration sets the imbalance the probe measured
  on the plan's model (`Calibration.moe_imbalance`, a whole step's), and the larger of the two holds.
- Load of the busiest rank (`arrived`, in units of b·s·k): it holds the busiest expert and E/ep−1
  others at the mean of the rest, (ι + (E/ep − 1)(E − ι)/(E − 1)) / (E/ep): 1 with all experts on
  one rank, ι with one expert per rank; a capacity caps it at cf (each expert takes at most cf of
  its share from each rank). It scales the experts' matmuls, their activations and traffic, and
  what the all-to-alls bring to the rank.
- All-to-alls: per MoE layer and micro-batch, forward: the counts (E integers, a latency), the
  dispatch and the combine; backward: the two again; a recomputed layer runs its forward's three
  again (under op the counts' alone: it keeps the other two's outputs; attention recomputes none).
  Each moves the busiest rank's slots, d_model values of the dispatch's or the combine's element
  size, of which (ep−1)/ep leave the rank: over NVLink inside a node, over the NICs to the ranks on
  other nodes (the slower of the two sets the time). Nothing overlaps them: the experts
  wait for their tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from autotune.engine.config import ModelConfig
from autotune.estimate.arrays import PlanArrays
from autotune.estimate.calibration import Calibration
from autotune.hardware import Hardware


@dataclass(frozen=True)
class Routing:
    """A plan frame's routed slots, per plan (all neutral for a dense model)."""

    moe_share: float  # MoE layers over all layers (the rank's layers are taken in that proportion)
    sent: float  # the slots a rank routes, over b·s·k (a capacity factor below 1 drops some)
    imbalance: np.ndarray  # the most slots an expert gets over the mean, per micro-batch and ep group
    arrived: np.ndarray  # the slots the busiest rank's experts compute, over b·s·k
    dispatch_bytes: np.ndarray  # element size of the rows the dispatch all-to-all moves (and their gradient)
    combine_bytes: np.ndarray  # element size of the experts' output the combine moves back


def uniform_imbalance(n_experts: int, slots: np.ndarray) -> np.ndarray:
    """The most of `slots` slots any of n_experts experts gets over the mean, when the router
    spreads them evenly at random: the largest of E multinomial counts, 1 + z_E·sqrt((E−1)/N)."""
    if n_experts <= 1:
        return np.ones_like(slots, dtype=float)
    largest = NormalDist().inv_cdf((n_experts - 0.375) / (n_experts + 0.25))  # Blom's expected largest of E normals
    return 1 + largest * np.sqrt((n_experts - 1) / np.maximum(slots, 1))


def busiest_rank_load(imbalance: np.ndarray, n_experts: int, ep: np.ndarray) -> np.ndarray:
    """The slots the busiest of ep ranks computes over the mean per rank, its busiest expert
    `imbalance` x the mean and its E/ep − 1 others at the mean of the rest."""
    if n_experts <= 1:
        return np.ones_like(imbalance, dtype=float)
    local = n_experts / ep
    return (imbalance + (local - 1) * (n_experts - imbalance) / (n_experts - 1)) / local


def expert_routing(model: ModelConfig, plans: PlanArrays, seq_len: int, calib: Calibration) -> Routing:
    """The routed slots of every plan of the frame."""
    ones = np.ones(plans.rows)
    if not model.moe_layers:
        return Routing(0.0, 1.0, ones, ones, 4 * ones, 4 * ones)
    cf = model.capacity_factor
    group_slots = plans.ep * plans.micro_batch * seq_len * model.experts_per_token
    imbalance = np.clip(np.maximum(uniform_imbalance(model.n_experts, group_slots), calib.moe_imbalance or 1.0),
                        1.0, model.n_experts)
    load = np.where(plans.ep > 1, busiest_rank_load(imbalance, model.n_experts, plans.ep), 1.0)
    return Routing(
        moe_share=len(model.moe_layers) / model.n_layers,
        sent=min(1.0, cf) if cf is not None else 1.0,
        imbalance=imbalance,
        arrived=np.minimum(load, cf) if cf is not None else load,
        # the MoE layer's input is the residual stream's norm: fp32 under autocast (measured on the
        # engine: tests/test_estimate_moe.py); the experts return the compute dtype
        dispatch_bytes=np.where(plans.autocast, 4.0, plans.compute_bytes),
        combine_bytes=plans.compute_bytes,
    )


def all_to_all_time(model: ModelConfig, seq_len: int, plans: PlanArrays, routing: Routing, layers: np.ndarray,
                    hw: Hardware, efficiency: float) -> np.ndarray:
    """Seconds per step the first pipeline rank spends in its MoE layers' all-to-alls (`layers`:
    the blocks it holds), none without expert parallelism; `efficiency`: the collectives'."""
    ep = plans.ep
    per_node = np.minimum(ep, hw.gpus_per_node)
    inter_node = hw.inter_node_bytes_per_s or hw.intra_node_bytes_per_s
    # seconds per byte of the rank's slots: what goes to the other ranks of its node over NVLink,
    # to the other nodes over the NIC, at once
    per_byte = np.maximum((per_node - 1) / ep / hw.intra_node_bytes_per_s,
                          (ep - per_node) / ep / inter_node) / efficiency
    latency = np.where(ep > per_node, 2, 1) * hw.collective_latency_s
    rows = plans.micro_batch * seq_len * model.experts_per_token * routing.arrived * model.d_model
    volume = rows * (routing.dispatch_bytes + routing.combine_bytes) * per_byte  # dispatch + combine, one way
    forward, backward = volume + 3 * latency, volume + 2 * latency
    # op keeps the dispatch's and the combine's outputs (engine.parallel.KEPT_OPS): only the counts run again
    again = np.select([plans.checkpointing == "op", plans.checkpointing == "attention"], [latency, 0.0], forward)
    recompute = plans.checkpointed(layers) / np.maximum(layers, 1) * again
    moe_layers = layers * routing.moe_share
    return np.where(ep > 1, plans.micro_batches * moe_layers * (forward + backward + recompute), 0.0)
