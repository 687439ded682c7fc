"""plan.reduce_dtype=bf16: data-parallel gradients reduced in bf16. The config refuses it without
16-bit compute; on 2 gloo ranks FSDP2 (ZeRO-3) and DDP (ZeRO-0) reduce in bf16 and train as the
fp32 reduction does within bf16's rounding; the cost model halves every gradient collective's
bytes; ds_config.json says it in DeepSpeed's key."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from autotune.emit import ds_config
from autotune.engine import dist
from autotune.engine import parallel, train
from autotune.engine.config import ConfigError, build_train_config
from autotune.engine.train import Engine, reduce_loss
from autotune.estimate import communication, estimate_frame
from autotune.estimate.arrays import PlanArrays
from autotune.estimate.communication import PassCompute, data_parallel, pipeline_transfers
from autotune.estimate.layout import stage_layouts
from autotune.hardware import catalog_gpu
from autotune.plans import plans_frame

STEPS = 3
TINY = dict(name="tiny", family="llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64,
            vocab_size=128, max_seq_len=32)
JOB = dict(seq_len=16, global_batch=8, steps=STEPS, optimizer=dict(warmup_steps=1))
# name -> plan on dp=2 in bf16 (2 micro-batches a step: ZeRO-3 reduces each, DDP the last)
ENGINE_PLANS = {"zero3": dict(zero_stage=3), "zero0": dict(zero_stage=0)}


def config(plan: dict, model: dict = TINY, job: dict = JOB):
    return build_train_config({"model": model, "job": job, "plan": plan})


# --- config ----------------------------------------------------------------------------------

def test_bf16_reduction_needs_16_bit_compute():
    with pytest.raises(ConfigError) as refused:
        config(dict(reduce_dtype="bf16"))
    assert str(refused.value) == ("plan.reduce_dtype=bf16 needs 16-bit compute: set plan.precision=bf16 (or fp16) "
                                  "or plan.reduce_dtype=fp32")
    assert config(dict(reduce_dtype="bf16", precision="bf16")).plan.reduce_dtype == "bf16"
    with pytest.raises(ConfigError, match="plan.reduce_dtype='fp16': use one of fp32, bf16"):
        config(dict(reduce_dtype="fp16", precision="fp16"))


# --- engine, 2 gloo ranks --------------------------------------------------------------------

def test_ddp_bf16_reduction_is_refused_without_cuda():
    plan = config(dict(dp=2, precision="bf16", reduce_dtype="bf16")).plan
    with pytest.raises(ConfigError, match=r"^plan.reduce_dtype=bf16 under DDP .* needs CUDA with NCCL; use "):
        parallel.check_supported(plan, cuda=False)
    parallel.check_supported(plan, cuda=True)
    parallel.check_supported(config(dict(dp=2, zero_stage=3, precision="bf16", reduce_dtype="bf16")).plan, cuda=False)


# the tensor each gradient reduction sends: FSDP2's reduce-scatter input, any all-reduce's tensor
REDUCED_TENSOR = {"reduce_scatter_single": lambda args, kwargs: kwargs["input"],
                  "all_reduce": lambda args, kwargs: args[0] if args else kwargs["tensor"]}


@contextlib.contextmanager
def reduced_dtypes(seen: set):
    """Notes (collective, dtype) of every gradient reduction made inside."""
    def noting(name, original):
        return lambda *args, **kwargs: seen.add((name, REDUCED_TENSOR[name](args, kwargs).dtype)) or original(*args, **kwargs)

    with contextlib.ExitStack() as patches:
        for name in REDUCED_TENSOR:
            patches.enter_context(mock.patch.object(torch.distributed, name, noting(name, getattr(torch.distributed, name))))
        yield


@contextlib.contextmanager
def bf16_hook_on_gloo():
    """DDP registers bf16_compress_hook only in a CUDA build with NCCL (and the engine refuses it
    elsewhere, in one line); gloo all-reduces bf16 just as well, so here both guards are lifted to
    run torch's own hook on the CPU."""
    on_cuda = functools.partial(parallel.check_supported, cuda=True)
    with contextlib.ExitStack() as patches:
        patches.enter_context(mock.patch.object(DDP, "_check_comm_hook", lambda self, hook: None))
        for module in (parallel, train):
            patches.enter_context(mock.patch.object(module, "check_supported", on_cuda))
        yield


def run_plan(plan: dict) -> dict:
    """Losses and gradient norms of STEPS steps, the reductions' dtypes and DDP's comm hooks."""
    with bf16_hook_on_gloo():
        engine = Engine(config(dict(plan, dp=2, micro_batch=2, precision="bf16")), dist.device_for_rank())
    seen: set = set()
    with reduced_dtypes(seen):
        results = [engine.step(step) for step in range(STEPS)]
    hooks = [hook for hook, _ in engine.model._comm_hooks] if isinstance(engine.model, DDP) else []
    return {"losses": [reduce_loss(r.loss)[0] for r in results], "grad_norms": [float(r.grad_norm) for r in results],
            "dtypes": sorted((name, str(dtype)) for name, dtype in seen), "ddp_hooks": [h.__name__ for h in hooks]}


def on_two_ranks() -> dict:
    """Run on 2 ranks (tests/tp_pp_worker.py's call): each plan of ENGINE_PLANS, reduced in fp32 and in bf16."""
    return {f"{name}/{reduce}": run_plan(dict(plan, reduce_dtype=reduce))
            for name, plan in ENGINE_PLANS.items() for reduce in ("fp32", "bf16")}


