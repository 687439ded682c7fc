"""Context parallelism (plan.cp) in the cost model: each formula of docs/formulas.md [Context
parallelism] against what it must do, and the search choosing cp where it wins."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from omegaconf import OmegaConf

from autotune.config import CONF_DIR, ClusterConfig, SearchConfig
from autotune.engine.config import build_train_config
from autotune.estimate import estimate, estimate_frame
from autotune.estimate.arrays import PlanArrays
from autotune.estimate.collectives import send_time
from autotune.estimate.context import kv_bytes, ring_traffic, unrepeated_kv_bytes
from autotune.hardware import catalog_gpu
from autotune.plans import enumerate_plans, plans_frame

H100 = dataclasses.replace(catalog_gpu("h100-sxm"), gpus_per_node=8)
LLAMA_8B = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "llama-3-8b.yaml"))


def llama_8b(seq_len: int, global_batch: int = 8, **plan):
    plan = dict(dict(zero_stage=3, precision="bf16", activation_checkpointing="full"), **plan)
    return build_train_config({"model": dict(LLAMA_8B, max_seq_len=max(seq_len, 8192)),
                               "job": dict(seq_len=seq_len, global_batch=global_batch), "plan": plan})


def test_a_cp_rank_holds_the_activations_of_its_share_of_the_sequence():
    """cp=2 at S: the activations (and logits) of one rank are those of S/2 without cp, but for the
    block being recomputed, whose ring keeps k and v unrepeated over the kv heads' groups; ZeRO's
    states are sharded over dp x cp ranks, as a plan with that many data-parallel ranks."""
    cfg = llama_8b(32768, dp=4, cp=2, kernels="triton")  # the fused loss: the recomputed block outweighs it
    with_cp = estimate(cfg, H100)
    half = estimate(llama_8b(16384, dp=4, kernels="triton"), H100)
    unrepeated = float(unrepeated_kv_bytes(cfg.model, 16384, PlanArrays.of(plans_frame([cfg.plan]), cfg.job))[0])
    assert unrepeated == 2 * 16384 * (32 - 8) * 128 * 2  # k and v of the 24 query heads without a kv head, bf16
    assert with_cp.memory["activations_bytes"] == pytest.approx(half.memory["activations_bytes"] - unrepeated, rel=1e-9)
    assert with_cp.memory["logits_bytes"] == pytest.approx(half.memory["logits_bytes"], rel=1e-9)
    wide = estimate(llama_8b(32768, dp=8, kernels="triton"), H100)
    for part in ("params_bytes", "master_bytes", "optimizer_bytes"):
        assert with_cp.memory[part] == wide.memory[part], part
    assert with_cp.memory["activations_bytes"] < 0.6 * wide.memory["activations_bytes"]


def test_a_cp_rank_computes_its_share_of_the_whole_sequences_attention():
    """Causal attention over S split evenly: a rank's share is 1/cp of it, twice that of a rank with
    a whole sequence of S/cp (its queries see twice as many keys); the matmuls are those of S/cp."""
    with_cp = estimate(llama_8b(32768, dp=4, cp=2), H100)
    half = estimate(llama_8b(16384, dp=4), H100)
    assert with_cp.compute["attention_s"] == pytest.approx(2 * half.compute["attention_s"], rel=1e-9)
    assert with_cp.compute["matmul_s"] == pytest.approx(half.compute["matmul_s"], rel=1e-9)


def test_the_kv_ring_is_exposed_only_where_its_sends_outlast_the_attention():
    """Long sequence, one node: every forward and backward send hides behind 1/cp of the layer's
    attention; only the last gradients' hop home is exposed. Across nodes (tp=8 fills one) at a
    short sequence the sends outlast the attention and the surplus shows."""
    cfg = llama_8b(65536, dp=4, cp=2)
    arrays = PlanArrays.of(plans_frame([cfg.plan]), cfg.job)
    grads = send_time(kv_bytes(cfg.model, 32768, arrays, 4.0), False, H100)
    layers, micro_batches = cfg.model.n_layers, cfg.job.global_batch // 4
    assert estimate(cfg, H100).time["cp_comm_s"] == pytest.approx(micro_batches * layers * float(grads[0]), rel=1e-9)
    hw = dataclasses.replace(H100, nodes=2, inter_node_bytes_per_s=25e9)  # a 200 Gb/s port a GPU
    short = estimate(llama_8b(2048, global_batch=2, dp=1, cp=2, tp=8), hw)
    cfg = llama_8b(2048, global_batch=2, dp=1, cp=2, tp=8)
    arrays = PlanArrays.of(plans_frame([cfg.plan]), cfg.job)
    grads = float(send_time(kv_bytes(cfg.model, 1024, arrays, 4.0), True, hw)[0])
    assert short.time["cp_comm_s"] > 2 * layers * grads  # more than the hops home


def test_the_rings_merges_run_on_the_compute_stream_and_are_recomputed_with_its_attention():
    """cp=4 at 131,072 against 32,768 tokens a rank without cp (the same per-token work and ZeRO
    group): the memory-bound time differs by the ring's own ops, its forward twice under full
    checkpointing; they grow with the ring's steps."""
    cfg = llama_8b(131072, global_batch=2, dp=2, cp=4)
    ring = ring_traffic(cfg.model, 32768, PlanArrays.of(plans_frame([cfg.plan]), cfg.job))
    hbm = H100.hbm_bytes_per_s * H100.memory_efficiency
    extra = estimate(cfg, H100).compute["memory_s"] - estimate(llama_8b(32768, dp=8), H100).compute["memory_s"]
    assert extra == pytest.approx(cfg.model.n_layers * float(2 * ring["fwd"][0] + ring["bwd"][0]) / hbm, rel=1e-6)
    eight = llama_8b(262144, global_batch=1, dp=1, cp=8)
    more = ring_traffic(eight.model, 32768, PlanArrays.of(plans_frame([eight.plan]), eight.job))
    assert 1.8 < float(more["fwd"][0] / ring["fwd"][0]) < 2.0  # 1 + 0.75 (cp - 1) steps' worth of queries


