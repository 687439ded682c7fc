"""One collective's time by its message size and its group's shape ([Communication] in docs/formulas.md).

A collective costs a latency that grows with its algorithm's steps plus its bytes over the bus
bandwidth (nccl-tests' convention: all-reduce moves 2(n−1)/n of the message per rank, all-gather
and reduce-scatter (n−1)/n of the gathered size):

- a ring over n ranks takes n−1 steps (all-gather, reduce-scatter) or 2(n−1) (all-reduce); every
  rank sends to its neighbour at once, so a step lasts as long as the slowest hop: a network hop
  once the ring spans nodes, an NVLink hop inside one;
- NCCL's all-reduce may run as a double binary tree instead: 2·⌈log2 nodes⌉ network hops and
  2·⌈log2 ranks per node⌉ NVLink hops; NCCL picks the faster of the two per message size;
- the bus bandwidth inside a node is the node's (NVLink); across nodes NCCL runs a ring per NIC,
  so it is the per-GPU network figure times the group's ranks per node, at most the node's links.

The hop latencies: an NVLink hop is the catalog's 8-GPU all-reduce latency over its 2·7 ring
steps; a network hop is NETWORK_HOP_S.
"""
from __future__ import annotations

import numpy as np

from autotune.hardware import Hardware

# One step of a collective across the network: an InfiniBand/RoCE round of NCCL's proxy, a few
# microseconds (nccl-tests' inter-node latency at a few bytes is ~5-10 µs for 2(n-1) = 2 steps
# of a two-node all-reduce).
NETWORK_HOP_S = 5e-6
NODE_RING_STEPS = 14  # the catalog latency is that of an 8-GPU ring all-reduce: 2·(8−1) steps


def nvlink_hop_s(hw: Hardware) -> float:
    return hw.collective_latency_s / NODE_RING_STEPS


def bus_bandwidth(hw: Hardware, ranks, per_node, efficiency: float = 1.0):
    """Bus bytes/s of a group of `ranks` with `per_node` of them on each node (arrays)."""
    ranks, per_node = np.asarray(ranks, dtype=float), np.asarray(per_node, dtype=float)
    across = np.minimum(hw.intra_node_bytes_per_s, hw.inter_node_bytes_per_s * per_node)
    return np.where(ranks <= per_node, hw.intra_node_bytes_per_s, across) * efficiency


def collective_time(kind: str, nbytes, ranks, per_node, hw: Hardware, efficiency: float = 1.0):
    """Seconds of one collective of `nbytes` (the full message: the all-reduced tensor, or the
    gathered size) over `ranks` ranks, `per_node` of them per node; 0 for a single rank.
    kind: all_reduce | all_gather | reduce_scatter."""
    nbytes = np.asarray(nbytes, dtype=float)
    ranks = np.maximum(np.asarray(ranks, dtype=float), 1)
    per_node = np.clip(np.asarray(per_node, dtype=float), 1, ranks)
    spans_nodes = ranks > per_node
    hop = np.where(spans_nodes, NETWORK_HOP_S, nvlink_hop_s(hw))
    share = (ranks - 1) / ranks
    if kind == "all_reduce":
        transfer = 2 * share * nbytes / bus_bandwidth(hw, ranks, per_node, efficiency)
        ring = 2 * (ranks - 1) * hop + transfer
        nodes = np.ceil(ranks / per_node)
        tree = (2 * np.ceil(np.log2(np.maximum(nodes, 1))) * NETWORK_HOP_S
                + 2 * np.ceil(np.log2(per_node)) * nvlink_hop_s(hw) + transfer)
        time = np.minimum(ring, tree)
    elif kind in ("all_gather", "reduce_scatter"):
        time = (ranks - 1) * hop + share * nbytes / bus_bandwidth(hw, ranks, per_node, efficiency)
    else:
        raise ValueError(f"unknown collective {kind!r}")
    return np.where(ranks > 1, time, 0.0)


def send_time(nbytes, across_nodes, hw: Hardware, efficiency: float = 1.0):
    """One point-to-point transfer (a pipeline boundary): one hop's latency plus the bytes over
    the link (the node's, or one GPU's network port)."""
    across_nodes = np.asarray(across_nodes, dtype=bool)
    bandwidth = np.where(across_nodes, hw.inter_node_bytes_per_s, hw.intra_node_bytes_per_s) * efficiency
    return np.where(across_nodes, NETWORK_HOP_S, nvlink_hop_s(hw)) + np.asarray(nbytes, dtype=float) / bandwidth