def two_rank_spec(root: Path) -> dict:
    return {"calls": {__name__: f"{__name__}:on_two_ranks"}}


@pytest.mark.parametrize("name", ENGINE_PLANS)
def test_bf16_reduction_trains_as_fp32_reduction(two_rank_run, name):
    runs = two_rank_run["out"][__name__]
    fp32, bf16 = runs[f"{name}/fp32"], runs[f"{name}/bf16"]
    assert bf16["losses"] == pytest.approx(fp32["losses"], rel=1e-3)
    assert bf16["grad_norms"] == pytest.approx(fp32["grad_norms"], rel=1e-2)
    if name == "zero3":  # FSDP2 reduce-scatters in its reduce dtype
        assert ("reduce_scatter_single", "torch.float32") in fp32["dtypes"]
        assert {d for op, d in bf16["dtypes"] if op == "reduce_scatter_single"} == {"torch.bfloat16"}
    else:  # DDP's buckets go out as bf16 copies through torch's own hook
        assert fp32["ddp_hooks"] == [] and bf16["ddp_hooks"] == [bf16_compress_hook.__name__]
        assert ("all_reduce", "torch.bfloat16") in bf16["dtypes"]
        assert ("all_reduce", "torch.bfloat16") not in fp32["dtypes"]


# --- cost model ------------------------------------------------------------------------------

LLAMA = dict(name="llama-ish", family="llama", n_layers=8, d_model=2048, n_heads=16, d_ff=5504,
             vocab_size=32000, max_seq_len=2048, tie_embeddings=True)
BIG_JOB = dict(seq_len=2048, global_batch=64)
HW = dataclasses.replace(catalog_gpu("h100-sxm"), gpus_per_node=8)


def frame(plans: list[dict]) -> tuple:
    cfgs = [config(dict(p, precision="bf16"), LLAMA, BIG_JOB) for p in plans]
    return cfgs[0], plans_frame([c.plan for c in cfgs])


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_bf16_reduction_exposes_less_data_parallel_time(zero_stage):
    """16 ranks on 2 nodes: the gradients cross the network, in half the bytes."""
    plans = [dict(zero_stage=zero_stage, dp=16, micro_batch=4, reduce_dtype=r) for r in ("fp32", "bf16")]
    cfg, plans = frame(plans)
    est = estimate_frame(cfg.model, cfg.job, plans, HW)
    fp32, bf16 = est["time_dp_comm_s"]
    assert 0 < bf16 < fp32
    assert est["step_time_s"].iloc[1] < est["step_time_s"].iloc[0]


def collective_bytes(plans, cfg, monkeypatch) -> list[tuple[str, np.ndarray]]:
    """(kind, bytes) of every collective `data_parallel` and `pipeline_transfers` time, in call order."""
    timed: list = []
    real_collective, real_send = communication.collective_time, communication.send_time
    arrays = PlanArrays.of(plans, cfg.job)
    per_plan = lambda nbytes: np.broadcast_to(np.asarray(nbytes, dtype=float), (arrays.rows,))  # noqa: E731
    monkeypatch.setattr(communication, "collective_time", lambda kind, nbytes, *a: timed.append(
        (kind, per_plan(nbytes))) or real_collective(kind, nbytes, *a))
    monkeypatch.setattr(communication, "send_time", lambda nbytes, *a: timed.append(
        ("send", per_plan(nbytes))) or real_send(nbytes, *a))
    held = stage_layouts(cfg.model, arrays)["first"]
    compute = PassCompute(*(np.full(arrays.rows, 1e-3) for _ in range(3)))
    data_parallel(arrays, held, HW, 0.8, compute, 0.0, HW.hbm_bytes_per_s)
    pipeline_transfers(cfg.model, cfg.job.seq_len, arrays, HW, 0.8)
    return timed


@pytest.mark.parametrize("plan", [dict(zero_stage=0, dp=8, pp=2), dict(zero_stage=3, dp=8, dp_replicate=2, pp=2)],
                         ids=["ddp", "hsdp"])
def test_gradient_collectives_move_half_the_bytes(plan, monkeypatch):
    """Each gradient collective (all-reduce, reduce-scatter, the tied embedding's send) times
    exactly half the bytes under bf16; the parameters' all-gathers and the activations' sends keep theirs."""
    cfg, plans = frame([dict(plan, micro_batch=4, reduce_dtype=r) for r in ("fp32", "bf16")])
    timed = collective_bytes(plans, cfg, monkeypatch)
    gradients = [nbytes for kind, nbytes in timed if kind in ("all_reduce", "reduce_scatter") and nbytes[0] > 0]
    gradients.append(timed[-1][1])  # pipeline_transfers' last send: the tied embedding's gradients
    assert len(gradients) > 2
    for nbytes in gradients:
        assert nbytes[1] == nbytes[0] / 2
    for kind, nbytes in timed[:-1]:
        if kind in ("all_gather", "send"):
            assert nbytes[1] == nbytes[0]


# --- ds_config -------------------------------------------------------------------------------

@pytest.mark.parametrize("reduce", ["fp32", "bf16"])
def test_ds_config_reduces_in_the_plans_dtype(reduce):
    ds = ds_config(config(dict(zero_stage=2, dp=2, micro_batch=2, precision="bf16", reduce_dtype=reduce)))
    assert ds["communication_data_type"] == reduce
