"""autotune.plans: the enumeration is exactly the plans that validate_plan and the search space's
rules accept; a plan converts to a frame row and back."""
import random

import numpy as np
import pandas as pd
import pytest

from autotune.config import ClusterConfig, SearchConfig, planner_config
from autotune.plans import (
    MAX_VIRTUAL_STAGES,
    SELECTIVE_EVERY_K,
    dominated_by,
    enumerate_plans,
    canonical,
    outside_search_space,
    plan_from_row,
    plan_key,
    plan_keys,
    plan_label,
    plans_frame,
)
from autotune.search.loop import kendall_tau
from autotune.engine.config import ConfigError, PlanConfig


def _train(model: str, global_batch: int, seq_len: int = 64):
    longer = [f"model.max_seq_len={seq_len}"] if seq_len > 8192 else []  # the long-context stage's sequences
    return planner_config([f"model={model}", f"job.global_batch={global_batch}", f"job.seq_len={seq_len}", *longer]).train


@pytest.mark.parametrize("model,gb,cluster,seq_len", [
    ("tiny", 8, ClusterConfig(gpus_per_node=2), 64),
    ("gpt2", 16, ClusterConfig(gpus_per_node=4), 64),  # tied head: no pipeline
    ("llama-3-8b", 64, ClusterConfig(gpu="h100-sxm", gpus_per_node=8), 64),
    ("llama-3-8b", 8, ClusterConfig(gpu="h100-sxm", gpus_per_node=8), 16384),  # long: cp a dimension
    ("llama-3-70b", 96, ClusterConfig(gpu="h100-sxm", gpus_per_node=8, nodes=2), 64),
    ("tiny-moe", 16, ClusterConfig(gpus_per_node=8), 64),  # ep a dimension, tp none
])
def test_enumeration_is_exactly_the_valid_plans(model, gb, cluster, seq_len):
    train = _train(model, gb, seq_len)
    plans = enumerate_plans(train, cluster, SearchConfig())
    keys = set(plan_keys(plans))
    assert len(keys) == len(plans)  # no duplicates
    rng = random.Random(0)
    # every enumerated plan passes the engine's own validation (a sample of the large spaces)
    rows = plans.to_dict("records")
    for row in rng.sample(rows, min(len(rows), 500)):
        assert outside_search_space(plan_from_row(row), train, cluster, SearchConfig()) == "", row
    # random plans from the raw choices: enumerated exactly when the engine accepts them
    divs = [d for d in range(1, cluster.n_gpus + 1) if cluster.n_gpus % d == 0]
    seen_valid = seen_invalid = 0
    for _ in range(2500):
        tp, pp = rng.choice(divs), rng.choice(divs)
        cp = rng.choice([1, 1, 2, 4]) if seq_len > 64 else 1  # short sequences: cp is never searched
        if train.model.n_experts and rng.random() < 0.7:  # tp > 1 never holds experts: valid plans are rarer
            tp = 1
        sched = rng.choice(["1f1b", "gpipe", "interleaved_1f1b"])
        ac = rng.choice(["none", "full", "selective"])
        plan = dict(
            zero_stage=rng.randint(0, 3), offload_optimizer=rng.random() < 0.3, offload_params=rng.random() < 0.2,
            micro_batch=rng.choice([1, 2, 3, 4, 8, 16]), grad_accum=None,
            precision=rng.choice(["fp32", "bf16", "fp16"]), loss_scale="dynamic", activation_checkpointing=ac,
            checkpoint_every_k=rng.choice(SELECTIVE_EVERY_K) if ac == "selective" else 2,
            dp=max(1, cluster.n_gpus // (tp * pp * cp)), cp=cp, tp=tp, pp=pp, pp_schedule=sched,
            pp_virtual_stages=rng.randint(2, MAX_VIRTUAL_STAGES) if sched == "interleaved_1f1b" else 1,
            sequence_parallel=rng.random() < 0.3, ep=rng.choice([1, 1, 2, 4, 8]), kernels="torch", compile=False,
            dp_replicate=rng.choice([1, 1, 2, 4]) if cluster.nodes > 1 else 1,  # hybrid sharding: across nodes
        )
        plan = PlanConfig(**plan)
        valid = outside_search_space(plan, train, cluster, SearchConfig()) == ""
        if valid:
            plan.grad_accum = gb // (plan.micro_batch * plan.dp)
        assert (plan_key(plan) in keys) == valid, plan
        seen_valid += valid
        seen_invalid += not valid
    assert seen_valid > 50 and seen_invalid > 50


def test_device_limits_precisions_and_kernels():
    train = _train("tiny", 8)
    cpu = enumerate_plans(train, ClusterConfig(), SearchConfig(), device="cpu", precisions=["fp32", "bf16"])
    assert set(cpu.precision) == {"fp32", "bf16"} and set(cpu.kernels) == {"torch"}
    gpu = enumerate_plans(train, ClusterConfig(), SearchConfig(precisions=["bf16", "fp16"]), device="cuda")
    assert set(gpu.precision) == {"bf16", "fp16"} and set(gpu.kernels) == {"torch", "triton"}
    with pytest.raises(ConfigError, match="none runs on this device"):
        enumerate_plans(train, ClusterConfig(), SearchConfig(precisions=["fp16"]), device="cpu", precisions=["fp32"])


def test_cudnn_attention_is_searched_where_the_gpu_has_it():
    """On an H100 every 16-bit plan without context parallelism comes again with cuDNN's attention;
    an A100 (no cuDNN figure in its catalog entry) and a CPU search SDPA's own kernel only."""
    from autotune.hardware import attention_kernels, catalog_gpu

    assert attention_kernels(catalog_gpu("a100-80g")) == ["sdpa"]
    kernels = attention_kernels(catalog_gpu("h100-sxm"))
    assert kernels == ["sdpa", "cudnn"]
    train, cluster = _train("llama-3-8b", 8, 16384), ClusterConfig(gpu="h100-sxm", gpus_per_node=8)
    plans = enumerate_plans(train, cluster, SearchConfig(), attention=kernels)
    sdpa, cudnn = plans[plans.attention == "sdpa"], plans[plans.attention == "cudnn"]
    assert len(cudnn) == ((sdpa.precision != "fp32") & (sdpa.cp == 1)).sum() > 0
    for row in random.Random(0).sample(cudnn.to_dict("records"), 50):
        assert outside_search_space(plan_from_row(row), train, cluster, SearchConfig(), attention=kernels) == ""
    ring = plan_from_row(sdpa[(sdpa.cp == 2) & (sdpa.precision == "bf16")].iloc[0].to_dict() | {"attention": "cudnn"})
    assert "cuDNN attention under cp" in outside_search_space(ring, train, cluster, SearchConfig(), attention=kernels)
    assert "attention kernel not on this device" in outside_search_space(
        plan_from_row(cudnn.iloc[0].to_dict()), train, cluster, SearchConfig())


def test_v100_has_no_bf16():
    from autotune.hardware import catalog_gpu
    from autotune.hardware import supported_precisions

    assert "bf16" not in supported_precisions(catalog_gpu("v100-32g"))
    assert "bf16" in supported_precisions(catalog_gpu("h100-sxm"))


def test_global_batch_no_layout_divides():
    train = _train("tiny", 7)  # 3 GPUs: tp and pp cannot take them (4 heads, 4 layers), dp=3 does not divide 7
    with pytest.raises(ConfigError, match="global batch"):
        enumerate_plans(train, ClusterConfig(gpus_per_node=3), SearchConfig())


def test_cost_objective_also_tries_fewer_gpus():
    train = _train("llama-3-8b", 64)
    plans = enumerate_plans(train, ClusterConfig(gpus_per_node=8, nodes=2), SearchConfig(objective="cost"))
    worlds = set(plans.dp * plans.tp * plans.pp)
    assert worlds == {1, 2, 4, 8, 16}


def test_large_space_keys_are_unique_and_agree_with_plan_key():
    train = _train("llama-3-70b", 512, 4096)
    plans = enumerate_plans(train, ClusterConfig(gpus_per_node=8, nodes=4), SearchConfig())
    keys = plan_keys(plans)
    assert len(plans) > 10**4 and keys.is_unique
    for i in (0, len(plans) // 3, len(plans) - 1):
        assert keys.iloc[i] == plan_key(plan_from_row(plans.iloc[i]))


def test_a_plan_is_a_frame_row_and_back():
    train = _train("llama-3-8b", 64)
    plans = enumerate_plans(train, ClusterConfig(gpu="h100-sxm", gpus_per_node=8), SearchConfig())
    some = [plan_from_row(plans.iloc[i]) for i in (0, 7, len(plans) // 2, len(plans) - 1)]
    again = plans_frame(some)
    assert [plan_from_row(again.iloc[i]) for i in range(len(some))] == some
    assert list(plan_keys(again)) == [plan_key(p) for p in some]
    assert some[0].precision == "fp32" and type(some[0].precision).__name__ == "Precision"  # typed, reads as text
    # the sampler's proposal of a field that means nothing names the same plan
    pipelined = next(p for p in map(plan_from_row, plans.to_dict("records")) if p.pp == 1)
    assert canonical(PlanConfig(**{**vars(pipelined), "pp_schedule": "gpipe"})) == pipelined


def test_plan_label():
    plan = PlanConfig(zero_stage=3, offload_optimizer=True, precision="bf16", micro_batch=2,
                      activation_checkpointing="selective", checkpoint_every_k=3, dp=2, tp=2, sequence_parallel=True,
                      pp=2, pp_schedule="interleaved_1f1b", pp_virtual_stages=2, kernels="triton")
    assert plan_label(plan) == "Z3+oo bf16 mb2 ckpt:sel3 dp2 tp2+sp pp2 interleaved_1f1b/v2 triton"
    assert plan_label(PlanConfig()) == "Z0 fp32 mb1 ckpt:none dp1"
    assert plan_label(PlanConfig(precision="bf16", attention="cudnn")) == "Z0 bf16 mb1 ckpt:none dp1 cudnn attention"
    assert plan_label(PlanConfig(dp=8, ep=4, zero_stage=2)) == "Z2 fp32 mb1 ckpt:none dp8 ep4"
    assert plan_label(PlanConfig(dp=32, dp_replicate=4, zero_stage=3)) == "Z3 fp32 mb1 ckpt:none dp32 hsdp4x8"
    assert plan_label(PlanConfig(dp=2, precision="bf16", reduce_dtype="bf16")) == "Z0 bf16 mb1 ckpt:none dp2+reduce:bf16"


def test_the_search_reduces_gradients_in_fp32_whatever_the_user_set():
    """bf16 reduction changes the numerics: the search never tries it, and there is no user-fixed plan field."""
    train = planner_config(["model=tiny", "job.global_batch=8", "plan.precision=bf16", "plan.reduce_dtype=bf16"]).train
    assert train.plan.reduce_dtype == "bf16"
    plans = enumerate_plans(train, ClusterConfig(gpus_per_node=2), SearchConfig())
    assert set(plans["reduce_dtype"]) == {"fp32"} and "bf16" in set(plans["precision"])
    bf16_reduce = PlanConfig(**{**plan_from_row(plans[plans["precision"] == "bf16"].iloc[0]).__dict__, "reduce_dtype": "bf16"})
    why = outside_search_space(bf16_reduce, train, ClusterConfig(gpus_per_node=2), SearchConfig())
    assert why == "a setting the search leaves to the user"


def test_context_parallelism_is_searched_for_long_sequences_only():
    """cp > 1 where each rank keeps at least MIN_CP_TOKENS of a sequence, never with pp; the engine accepts each."""
    cluster = ClusterConfig(gpu="h100-sxm", gpus_per_node=8)
    assert set(enumerate_plans(_train("llama-3-8b", 8, 2048), cluster, SearchConfig())["cp"]) == {1}
    plans = enumerate_plans(_train("llama-3-8b", 8, 16384), cluster, SearchConfig())
    assert set(plans["cp"]) == {1, 2, 4, 8} and (plans.loc[plans["cp"] > 1, "pp"] == 1).all()
    assert (plans["dp"] * plans["cp"] * plans["tp"] * plans["pp"] == 8).all()
    assert plan_label(PlanConfig(dp=2, cp=4, zero_stage=3)) == "Z3 fp32 mb1 ckpt:none dp2 cp4"


def test_hybrid_sharding_is_searched_across_nodes_only():
    """dp_replicate > 1 only on more than one node, only with ZeRO 1-3, each replica whole nodes."""
    train = _train("llama-3-8b", 64)
    one_node = enumerate_plans(train, ClusterConfig(gpu="h100-sxm", gpus_per_node=8), SearchConfig())
    assert set(one_node["dp_replicate"]) == {1}
    plans = enumerate_plans(train, ClusterConfig(gpu="h100-sxm", gpus_per_node=8, nodes=4), SearchConfig())
    hybrid = plans[plans["dp_replicate"] > 1]
    assert set(hybrid["zero_stage"]) == {1, 2, 3}
    assert ((hybrid["dp"] // hybrid["dp_replicate"] * hybrid["tp"]) % 8 == 0).all()
    assert set(hybrid.loc[(hybrid["dp"] == 32), "dp_replicate"]) == {2, 4}


def test_dominated_by_matches_brute_force():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"tokens_per_s": rng.integers(1, 30, 300).astype(float),
                       "mem_total_bytes": rng.integers(1, 30, 300).astype(float)}, index=range(1000, 1300))
    by = dominated_by(df, margin=0.1)
    tps, mem = df.tokens_per_s.to_numpy(), df.mem_total_bytes.to_numpy()
    want = [bool(np.any((mem <= mem[i]) & (tps >= 1.1 * tps[i]))) for i in range(len(df))]
    assert (by >= 0).tolist() == want
    assert 0 < sum(want) < len(want)
    # the plan named (an index label, not a position) is one that dominates: no more memory, 10% faster
    for i, j in by[by >= 0].items():
        assert df.at[j, "mem_total_bytes"] <= df.at[i, "mem_total_bytes"]
        assert df.at[j, "tokens_per_s"] >= 1.1 * df.at[i, "tokens_per_s"]


def test_kendall_tau():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # tau-b with ties (the example of scipy.stats.kendalltau's documentation)
    assert kendall_tau([12, 2, 1, 12, 2], [1, 4, 7, 1, 0]) == pytest.approx(-0.47140452079103173)
    assert kendall_tau([1.0], [2.0]) is None


def test_bench_search_imports_and_helps():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_search.py"
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--budgets" in done.stdout
