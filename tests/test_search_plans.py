"""autotune.plans: the enumeration agrees with engine.config.validate_plan, and is fast."""
import random
import time

import numpy as np
import pandas as pd
import pytest

from autotune.config import ClusterConfig, SearchConfig, planner_config
from autotune.plans import (
    MAX_VIRTUAL_STAGES,
    SELECTIVE_EVERY_K,
    dominated_by,
    enumerate_plans,
    plan_key,
    plan_keys,
    row_plan,
)
from autotune.search import kendall_tau
from autotune.engine.config import ConfigError, PlanConfig, validate_plan


def _train(model: str, global_batch: int, seq_len: int = 64):
    return planner_config([f"model={model}", f"job.global_batch={global_batch}", f"job.seq_len={seq_len}"]).train


def _passes(plan: dict, train) -> bool:
    try:
        validate_plan(PlanConfig(**{**plan, "grad_accum": None}), train.model, train.job)
        return True
    except ConfigError:
        return False


def _in_domain(plan: dict, train, cluster: ClusterConfig) -> bool:
    """The enumeration's own restrictions on top of validate_plan (see autotune/plans.py)."""
    m = train.model
    return (
        plan["dp"] * plan["tp"] * plan["pp"] == cluster.n_gpus
        and plan["tp"] <= cluster.gpus_per_node and cluster.gpus_per_node % plan["tp"] == 0
        and m.n_layers % plan["pp"] == 0
        and (plan["pp"] > 1 or plan["pp_schedule"] == "1f1b")
        and (plan["pp_schedule"] != "interleaved_1f1b" or m.n_layers % (plan["pp"] * plan["pp_virtual_stages"]) == 0)
        and (plan["activation_checkpointing"] == "selective" or plan["checkpoint_every_k"] == 2)
        and plan["checkpoint_every_k"] <= m.n_layers
    )


@pytest.mark.parametrize("model,gb,cluster", [
    ("tiny", 8, ClusterConfig(gpus_per_node=2)),
    ("gpt2", 16, ClusterConfig(gpus_per_node=4)),  # tied head: no pipeline
    ("llama-3-8b", 64, ClusterConfig(gpu="h100-sxm", gpus_per_node=8)),
    ("llama-3-70b", 96, ClusterConfig(gpu="h100-sxm", gpus_per_node=8, nodes=2)),
])
def test_enumeration_is_exactly_the_valid_plans(model, gb, cluster):
    train = _train(model, gb)
    plans = enumerate_plans(train, cluster, SearchConfig())
    keys = set(plan_keys(plans))
    assert len(keys) == len(plans)  # no duplicates
    rng = random.Random(0)
    # every enumerated plan passes the engine's own validation (a sample of the large spaces)
    rows = plans.to_dict("records")
    for row in rng.sample(rows, min(len(rows), 500)):
        assert _passes(row, train), row
        assert _in_domain(row, train, cluster), row
    # random plans from the raw choices: enumerated exactly when the engine accepts them
    divs = [d for d in range(1, cluster.n_gpus + 1) if cluster.n_gpus % d == 0]
    seen_valid = seen_invalid = 0
    for _ in range(1500):
        tp, pp = rng.choice(divs), rng.choice(divs)
        sched = rng.choice(["1f1b", "gpipe", "interleaved_1f1b"])
        ac = rng.choice(["none", "full", "selective"])
        plan = dict(
            zero_stage=rng.randint(0, 3), offload_optimizer=rng.random() < 0.3, offload_params=rng.random() < 0.2,
            micro_batch=rng.choice([1, 2, 3, 4, 8, 16]), grad_accum=None,
            precision=rng.choice(["fp32", "bf16", "fp16"]), loss_scale="dynamic", activation_checkpointing=ac,
            checkpoint_every_k=rng.choice(SELECTIVE_EVERY_K) if ac == "selective" else 2,
            dp=max(1, cluster.n_gpus // (tp * pp)), tp=tp, pp=pp, pp_schedule=sched,
            pp_virtual_stages=rng.randint(2, MAX_VIRTUAL_STAGES) if sched == "interleaved_1f1b" else 1,
            sequence_parallel=rng.random() < 0.3, ep=1, kernels="torch", compile=False,
        )
        valid = _passes(plan, train) and _in_domain(plan, train, cluster)
        if valid:
            plan["grad_accum"] = gb // (plan["micro_batch"] * plan["dp"])
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


def test_v100_has_no_bf16():
    from autotune.hardware import catalog_gpu
    from autotune.search import supported_precisions

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


def test_large_space_in_seconds():
    train = _train("llama-3-70b", 512, 4096)
    t0 = time.perf_counter()
    plans = enumerate_plans(train, ClusterConfig(gpus_per_node=8, nodes=4), SearchConfig())
    keys = plan_keys(plans)
    took = time.perf_counter() - t0
    assert len(plans) > 10**4 and keys.is_unique
    assert took < 5.0, took
    i = len(plans) // 3
    assert keys.iloc[i] == plan_key(row_plan(plans.iloc[i]))


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
