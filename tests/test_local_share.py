"""What of a plan this machine runs when the cluster is larger (autotune.local_share), in-process."""
import dataclasses

import pytest
import torch

from autotune.config import ClusterConfig, SearchConfig, planner_config
from autotune.estimate import estimate, rank_layout
from autotune.hardware import catalog_gpu
from autotune.local_share import (
    AS_IS, NODE_SHARE, RANK_SHARE, SHARE_MEMORY_FRACTION, capacity, check_local_gpu, gpu_kind, share_here, tp_rank_model,
)
from autotune.engine.config import ConfigError, build_train_config
from autotune.engine.model import count_params


def train(model: str, gb: int = 32, seq: int = 2048, **plan):
    cfg = planner_config([f"model={model}"]).train
    return build_train_config({"model": dataclasses.asdict(cfg.model), "job": {"global_batch": gb, "seq_len": seq},
                               "plan": plan})


H100 = dataclasses.replace(catalog_gpu("h100-sxm"), gpus_per_node=4)


def test_a_plan_that_fits_here_runs_as_is():
    t = train("llama-3.2-1b", dp=2, tp=2, zero_stage=1)
    share = share_here(t, cap=4, gpus_per_node=8, hw_here=H100)
    assert share.kind == AS_IS and share.train is t


def test_a_plan_whose_tp_x_pp_fits_runs_the_replicas_that_fit():
    t = train("llama-3.2-1b", dp=4, tp=2, micro_batch=2, zero_stage=3)
    share = share_here(t, cap=4, gpus_per_node=8, hw_here=H100)
    ran = share.train
    assert share.kind == NODE_SHARE
    assert (ran.plan.dp, ran.plan.tp, ran.plan.micro_batch, ran.plan.grad_accum) == (2, 2, 2, t.plan.grad_accum)
    assert ran.job.global_batch == 2 * 2 * t.plan.grad_accum and ran.model == t.model


def test_an_expert_parallel_plan_keeps_the_experts_split_over_the_ranks_that_run():
    """A node share keeps ep where it divides the replicas that run, else the largest divisor of
    both; a rank's share holds every expert (ep = 1)."""
    for ep, cap, ran_ep in ((2, 4, 2), (4, 2, 2), (4, 6, 2)):
        t = train("tiny-moe", gb=16, seq=64, dp=8, ep=ep, micro_batch=2)
        share = share_here(t, cap=cap, gpus_per_node=8, hw_here=H100)
        assert share.kind == NODE_SHARE and (share.train.plan.dp, share.train.plan.ep) == (cap, ran_ep)
        assert f"ep={ran_ep} of {ep}" in share.note
    t = train("tiny-moe", gb=16, seq=64, dp=2, pp=2, ep=2, micro_batch=2)
    share = share_here(t, cap=1, gpus_per_node=8, hw_here=dataclasses.replace(H100, gpus_per_node=1))
    assert share.kind == RANK_SHARE and share.train.plan.ep == 1 and share.train.model.n_experts == 4


@pytest.mark.parametrize("name, tp", [("llama-3-8b", 8), ("qwen2.5-0.5b", 2), ("gpt2", 4)])
def test_tp_rank_model_holds_what_a_tp_rank_holds(name, tp):
    """The rank's model has the parameters the engine's tp layout leaves on one rank (the
    estimator's rank_layout, itself checked against the engine), and its heads keep their width."""
    model = planner_config([f"model={name}"]).train.model
    rank = tp_rank_model(model, tp)
    assert rank.head_dim == model.head_dim and rank.n_heads == model.n_heads // tp
    assert rank.kv_heads == model.kv_heads // tp and rank.d_ff == model.d_ff // tp
    assert count_params(rank) == rank_layout(model, 1, tp, 1, 1)["first"]["local"]


def test_a_plan_larger_than_here_runs_one_ranks_share_on_one_device():
    t = train("llama-3-8b", dp=1, tp=4, pp=2, micro_batch=1, zero_stage=1, sequence_parallel=True,
              pp_schedule="interleaved_1f1b", pp_virtual_stages=2, kernels="triton", precision="bf16")
    share = share_here(t, cap=1, gpus_per_node=8, hw_here=dataclasses.replace(H100, gpus_per_node=1))
    ran = share.train
    assert share.kind == RANK_SHARE
    assert (ran.plan.dp, ran.plan.tp, ran.plan.pp, ran.plan.sequence_parallel) == (1, 1, 1, False)
    assert (ran.plan.micro_batch, ran.plan.grad_accum, ran.plan.zero_stage, ran.plan.kernels, ran.plan.precision) == \
        (1, t.plan.grad_accum, 1, "triton", "bf16")
    assert ran.model.n_layers == 16 and ran.model.n_heads == 8 and ran.model.head_dim == 128
    assert ran.job.data.source == "synthetic" and ran.model.init_from is None
    assert "all 16 layer(s) of one of 2 pipeline stages" in share.note and "/ 4" in share.note


def test_a_rank_share_that_does_not_fit_keeps_fewer_layers():
    """70B on tp=8: one rank's unsharded states (ZeRO over dp=4 does not happen on one device) do
    not fit in 80 GB, so the share keeps as many layers as fit; the estimator models the rest."""
    t = train("llama-3-70b", dp=4, tp=8, zero_stage=3, precision="bf16", activation_checkpointing="full")
    hw = dataclasses.replace(H100, gpus_per_node=1)
    share = share_here(t, cap=1, gpus_per_node=8, hw_here=hw)
    layers = share.train.model.n_layers
    assert share.kind == RANK_SHARE and 1 <= layers < 80
    assert estimate(share.train, hw).memory["total_bytes"] <= SHARE_MEMORY_FRACTION * hw.memory_bytes
    one_more = build_train_config({"model": {**dataclasses.asdict(share.train.model), "n_layers": layers + 1},
                                   "job": dataclasses.asdict(share.train.job),
                                   "plan": {**dataclasses.asdict(share.train.plan), "grad_accum": None}})
    assert estimate(one_more, hw).memory["total_bytes"] > SHARE_MEMORY_FRACTION * hw.memory_bytes  # as many as fit
    assert f"{layers} of the 80 layers of the model" in share.note


@pytest.mark.parametrize("name, kind", [
    ("H100-SXM5-80GB", "H100"), ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H100 PCIe", "H100"),
    ("NVIDIA GeForce RTX 4090", "4090"), ("RTX-4090", "4090"), ("NVIDIA L40S", "L40S"), ("NVIDIA L4", "L4"),
    ("Tesla V100-SXM2-32GB", "V100"), ("A100-SXM4-40GB", "A100"), ("NVIDIA H200", "H200"),
])
def test_gpu_kind(name, kind):
    assert gpu_kind(name) == kind


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only refusal")
def test_a_catalog_cluster_is_not_measured_without_its_gpu():
    with pytest.raises(ConfigError, match="no CUDA GPU; use search.mode=analytic"):
        check_local_gpu(ClusterConfig(name="8xh100", gpu="h100-sxm", gpus_per_node=8), H100)


def test_capacity():
    node = ClusterConfig(gpus_per_node=4, nodes=2)
    assert capacity(node, SearchConfig(local_devices=1)) == 1
    if not torch.cuda.is_available():  # a CPU runs a gloo rank per GPU of a node unless told otherwise
        assert capacity(node, SearchConfig()) == 4
        assert capacity(node, SearchConfig(local_devices=16)) == 4
    with pytest.raises(ConfigError, match="search.local_devices=0 must be at least 1"):
        capacity(node, SearchConfig(local_devices=0))
