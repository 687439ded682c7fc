"""The cost model's first-principles terms, each against what its physics says it must do
(docs/formulas.md: [Matmul shapes], [Attention], [Communication], [Peak memory])."""
import dataclasses

import numpy as np
import pytest

from autotune.config import ClusterConfig, planner_config
from autotune.engine.config import with_changes
from autotune.estimate import estimate, estimate_frame, plan_frame, rank_layout
from autotune.estimate.arrays import PlanArrays
from autotune.estimate.calibration import Calibration
from autotune.estimate.attention import relative_attention_efficiency
from autotune.estimate.collectives import NETWORK_HOP_S, bus_bandwidth, collective_time, nvlink_hop_s
from autotune.estimate.gemm import relative_efficiency, tile_overhead_k
from autotune.estimate.routing import expert_routing
from autotune.estimate.traffic import micro_batch_traffic
from autotune.hardware import catalog_gpu, load_hardware

A100, H100 = catalog_gpu("a100-80g"), catalog_gpu("h100-sxm")


def config(model="llama-3-8b", seq_len=4096, global_batch=16, cluster="8xh100", **plan):
    cfg = planner_config([f"model={model}", f"cluster={cluster}", f"job.seq_len={seq_len}",
                          f"job.global_batch={global_batch}", "plan.precision=bf16"]
                         + [f"plan.{k}={v}" for k, v in plan.items()])
    return cfg.train, load_hardware(cfg.cluster)


# --- GEMM efficiency by shape --------------------------------------------------------------------

def tile_cost(hw) -> float:
    """A bf16 GEMM tile's fixed cost in steps of K on a catalog GPU."""
    return tile_overhead_k(2, hw.peak_flops["bf16"] * hw.matmul_efficiency, hw.hbm_bytes_per_s * hw.memory_efficiency)


def test_the_catalogs_reference_gemm_runs_at_the_catalog_efficiency():
    for hw in (A100, H100):
        assert relative_efficiency(8192, 8192, 8192, hw.sms, tile_cost(hw)) == pytest.approx(1.0)
        assert relative_efficiency(16384, 4096, 4096, hw.sms, tile_cost(hw)) > 0.95  # large GEMMs lose little


def test_a_tiles_fixed_cost_is_its_outputs_write_in_steps_of_the_main_loop():
    # bf16 out over the SM's share of HBM, against 2·TM·TN FLOPs a step of K at its share of the rate
    assert tile_cost(A100) == pytest.approx(312e12 * 0.827 / (2039e9 * 0.9), rel=1e-3)  # ~141
    assert tile_cost(H100) == pytest.approx(989e12 * 0.80 / (3350e9 * 0.9), rel=1e-3)  # ~262
    # so a shallow GEMM loses more on an H100, whose tensor cores outgrew its HBM
    shallow = {hw.gpu: relative_efficiency(8192, 8192, 2048, hw.sms, tile_cost(hw)) for hw in (A100, H100)}
    assert shallow[H100.gpu] < shallow[A100.gpu] < 0.97


def test_a_power_cap_slows_the_power_limited_gemms_more_than_attention():
    # the 500 W part's GEMMs run at the clock the power above idle allows (linear), its attention
    # kernels, which draw less, at the cube-root rule; peaks, HBM and SMs are the SXM part's
    sxm, capped = catalog_gpu("h100-sxm"), catalog_gpu("h100-sxm-96g-500w")
    gemm, attention = (500 - 88) / (700 - 88), (500 / 700) ** (1 / 3)
    assert capped.matmul_efficiency == pytest.approx(sxm.matmul_efficiency * gemm, rel=2e-3)
    assert capped.fp8_matmul_efficiency == pytest.approx(sxm.fp8_matmul_efficiency * gemm, rel=2e-3)
    assert capped.attention_efficiency == pytest.approx(sxm.attention_efficiency * attention, rel=3e-3)
    assert capped.cudnn_attention_efficiency == pytest.approx(sxm.cudnn_attention_efficiency * attention, rel=3e-3)
    assert (capped.peak_flops, capped.sms) == (sxm.peak_flops, sxm.sms)