def test_world_counts_cp_and_mfu_counts_every_rank():
    cfg = llama_8b(32768, dp=2, cp=4)
    assert cfg.plan.world_size == 8
    est = estimate(cfg, H100)
    assert est.tokens_per_s == pytest.approx(8 * 32768 / est.step_time_s)
    assert 0 < est.mfu < 1


def test_the_search_chooses_cp_where_a_sequence_does_not_fit_one_rank():
    """Llama 3 8B at 131,072 tokens on 8 of torchtitan's 96 GB H100s, bf16, full checkpointing:
    without cp only plans with tp >= 4 fit (one sequence's activations and logits split no other
    way), and the fastest plan that fits splits the sequence (torchtitan ran this job with cp=4,
    dp=2; the estimate has cp=4, dp=2 within 0.3% of cp=2 x tp=2, both ahead of the best cp=1 plan,
    tp=4, by 0.4-0.7%)."""
    train = llama_8b(131072, global_batch=8)
    plans = enumerate_plans(train, ClusterConfig(gpu="h100-sxm-96g-500w", gpus_per_node=8), SearchConfig(precisions=["bf16"]))
    plans = plans[(plans["activation_checkpointing"] == "full") & (plans["micro_batch"] == 1) & (plans["kernels"] == "torch")]
    frame = estimate_frame(train.model, train.job, plans, dataclasses.replace(catalog_gpu("h100-sxm-96g-500w"), gpus_per_node=8))
    fits = frame[frame["fits"]]
    assert (fits.loc[fits["cp"] == 1, "tp"] >= 4).all()
    best = fits.loc[fits["tokens_per_s"].idxmax()]
    assert best["cp"] > 1
    torchtitans = fits.loc[(fits["cp"] == 4) & (fits["dp"] == 2), "tokens_per_s"].max()
    assert torchtitans > 0.995 * best["tokens_per_s"]
    assert torchtitans > fits.loc[fits["cp"] == 1, "tokens_per_s"].max()


def test_a_frame_of_mixed_cp_keeps_its_order_and_matches_one_by_one():
    cfgs = [llama_8b(32768, dp=4, cp=2), llama_8b(32768, dp=8), llama_8b(32768, dp=2, cp=4), llama_8b(32768, dp=8, zero_stage=2)]
    frame = estimate_frame(cfgs[0].model, cfgs[0].job, plans_frame([c.plan for c in cfgs]), H100)
    assert list(frame["cp"]) == [2, 1, 4, 1]
    singles = [estimate(c, H100).step_time_s for c in cfgs]
    assert np.allclose(frame["step_time_s"].to_numpy(), singles, rtol=1e-12)
