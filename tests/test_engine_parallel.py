"""Every ZeRO stage and offload, run on 2 gloo ranks, trains exactly as one process does.

One 2-rank launch (tests/conftest.py's two_rank_run, shared with other modules) runs all the 2-rank
plans; the single-process references run in the test process. Same global batch, same data, same
init: the losses of 5 steps agree to 1e-5 relative and the final parameters agree.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from pathlib import Path

import pytest
import torch

from autotune.estimate import estimate
from autotune.hardware import catalog_gpu
from autotune.engine import dist
from autotune.engine.config import build_train_config, with_changes
from autotune.engine.parallel import apply_activation_checkpointing, apply_compile, local_tensor
from autotune.engine.model import build_model
from autotune.engine.train import Engine, reduce_loss
from autotune.profile.measure import allocation_peak
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch._dynamo.utils import counters
from torch.nn.parallel import DistributedDataParallel as DDP

STEPS = 5
TINY = dict(name="tiny", family="llama", n_layers=4, d_model=64, n_heads=4, n_kv_heads=2, d_ff=160,
            vocab_size=256, max_seq_len=128)
JOB = dict(seq_len=32, global_batch=8, steps=STEPS, optimizer=dict(warmup_steps=2))

# name -> plan overrides, all on dp=2
TWO_RANK_PLANS = {
    "zero0": dict(zero_stage=0, micro_batch=4),
    "zero1": dict(zero_stage=1, micro_batch=4),
    "zero1_offload": dict(zero_stage=1, micro_batch=4, offload_optimizer=True),
    "zero2": dict(zero_stage=2, micro_batch=4),
    "zero3": dict(zero_stage=3, micro_batch=4),
    "zero2_offload": dict(zero_stage=2, micro_batch=4, offload_optimizer=True),
    "zero3_offload": dict(zero_stage=3, micro_batch=4, offload_optimizer=True, offload_params=True),
    "zero0_accum": dict(zero_stage=0, micro_batch=2),  # DDP no_sync on the first micro-step
    "zero1_accum": dict(zero_stage=1, micro_batch=2),  # FSDP2 sync and reshard off on the first micro-step
    "zero3_accum": dict(zero_stage=3, micro_batch=2),  # FSDP2 reduce-scatters every micro-step
}
UNITS = TINY["n_layers"] + 1  # FSDP2 units: one per block and the root


def config(plan: dict, model: dict = TINY, job: dict = JOB):
    return build_train_config({"model": model, "job": job, "plan": plan})


def run_plan(plan: dict, seen: dict | None = None, job: dict = JOB) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses of STEPS steps and the final full parameters (on rank 0), in the current process group.
    `seen` is filled with what this rank communicated and holds: DDP's bucket all-reduces (one
    entry each), FSDP2's all-gathers and reduce-scatters (counts), its AdamW exp_avg numel."""
    engine = Engine(config(plan, job=job), dist.device_for_rank())
    seen = {} if seen is None else seen
    seen.update(syncs=[], all_gather_single=0, reduce_scatter_single=0)
    if isinstance(engine.model, DDP):
        group = engine.mesh["dp"].get_group()
        engine.model.register_comm_hook(
            group, lambda g, bucket: seen["syncs"].append(bucket.index()) or allreduce_hook(g, bucket))
    with counting(seen, ("all_gather_single", "reduce_scatter_single")):
        losses = [reduce_loss(engine.step(step).loss)[0] for step in range(STEPS)]
    seen["exp_avg_numel"] = sum(local_tensor(s["exp_avg"]).numel() for s in engine.optimizer.state.values())
    full = get_model_state_dict(engine.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return losses, {k: v.clone() for k, v in full.items()}


@contextlib.contextmanager
def counting(counts: dict, names: tuple[str, ...]):
    """Counts into counts[name] the calls of each torch.distributed function named (FSDP2 calls
    them through the module at each collective)."""
    originals = {name: getattr(torch.distributed, name) for name in names}

    def counted(name):
        def call(*args, **kwargs):
            counts[name] += 1
            return originals[name](*args, **kwargs)
        return call

    for name in names:
        setattr(torch.distributed, name, counted(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.distributed, name, original)


@pytest.fixture
def one_process_group():
    dist.init_distributed()
    yield
    dist.shutdown()


@functools.cache
def whole_batch(precision: str = "fp32") -> tuple[list[float], dict[str, torch.Tensor]]:
    """run_plan of the whole batch in one micro-batch on one process, the reference of several
    tests: trained once per session (the caller holds a process group; nobody modifies the result)."""
    return run_plan(dict(micro_batch=8, precision=precision))


def assert_same_run(got, ref, what: str) -> None:
    (losses, params), (ref_losses, ref_params) = got, ref
    for step, (a, b) in enumerate(zip(losses, ref_losses)):
        assert abs(a - b) <= 1e-5 * abs(b), f"{what}: step {step} loss {a} != {b}"
    assert params.keys() == ref_params.keys()
    for name in ref_params:
        torch.testing.assert_close(params[name], ref_params[name], rtol=1e-5, atol=1e-6, msg=f"{what}: {name}")


def two_rank_spec(root: Path) -> dict:
    """What test_two_rank_zero_stages_match_one_process runs on 2 ranks (tests/tp_pp_worker.py's SPEC)."""
    return {"calls": {__name__: f"{__name__}:on_two_ranks"}}


@pytest.mark.slow
def test_two_rank_zero_stages_match_one_process(two_rank_run, one_process_group):
    results = two_rank_run["out"][__name__]
    reference = whole_batch()
    for name in TWO_RANK_PLANS:
        assert_same_run(results[name], reference, name)
    fp8_losses, bf16_losses = results["fp8"][0], run_plan(dict(micro_batch=4, precision="bf16"), job=FP8_JOB)[0]
    assert fp8_losses != bf16_losses and fp8_losses == pytest.approx(bf16_losses, rel=0.02)
    # DDP all-reduces once per step, not once per micro-step: accumulating over 2 micro-steps adds none
    seen = results["seen"]
    assert seen["zero0"]["syncs"] and seen["zero0_accum"]["syncs"] == seen["zero0"]["syncs"]
    # ZeRO-1 gathers and reduce-scatters each unit once per step over 2 micro-steps (ZeRO-3: a
    # reduce-scatter per micro-step), and each rank holds half of every AdamW state
    assert seen["zero1_accum"]["all_gather_single"] == seen["zero1_accum"]["reduce_scatter_single"] == STEPS * UNITS
    assert seen["zero3_accum"]["reduce_scatter_single"] == 2 * STEPS * UNITS
    numel = sum(p.numel() for p in reference[1].values())
    assert seen["zero1"]["exp_avg_numel"] == seen["zero1_accum"]["exp_avg_numel"] == numel // 2
    assert seen["zero0"]["exp_avg_numel"] == numel
    # the whole per-rank peak as the estimate has it: DDP's gradient buckets live through backward
    hw = dataclasses.replace(catalog_gpu("h100-sxm"), gpus_per_node=2)
    for name, plan in TRACKED_PLANS.items():
        estimated = estimate(config(dict(plan, dp=2)), hw).allocated_bytes
        assert estimated == pytest.approx(results["peaks"][name], rel=0.05), name


def test_gradient_accumulation_matches_one_micro_batch(one_process_group):
    reference = whole_batch()
    assert_same_run(run_plan(dict(micro_batch=4)), reference, "micro 4 x accum 2")
    assert_same_run(run_plan(dict(micro_batch=2)), reference, "micro 2 x accum 4")


@pytest.mark.parametrize("mode, k", [("full", 2), ("selective", 2), ("op", 1), ("op", 2), ("attention", 2)])
def test_activation_checkpointing_changes_no_loss_or_gradient(mode, k):
    cfg = config(dict(activation_checkpointing=mode, checkpoint_every_k=k))
    tokens = torch.randint(cfg.model.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    models = [build_model(cfg.model, seed=1) for _ in range(2)]
    apply_activation_checkpointing(models[1], cfg.plan)
    losses = []
    for model in models:
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == losses[1]
    grads = [dict((n, p.grad) for n, p in m.named_parameters()) for m in models]
    assert grads[0].keys() == grads[1].keys()  # parameter names unchanged by checkpointing
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-6, atol=1e-8, msg=name)


def inductor_cannot_run() -> str:
    """Why torch.compile's CPU backend (inductor) cannot run here, or "" if it can (a C++ compiler)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        get_cpp_compiler()
    except Exception as e:  # noqa: BLE001 - whatever stops inductor is the reason to report
        return f"inductor cannot compile here: {e}"
    return ""


INDUCTOR_MISSING = inductor_cannot_run()


@pytest.mark.skipif(bool(INDUCTOR_MISSING), reason=INDUCTOR_MISSING)
@pytest.mark.parametrize("mode", ["op", "attention"])
def test_checkpointing_under_compile_changes_no_loss_or_gradient(mode):
    """op (torch's selective-checkpoint policy) and attention (a checkpointed attention core) inside
    compiled blocks, as apply_plan orders them: losses and gradients of two steps as the eager model
    without checkpointing, within compile's reordering of float sums; compiled whole, no graph break."""
    cfg = config(dict(activation_checkpointing=mode, checkpoint_every_k=2, compile=True), model=dict(TINY, n_layers=2))
    reference, compiled = (build_model(cfg.model, seed=1) for _ in range(2))
    apply_activation_checkpointing(compiled, cfg.plan)
    torch._dynamo.reset()
    counters.clear()
    apply_compile(compiled, cfg.plan)
    for step in range(2):
        tokens = torch.randint(cfg.model.vocab_size, (2, 33), generator=torch.Generator().manual_seed(step))
        losses = []
        for model in (reference, compiled):
            model.zero_grad()
            loss = model(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-5), f"step {step}"
        for (name, p), (_, q) in zip(reference.named_parameters(), compiled.named_parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=f"step {step}: {name}")
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.skipif(bool(INDUCTOR_MISSING), reason=INDUCTOR_MISSING)
def test_a_compiled_loss_trains_as_the_eager_one_and_keeps_no_fp32_logits():
    """plan.compile_loss: the model's loss and gradients as with torch's eager loss; and on 16-bit
    logits the compiled loss keeps nothing of their size but them (eager: fp32 log-probabilities,
    4 bytes a logit) and its backward makes their 16-bit gradient alone (eager: two fp32 tensors,
    8 bytes a logit): the estimate's 2 + 2 bytes a logit against 4 + 8 (test_estimate.py measures
    the eager loss inside the model)."""
    cfg = config(dict(compile=True, precision="bf16"), model=dict(TINY, n_layers=1, vocab_size=4096))
    reference, compiled = (build_model(cfg.model, seed=1) for _ in range(2))
    torch._dynamo.reset()
    apply_compile(compiled, with_changes(cfg, plan={"compile_loss": True}).plan)
    tokens = torch.randint(cfg.model.vocab_size, (2, 65), generator=torch.Generator().manual_seed(0))
    losses = []
    for model in (reference, compiled):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)
    for (name, p), (_, q) in zip(reference.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=2e-2, atol=1e-4, msg=name)

    targets = tokens[:, 1:]
    logits = torch.randn(2, 64, cfg.model.vocab_size, dtype=torch.bfloat16, requires_grad=True)
    for loss_fn, kept, made in ((reference.loss_fn, 4, 8), (compiled.loss_fn, 0, 2)):
        held = {}
        _, after_forward = allocation_peak(lambda: held.update(loss=loss_fn(logits, targets)))
        backward, _ = allocation_peak(held["loss"].backward)
        assert after_forward == pytest.approx(kept * logits.numel(), abs=0.02 * logits.numel())
        assert backward == pytest.approx(made * logits.numel(), rel=0.02)


def test_activation_checkpointing_trains_the_same(one_process_group):
    reference = whole_batch()
    assert_same_run(run_plan(dict(micro_batch=8, activation_checkpointing="full")), reference, "full")


def test_bf16_on_cpu_trains(one_process_group):
    losses, _ = whole_batch("bf16")
    ref, _ = whole_batch()
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses != ref  # the compute really ran in bf16
    assert abs(losses[-1] - ref[-1]) < 0.05 * ref[-1]


@pytest.mark.parametrize("zero_stage, loss_scale", [(0, "dynamic"), (2, "dynamic"), (1, "1024")])
def test_fp16_with_loss_scaling_trains(one_process_group, zero_stage, loss_scale):
    plan = dict(micro_batch=8, precision="fp16", zero_stage=zero_stage, loss_scale=loss_scale)
    engine = Engine(config(plan), dist.device_for_rank())
    losses = [reduce_loss(engine.step(step).loss)[0] for step in range(STEPS)]
    ref, _ = whole_batch()
    assert losses != ref  # the compute really ran in fp16
    assert losses == pytest.approx(ref, rel=1e-3)  # and no step was skipped for an overflow
    assert engine.scaler.get_scale() == (2.0**16 if loss_scale == "dynamic" else 1024.0)


# DDP plans whose whole peak is checked against the estimate (one micro-batch per step: MemTracker
# follows one forward and backward). Without its buckets the estimate was 13-14% low.
TRACKED_PLANS = {
    "zero0_fp32": dict(zero_stage=0, micro_batch=4),
    "zero0_bf16": dict(zero_stage=0, micro_batch=4, precision="bf16"),
}


def tracked_peak(plan: dict) -> int:
    """The most any rank allocates in one training step (the second: DDP builds its buckets in the
    first), as torch's MemTracker follows it."""
    from torch.distributed._tools.mem_tracker import MemTracker

    engine = Engine(config(plan), dist.device_for_rank())
    engine.step(0)
    tracker = MemTracker()
    tracker.track_external(engine.model, engine.optimizer)
    with tracker:
        engine.step(1)
    peak = torch.tensor(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"], dtype=torch.int64)
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    return int(peak)


# float8 linears under ZeRO-3 with float8 all-gather (autotune/engine/float8.py): not bitwise (each
# rank scales its own half batch), within float8's error of the one-process bf16 run. Few tokens:
# torch._scaled_mm on the CPU is a plain loop (tests/test_float8.py)
FP8_JOB = dict(JOB, seq_len=16, global_batch=4)
FP8_PLAN = dict(zero_stage=3, micro_batch=2, precision="bf16", fp8="tensorwise")


def on_two_ranks() -> dict:
    """Run on 2 ranks (tests/tp_pp_worker.py's call): every plan of TWO_RANK_PLANS, the tracked
    peaks and the float8 run."""
    seen = {name: {} for name in TWO_RANK_PLANS}
    results = {name: run_plan(dict(plan, dp=2), seen[name]) for name, plan in TWO_RANK_PLANS.items()}
    results["seen"] = seen
    results["peaks"] = {name: tracked_peak(dict(plan, dp=2)) for name, plan in TRACKED_PLANS.items()}
    results["fp8"] = run_plan(dict(FP8_PLAN, dp=2), job=FP8_JOB)
    return results


def test_rotary_tables_stay_fp32_under_fsdp_mixed_precision(one_process_group):
    """FSDP2 casts a module's floating inputs to the compute dtype; the rotary tables must escape it."""
    engine = Engine(config(dict(zero_stage=3, precision="bf16", micro_batch=8)), dist.device_for_rank())
    seen = []
    block = next(iter(engine.model.layers.values()))
    block.attn.register_forward_pre_hook(lambda mod, args: seen.append((args[0].dtype, args[1][0].dtype)))
    engine.step(0)
    assert seen and all(x == torch.bfloat16 and rope == torch.float32 for x, rope in seen)