def test_wave_quantization_one_tile_past_a_full_wave_costs_most_of_a_wave():
    """108 tiles of 128 x 256 fill an A100's 108 SMs once; 109 need a second wave (or half tiles)."""
    full = relative_efficiency(128 * 12, 256 * 9, 8192, 108, tile_cost(A100))
    one_more = relative_efficiency(128 * 12 + 1, 256 * 9, 8192, 108, tile_cost(A100))
    assert one_more < 0.85 * full


def test_tile_quantization_a_dimension_just_past_a_tile_loses():
    k = tile_cost(H100)
    assert relative_efficiency(8192, 4096 + 8, 8192, 132, k) < relative_efficiency(8192, 4096, 8192, 132, k)


def test_skinny_and_small_gemms_lose():
    k = tile_cost(H100)
    big = relative_efficiency(8192, 8192, 8192, 132, k)
    assert relative_efficiency(8192, 8192, 256, 132, k) < 0.75 * big  # shallow K: the tile's fixed costs dominate
    assert relative_efficiency(512, 512, 512, 132, k) < 0.2 * big  # a few tiles on 132 SMs
    assert relative_efficiency(16384, 64, 8192, 132, k) < 0.6 * big  # one tile column wide


def test_tensor_parallel_gemms_are_skinnier_and_slower_per_flop():
    """The same model's block matmuls split 8 ways take more than 1/8 of the time (a 1B model's widths)."""
    one, hw = config(model="llama-3.2-1b", seq_len=1024, global_batch=8, dp=8, cluster="8xh100")
    eight = with_changes(one, plan={"dp": 1, "tp": 8})
    per_rank = lambda cfg, n: estimate(cfg, hw).compute["matmul_s"] / (cfg.job.global_batch / cfg.plan.dp)  # noqa: E731
    assert per_rank(eight, 8) > 1.1 * per_rank(one, 1) / 8


# --- attention ------------------------------------------------------------------------------------

def test_attention_rate_grows_with_sequence_and_head_width():
    for hw in (A100, H100):
        rate = lambda s, d: relative_attention_efficiency(64, s, d, hw.sms, hw.tensor_flops_per_clock)  # noqa: E731
        assert rate(512, 128) < rate(2048, 128) < rate(8192, 128) < rate(32768, 128)
        assert rate(4096, 64) < rate(4096, 128) < rate(4096, 256)
        assert relative_attention_efficiency(32, 4096, 128, hw.sms, hw.tensor_flops_per_clock) == pytest.approx(1.0)


# FlashAttention-2 on H100 SXM5, head dim 128, TFLOP/s (FlashAttention-3 paper, arXiv 2407.08608, its speed charts; its
# inputs hold 16k tokens: batch 16k/s, 16 heads): forward causal, forward non-causal, backward (non-causal)
FA2_H100 = {4096: (319, 368, 310), 8192: (333, 370, 318), 16384: (335, 370, 322)}
# PyTorch's SDPA (its build of FlashAttention-2) on H100, forward non-causal, head dim 128, TFLOP/s
# (pytorch/benchmark PR #2296: batch 128, 8 heads)
SDPA_H100 = {4096: 298.4, 8192: 287.7, 16384: 304.2}


