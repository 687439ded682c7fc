"""GEMM efficiency by shape: what a block's matmuls reach of the large-GEMM rate ([Matmul shapes]
in docs/formulas.md).

A GPU computes C = A·B (M x K times K x N) in output tiles of TM x TN, one thread block per tile,
in waves of one tile per streaming multiprocessor (NVIDIA, "Matrix Multiplication Background
User's Guide", DU-09799-001, ch. 3). Three losses follow from the shape alone:

- tile quantization: the edge tiles compute a whole tile for a partial one, M·N / (⌈M/TM⌉·TM·⌈N/TN⌉·TN);
- wave quantization: the last wave leaves SMs idle, tiles / (⌈tiles/SMs⌉·SMs); a grid smaller than
  the GPU is split over K (split-K) to fill it, while each part keeps a useful depth;
- depth: each tile fills its pipeline and writes its output once, a fixed cost of `overhead_k`
  steps of K (`tile_overhead_k`: the output's write over the SM's share of HBM, in the steps of K
  the tensor cores run meanwhile), so a tile runs K / (K + overhead_k) of the time at full rate.

The library picks, per shape, the faster of a large tile and a half-size one; a half-size tile
loads its operands for fewer FLOPs (arithmetic intensity TM·TN/(TM+TN): 64 against 85.3), so it
runs at that ratio of the large tile's rate. The catalog's matmul_efficiency is measured on
8192³ (ml-engineering's MAMF), so a shape's efficiency is relative to that one's.
"""
from __future__ import annotations

import numpy as np

from autotune.engine.config import ModelConfig

TILES = ((128, 256, 1.0), (128, 128, 0.75))  # (TM, TN, rate relative to the large tile)
SPLIT_K_MIN_DEPTH = 512  # split-K keeps at least this much of K per part
REFERENCE = 8192  # the catalog's matmul_efficiency is that of an 8192³ GEMM


def tile_overhead_k(out_bytes, tensor_flops_per_s, hbm_bytes_per_s):
    """A tile's fixed cost in steps of K (numbers or arrays). Its epilogue writes TM·TN outputs of
    out_bytes over the SM's share of HBM while one step of K is 2·TM·TN FLOPs at the SM's share of
    the tensor rate: out_bytes·F / (2·B) steps, the achieved rates (about 140 on an A100 in bf16, 260
    on an H100, whose tensor rate grew 3.2x over the A100's and its HBM 1.6x). Filling the pipeline (the first
    stage's operand loads) costs about as much again, and Hopper's persistent kernels overlap one
    tile's epilogue with the next one's main loop, so one write is counted."""
    return out_bytes * tensor_flops_per_s / (2 * hbm_bytes_per_s)


def _one_tile(m, n, k, sms: int, overhead_k, tm: int, tn: int, rate: float):
    tiles_m, tiles_n = np.ceil(m / tm), np.ceil(n / tn)
    tile = m * n / (tiles_m * tm * tiles_n * tn)
    tiles = tiles_m * tiles_n
    split = np.clip(np.floor(sms / tiles), 1, np.maximum(np.floor(k / SPLIT_K_MIN_DEPTH), 1))
    work = tiles * split
    wave = work / (np.ceil(work / sms) * sms)
    depth = (k / split) / (k / split + overhead_k)
    return rate * tile * wave * depth


def shape_efficiency(m, n, k, sms: int, overhead_k):
    """The fraction of the tensor cores' rate a GEMM of this shape reaches by its tiling alone
    (numbers or numpy arrays): the better of the two tiles."""
    m, n, k = (np.asarray(x, dtype=float) for x in (m, n, k))
    return np.maximum.reduce([_one_tile(m, n, k, sms, overhead_k, tm, tn, rate) for tm, tn, rate in TILES])


def relative_efficiency(m, n, k, sms: int, overhead_k):
    """A GEMM's shape efficiency over the 8192³ GEMM's: what multiplies the catalog's matmul_efficiency."""
    return shape_efficiency(m, n, k, sms, overhead_k) / shape_efficiency(REFERENCE, REFERENCE, REFERENCE, sms, overhead_k)


def block_gemms(model: ModelConfig, tp) -> list[tuple[float, float]]:
    """A dense block's linear layers as (input width K, output width N) on one tensor-parallel rank
    (column-parallel layers split N, row-parallel ones K). A MoE block's MLP is left out: its
    experts' shapes depend on the routing (callers keep its FLOPs at the large-GEMM rate)."""
    d, q, kv = model.d_model, model.n_heads * model.head_dim, model.kv_heads * model.head_dim
    layers = [(d, q / tp), (d, kv / tp), (d, kv / tp), (q / tp, d)]
    if model.n_experts == 0:
        f = model.d_ff
        layers += [(d, f / tp)] * (2 if model.family == "llama" else 1) + [(f / tp, d)]
    return layers


def matmul_efficiency(layers: list[tuple], tokens, sms: int, overhead_k) -> dict[str, np.ndarray]:
    """The FLOP-weighted (harmonic) relative efficiency of linear layers (K, N) over `tokens` rows,
    for the forward (x·W: M x K x N) and the backward (the input gradient M x N x K and the weight
    gradient K x M x N, reduced over the tokens), per plan; 1 without a GPU's SM count (sms=0:
    a measured CPU, whose rates are its own); overhead_k: `tile_overhead_k`, per plan."""
    tokens = np.asarray(tokens, dtype=float)
    if not sms:
        return {"fwd": np.ones_like(tokens), "bwd": np.ones_like(tokens)}
    flops = {"fwd": 0.0, "bwd": 0.0}
    time = {"fwd": 0.0, "bwd": 0.0}
    for k, n in layers:
        work = tokens * n * k
        flops["fwd"] = flops["fwd"] + work
        time["fwd"] = time["fwd"] + work / relative_efficiency(tokens, n, k, sms, overhead_k)
        flops["bwd"] = flops["bwd"] + 2 * work
        time["bwd"] = (time["bwd"] + work / relative_efficiency(tokens, k, n, sms, overhead_k)
                       + work / relative_efficiency(k, n, tokens, sms, overhead_k))
    return {phase: flops[phase] / time[phase] for phase in flops}
