"""Async tensor parallelism (plan.async_tp) in the cost model: docs/formulas.md [Async tensor
parallelism] against what it must do."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from omegaconf import OmegaConf

from autotune.config import CONF_DIR
from autotune.engine.config import build_train_config
from autotune.estimate import estimate
from autotune.estimate.arrays import PlanArrays
from autotune.estimate.collectives import collective_time
from autotune.estimate.communication import async_tp_block
from autotune.estimate.step_time import gemm_tile_overhead
from autotune.hardware import catalog_gpu
from autotune.plans import plan_label, plans_frame
from autotune.profile import block_matmuls

H100 = dataclasses.replace(catalog_gpu("h100-sxm"), gpus_per_node=8)
LLAMA_8B = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "llama-3-8b.yaml"))
SEQ = 8192


def llama_8b(**plan):
    plan = dict(dict(zero_stage=1, precision="bf16", tp=8, sequence_parallel=True, micro_batch=1), **plan)
    return build_train_config({"model": LLAMA_8B, "job": dict(seq_len=SEQ, global_batch=8), "plan": plan})


def block(cfg, hw, block_matmul: float) -> dict[str, float]:
    arrays = PlanArrays.of(plans_frame([cfg.plan]), cfg.job)
    overhead_k = gemm_tile_overhead(arrays, hw)
    out = async_tp_block(cfg.model, SEQ, arrays, hw, 1.0, np.array([block_matmul]), 0.1, overhead_k)
    return {k: float(v[0]) for k, v in out.items()}


def test_each_collective_hides_behind_all_but_one_chunk_of_its_matmuls():
    """exposed = sum over the 4 collectives of max(0, C - M_g (tp-1)/tp), by hand: nothing with long
    matmuls, all 4 C with none, and between them the collectives whose matmuls are too short."""
    cfg = llama_8b()
    one = float(collective_time("all_gather", SEQ * 4096 * 2, 8, 8, H100, 1.0))
    assert block(cfg, H100, 1.0)["exposed"] == 0
    assert block(cfg, H100, 0.0)["exposed"] == pytest.approx(4 * one, rel=1e-12)
    flops = dict(block_matmuls(cfg.model))
    shares = [sum(flops[n] for n in g) / sum(flops.values()) for g in (("wq", "wk", "wv"), ("wo",),
                                                                       ("w_gate", "w_up"), ("w_down",))]
    matmul = one / min(shares)  # wo's matmuls take C: all but their last chunk hide 7/8 of it
    by_hand = sum(max(0.0, one - matmul * s * 7 / 8) for s in shares)
    assert block(cfg, H100, matmul)["exposed"] == pytest.approx(by_hand, rel=1e-12)
    assert by_hand == pytest.approx(one / 8, rel=1e-12)  # wo's C / 8; the larger groups cover theirs


def test_the_overlap_costs_the_rings_sms_and_the_chunked_gemms():
    """cost = overlap_slowdown x hidden time + the matmuls' loss at s / tp rows: on a device without
    an SM count (the GEMMs' rates its own) only the first; on the H100 more (wave quantization)."""
    cfg = llama_8b()
    no_sms = dataclasses.replace(H100, sms=0)
    one = float(collective_time("all_gather", SEQ * 4096 * 2, 8, 8, H100, 1.0))
    assert block(cfg, no_sms, 1.0)["cost"] == pytest.approx(0.1 * 4 * one, rel=1e-12)
    assert block(cfg, H100, 1.0)["cost"] > block(cfg, no_sms, 1.0)["cost"]


def test_async_tp_moves_the_step_time_not_the_memory():
    """Async tp exposes less tp communication than the plain collectives, pays its overlap cost, and
    holds the same memory; with links too slow for any matmul to cover, it hides (tp-1)/tp of the
    blocks' dense matmul time per pass and no more."""
    plain, pipelined = estimate(llama_8b(), H100), estimate(llama_8b(async_tp=True), H100)
    assert pipelined.time["tp_comm_s"] < 0.5 * plain.time["tp_comm_s"]
    assert pipelined.time["overlap_s"] > plain.time["overlap_s"]
    assert pipelined.step_time_s < plain.step_time_s
    assert pipelined.memory == plain.memory
    slow = dataclasses.replace(H100, intra_node_bytes_per_s=H100.intra_node_bytes_per_s / 1000)
    plain, pipelined = estimate(llama_8b(), slow), estimate(llama_8b(async_tp=True), slow)
    passes = 2 * 32 * 8  # forward and backward of 32 blocks, 8 micro-batches
    hidden = plain.time["tp_comm_s"] - pipelined.time["tp_comm_s"]
    block_matmuls_s = pipelined.time["forward_s"]  # all but the head's matmul, attention and memory-bound ops
    assert 0 < hidden / passes < block_matmuls_s / 8 / 32 * 7 / 8


def test_async_tp_plans_are_labelled():
    assert "tp8+sp+async" in plan_label(llama_8b(async_tp=True).plan)