def test_h100_attention_runs_at_pytorchs_flash_attention_2_rates():
    """SDPA forward + backward (2.5x the forward's FLOPs) at the catalog's rate by sequence length,
    against the paper's FlashAttention-2 (causal forward, and the backward at the forward's causal
    share of its non-causal rate: the paper shows no causal backward) at the rate PyTorch's build
    measured against the paper's forward."""
    for s, (causal, full, backward) in FA2_H100.items():
        published = 3.5 / (1 / causal + 2.5 / (backward * causal / full)) * SDPA_H100[s] / full
        rate = relative_attention_efficiency(16 * 16384 // s, s, 128, H100.sms, H100.tensor_flops_per_clock)
        modelled = H100.peak_flops["bf16"] * H100.attention_efficiency * rate / 1e12
        assert modelled == pytest.approx(published, rel=0.07), s  # seen: -0%, +0.7%, -6.1% (16k)


# cuDNN's fused attention on H100 SXM5, head dim 128, TFLOP/s (the same paper's charts): forward causal,
# forward non-causal, backward (non-causal)
# (at 1k, 410, 574, 408: the model's FlashAttention-2 shape puts cuDNN 29% above them there, where
# cuDNN's causal forward keeps only 0.71 of its non-causal rate against 0.85 from 4k up)
CUDNN_H100 = {4096: (518, 609, 499), 8192: (529, 600, 518), 16384: (539, 595, 516)}


def test_h100_cudnn_attention_runs_at_the_papers_cudnn_rates():
    """plan.attention=cudnn at the catalog's cuDNN figure and SDPA's relative shape, against the paper's
    cuDNN (forward + 2.5x backward, the backward at the forward's causal share) from 4k to 16k."""
    for s, (causal, full, backward) in CUDNN_H100.items():
        published = 3.5 / (1 / causal + 2.5 / (backward * causal / full))
        rate = relative_attention_efficiency(16 * 16384 // s, s, 128, H100.sms, H100.tensor_flops_per_clock)
        modelled = H100.peak_flops["bf16"] * H100.cudnn_attention_efficiency * rate / 1e12
        assert modelled == pytest.approx(published, rel=0.07), s  # seen: -0.1%, -4.5%, -5.9% (16k)


def test_cudnn_plans_spend_less_attention_time_on_hopper_only():
    """The cost model prices plan.attention=cudnn at its own figure where the catalog has one (the
    H100's), and at SDPA's where it has none (the A100's)."""
    for cluster, faster in (("8xh100", True), ("8xa100-80g", False)):
        sdpa, hw = config(cluster=cluster, dp=8, micro_batch=2, zero_stage=3)
        cudnn = with_changes(sdpa, plan={"attention": "cudnn"})
        ratio = estimate(cudnn, hw).compute["attention_s"] / estimate(sdpa, hw).compute["attention_s"]
        expected = H100.attention_efficiency / H100.cudnn_attention_efficiency if faster else 1.0
        assert ratio == pytest.approx(expected), cluster


def test_hopper_loses_more_to_softmax_at_narrow_heads():
    """The SFU's exponentials weigh twice as much against H100's tensor cores as against A100's."""
    loss = {hw.gpu: relative_attention_efficiency(64, 8192, 64, hw.sms, hw.tensor_flops_per_clock)
            / relative_attention_efficiency(64, 8192, 128, hw.sms, hw.tensor_flops_per_clock) for hw in (A100, H100)}
    assert loss[H100.gpu] < loss[A100.gpu] < 1


def test_narrow_heads_cost_more_attention_time_for_the_same_flops():
    wide, hw = config(dp=8, micro_batch=2, zero_stage=3)
    narrow = dataclasses.replace(wide, model=dataclasses.replace(wide.model, n_heads=64, n_kv_heads=16))
    assert estimate(narrow, hw).compute["attention_s"] > 1.1 * estimate(wide, hw).compute["attention_s"]


# --- collectives -----------------------------------------------------------------------------------

def test_a_small_collective_costs_a_latency_that_grows_with_its_ring():
    hw = dataclasses.replace(H100, gpus_per_node=8)
    tiny = 8.0
    for n in (16, 64, 256):  # one rank per node: every step crosses the network
        assert collective_time("all_gather", tiny, n, 1, hw) == pytest.approx((n - 1) * NETWORK_HOP_S, rel=0.01)
    inside = collective_time("all_gather", tiny, 8, 8, hw)
    assert inside == pytest.approx(7 * nvlink_hop_s(hw), rel=0.01) and inside < NETWORK_HOP_S * 7


def test_all_reduce_takes_the_tree_at_scale():
    """A small all-reduce over 64 nodes runs as a double binary tree: 2 log2(nodes) network hops,
    far fewer than the ring's 2(n-1) steps; large ones are bandwidth-bound either way."""
    hw = dataclasses.replace(H100, gpus_per_node=8)
    small = collective_time("all_reduce", 1024, 512, 8, hw)
    assert small < 2 * 511 * NETWORK_HOP_S / 10
    assert small == pytest.approx(2 * 6 * NETWORK_HOP_S + 2 * 3 * nvlink_hop_s(hw), rel=0.05)
    big = 8 * 2**30
    bandwidth = bus_bandwidth(hw, 512, 8)
    assert collective_time("all_reduce", big, 512, 8, hw) == pytest.approx(2 * 511 / 512 * big / bandwidth, rel=0.01)


def test_bus_bandwidth_across_nodes_is_the_ports_of_the_groups_ranks_per_node():
    hw = dataclasses.replace(H100, gpus_per_node=8)
    assert bus_bandwidth(hw, 8, 8) == hw.intra_node_bytes_per_s
    assert bus_bandwidth(hw, 64, 1) == pytest.approx(hw.inter_node_bytes_per_s)
    assert bus_bandwidth(hw, 64, 8) == pytest.approx(min(hw.intra_node_bytes_per_s, 8 * hw.inter_node_bytes_per_s))


# --- FSDP's communication that cannot hide -------------------------------------------------------

def _fsdp_on(network_bytes_per_s: float):
    cfg, hw = config(dp=16, micro_batch=1, global_batch=16, zero_stage=3, cluster="4x8xh100")
    hw = dataclasses.replace(hw, nodes=2, inter_node_bytes_per_s=network_bytes_per_s)
    return estimate(cfg, hw).time


def test_a_pipelines_reduce_scatter_hides_behind_the_last_backward_alone():
    """Under pp a stage reduce-scatters once per step, during the last micro-batch's backward (the
    others skip the sync): a block's reduce-scatter that outlasts that one block backward shows,
    however many micro-batches ran before (Megatron's overlapped distributed optimizer alike)."""
    cfg, hw = config(dp=8, pp=2, micro_batch=1, global_batch=64, zero_stage=2, cluster="4x8xh100")  # 8 micro-batches
    hw = dataclasses.replace(hw, gpus_per_node=4, nodes=4, inter_node_bytes_per_s=5e9)  # dp spans 2 nodes
    time = estimate(cfg, hw).time
    held = rank_layout(cfg.model, dp=8, tp=1, pp=2, v=1)["first"]
    scatter = collective_time("reduce_scatter", 4 * (held["local"] - held["root"]) / held["layers"], 8, 4, hw)
    block_backward = time["backward_s"] / 8 / held["layers"]
    assert scatter > 2 * block_backward
    assert time["dp_comm_s"] > held["layers"] * (scatter - block_backward)


def test_fsdp_exposes_the_first_gather_and_last_reduce_scatter_when_compute_hides_the_rest():
    """One micro-batch on a fast network: exposed are the first block's gather, the last block's
    reduce-scatter and the root's (embedding and head: gathered once, never resharded)."""
    cfg, _ = config(dp=16, micro_batch=1, global_batch=16, zero_stage=3, cluster="4x8xh100")
    held = rank_layout(cfg.model, dp=16, tp=1, pp=1, v=1)["first"]
    hw = dataclasses.replace(H100, gpus_per_node=8, nodes=2, inter_node_bytes_per_s=1e12)
    unit = (held["local"] - held["root"]) / held["layers"]
    expected = (collective_time("all_gather", 2 * unit, 16, 8, hw) + collective_time("reduce_scatter", 4 * unit, 16, 8, hw)
                + collective_time("all_gather", 2 * held["root"], 16, 8, hw)
                + collective_time("reduce_scatter", 4 * held["root"], 16, 8, hw))
    assert _fsdp_on(1e12)["dp_comm_s"] == pytest.approx(float(expected), rel=1e-6)


def test_fsdp_exposes_the_layers_whose_communication_outlasts_their_compute():
    """On a slow network each unit's gather outlasts the previous unit's compute: the excess of every
    layer shows, so halving the bandwidth adds about the whole communication time again."""
    slow, slower = _fsdp_on(5e9), _fsdp_on(2.5e9)
    compute = slow["forward_s"] + slow["backward_s"]
    assert slow["dp_comm_s"] > 0.5 * compute
    # exposed = communication - what compute hides: doubling the communication adds all of it again
    assert slower["dp_comm_s"] - slow["dp_comm_s"] > 0.8 * slow["dp_comm_s"]


def test_zero2_under_a_pipeline_gathers_each_unit_once_per_step():
    """A pipeline stage reshards nothing after a backward until the last micro-batch's, and ZeRO-2
    never after a forward: its units are gathered once per step, however many micro-batches run.
    Without a pipeline every micro-batch's forward gathers them again."""
    def dp_comm(pp: int, global_batch: int) -> float:
        cfg, hw = config(dp=4, pp=pp, micro_batch=1, global_batch=global_batch, zero_stage=2)
        return float(estimate(cfg, hw).time["dp_comm_s"])

    assert dp_comm(2, 16) == pytest.approx(dp_comm(2, 32), rel=1e-9)  # 4 and 8 micro-batches
    assert dp_comm(1, 32) > 1.3 * dp_comm(1, 16)  # each micro-batch's gathers (the root's are once a step)


# --- the tp share of a block's weight traffic --------------------------------------------------

def test_a_tp_rank_moves_its_share_of_the_blocks_weights():
    """ZeRO-0 autocast re-casts the weights every micro-batch: at one token the block's traffic is
    nearly all weight traffic, and a rank of 8 moves 1/8 of it (norms, replicated, aside)."""
    cfg, _ = config(dp=1, micro_batch=1, seq_len=8, global_batch=1, zero_stage=0, cluster="8xh100")
    frame = plan_frame([cfg.plan, dataclasses.replace(cfg.plan, tp=8)])
    plans = PlanArrays.of(frame, cfg.job)
    routing = expert_routing(cfg.model, plans, cfg.job.seq_len, Calibration())
    traffic = micro_batch_traffic(cfg.model, plans, cfg.job.seq_len, routing)
    assert traffic["block_fwd"][1] == pytest.approx(traffic["block_fwd"][0] / 8, rel=0.05)


# --- peak memory: a recomputed block once, autocast's cached casts, reserved over allocated ---

def test_the_recomputed_block_is_counted_once_however_many_micro_batches_are_in_flight():
    """The first stage of a 1F1B pipeline holds p micro-batches of its blocks (every second one
    checkpointed) and, while backward recomputes, one whole block: once, not once per micro-batch
    in flight."""
    from autotune.estimate.activations import saved_bytes

    for pp in (2, 4):
        cfg, hw = config(seq_len=2048, global_batch=64, dp=1, pp=pp, micro_batch=1, activation_checkpointing="selective")
        frame = plan_frame([cfg.plan])
        row = estimate_frame(cfg.model, cfg.job, frame, hw).iloc[0]
        plans = PlanArrays.of(frame, cfg.job)
        saved = saved_bytes(cfg.model, plans, cfg.job.seq_len, expert_routing(cfg.model, plans, cfg.job.seq_len, Calibration()))
        layers = cfg.model.n_layers // pp
        checkpointed = -(-layers // 2)
        assert row["peak_stage"] == "first"
        per_micro_batch = saved.block[0] * (layers - checkpointed) + saved.checkpointed_block[0] * checkpointed
        assert row["mem_activations_bytes"] == pytest.approx(pp * per_micro_batch + saved.block[0]), pp


def _saved_weight_casts(separate_contexts: bool) -> set[int]:
    """The storages of the 16-bit weights two micro-batches' forwards save, under one autocast
    context for both (the pipeline schedule's step) or one each (the plain loop)."""
    import contextlib

    import torch

    linear, saved = torch.nn.Linear(8, 8, bias=False), set()  # the input needs a gradient: the weight is saved

    def pack(t):
        if t.dtype == torch.bfloat16 and t.shape == linear.weight.shape:
            saved.add(t.untyped_storage().data_ptr())
        return t

    step = contextlib.nullcontext() if separate_contexts else torch.autocast("cpu", dtype=torch.bfloat16)
    with step, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses = []
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                losses.append(linear(torch.randn(4, 8, requires_grad=True)).float().sum())
    sum(losses).backward()
    return saved


def test_autocast_caches_one_weight_cast_for_every_micro_batch_of_its_context():
    """torch's autocast caches an fp32 leaf parameter's cast until its outermost context exits: the
    micro-batches of one pipeline step share one 16-bit copy; separate contexts cast anew."""
    assert len(_saved_weight_casts(separate_contexts=False)) == 1
    assert len(_saved_weight_casts(separate_contexts=True)) == 2


def test_a_pipeline_stage_holds_one_cast_of_its_weights_whatever_is_in_flight():
    """ZeRO-0 under pp: every block's cast once (checkpointed too: the cache holds what the forward
    cast) plus the block being recomputed, the same for 4 (1F1B) and 16 (GPipe) micro-batches in flight."""
    from autotune.estimate.activations import saved_bytes

    cfg, hw = config(seq_len=2048, global_batch=16, dp=1, pp=4, micro_batch=1, zero_stage=0,
                     activation_checkpointing="selective")
    frame = plan_frame([cfg.plan, with_changes(cfg, plan={"pp_schedule": "gpipe"}).plan])
    rows = estimate_frame(cfg.model, cfg.job, frame, hw)
    plans = PlanArrays.of(frame, cfg.job)
    saved = saved_bytes(cfg.model, plans, cfg.job.seq_len, expert_routing(cfg.model, plans, cfg.job.seq_len, Calibration()))
    layers = cfg.model.n_layers // 4
    assert (rows["peak_stage"] == "first").all()
    assert rows["mem_param_copies_bytes"].iloc[0] == pytest.approx(saved.cast_weights[0] * (layers + 1))
    assert rows["mem_param_copies_bytes"].iloc[1] == pytest.approx(rows["mem_param_copies_bytes"].iloc[0])


def test_reserved_is_allocated_plus_the_allocators_rounding():
    cfg, hw = config(dp=8, micro_batch=1, zero_stage=3)
    row = estimate_frame(cfg.model, cfg.job, plan_frame([cfg.plan]), hw).iloc[0]
    stranded = 2 * cfg.job.seq_len * cfg.model.vocab_size  # the loss's 16-bit logits' block (below)
    assert row["fits"] and row["allocated_bytes"] < row["reserved_bytes"] - stranded < 1.05 * row["allocated_bytes"]
    deeper = estimate_frame(cfg.model, cfg.job, plan_frame([with_changes(cfg, plan={"micro_batch": 2}).plan]), hw).iloc[0]
    assert row["reserved_bytes"] - row["allocated_bytes"] > 0
    assert np.isfinite(deeper["reserved_bytes"])


def test_the_eager_16_bit_loss_leaves_its_logits_block_reserved():
    """At the eager loss's backward, the freed 16-bit logits' block is too small for the fp32
    gradients: it stays reserved beside them (b·s·V·β); fp32 logits (no copy to free) and the
    compiled loss (no fp32 tensors) leave none; never beyond the GPU. (Full checkpointing: the
    compiled blocks keep what the eager ones keep.)"""
    cfg, hw = config("llama-3.2-1b", global_batch=256, dp=8, micro_batch=1, zero_stage=3, activation_checkpointing="full")
    plans = [cfg.plan] + [with_changes(cfg, plan=p).plan for p in
                          ({"precision": "fp32"}, {"compile": True}, {"micro_batch": 32},
                           {"precision": "fp32", "compile": True})]
    rows = estimate_frame(cfg.model, cfg.job, plan_frame(plans), hw)
    above = rows["reserved_bytes"] - rows["allocated_bytes"]
    compiled = above.iloc[2]  # the rounding alone (the same live tensors but the logits')
    logits = cfg.job.seq_len * cfg.model.vocab_size
    assert rows["fits"].iloc[[0, 1, 2, 4]].all()
    assert above.iloc[0] == pytest.approx(compiled + 2 * logits, rel=0.01)
    assert above.iloc[1] == pytest.approx(above.iloc[4], rel=1e-6)
    assert not rows["fits"].iloc[3] and rows["reserved_bytes"].iloc[3] <= hw.memory_bytes - rows["mem_context_bytes"].iloc[3]


def test_network_unstated_is_the_catalog_servers_port():
    hw = load_hardware(ClusterConfig(name="x", gpu="a100-80g", gpus_per_node=8, nodes=4))
    assert hw.inter_node_bytes_per_s == pytest.approx(200 / 8 * 1e9 * 0.92)
