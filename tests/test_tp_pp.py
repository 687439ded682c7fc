"""Tensor and pipeline parallelism on 4 gloo ranks give the single-process loss trajectory.

One torchrun launch (with the other modules' 4-rank runs: tests/conftest.py's four_rank_run) trains every 4-rank plan (tp x dp with ZeRO 0/1/3 and sequence parallel, pp x dp
with ZeRO 0, 1 and 3, hybrid sharding (2 replicas x 2 shards, ZeRO 2 and 3), tp x pp, for each pipeline schedule, two with activation checkpointing; a gpt2
with tp and sequence parallel for biases, positions and the tied head; gpt2 with pp, its tied
embedding split between the first and the last stage; fp16 with pp, an overflow on one rank, resumed
after it; plan.kernels=triton under tp x pp) and checkpoints and resumes a tp x pp x
sequence-parallel run, a tp x dp ZeRO-1 offload run and a gpt2 pp x dp run; the probe (the search's
trial) measures a tp x pp plan; one plain process gives the references, and continues the
checkpoints. Refused plans are one `error:` line and exit status 2.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from autotune.cli import main as autotune_main
from autotune.config import ClusterConfig
from autotune.estimate import estimate, rank_layout
from autotune.hardware import load_hardware
from autotune.profile import predict_saved_bytes
from autotune.engine.config import ModelConfig, build_train_config
from autotune.engine.pipeline import stage_layers
from tp_pp_worker import launch as run_worker

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
TINY = dict(name="tiny", family="llama", n_layers=4, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64,
            vocab_size=128, max_seq_len=64)
# an odd vocabulary, as gpt2's 50257: tp's vocabulary shards and FSDP2's dp shards of them are uneven
TINY_GPT2 = dict(name="tiny-gpt2", family="gpt2", n_layers=2, d_model=32, n_heads=4, d_ff=64,
                 vocab_size=127, max_seq_len=64, tie_embeddings=True)
STEPS = 5
SCHEDULES = {"gpipe": 1, "1f1b": 1, "interleaved_1f1b": 2}  # schedule -> virtual stages per rank


def config(out_dir: Path, model: dict = TINY, **plan) -> dict:
    # lr high enough that the trajectory moves well beyond rounding in 5 steps
    job = {"seq_len": 16, "global_batch": 8, "steps": STEPS, "seed": 7, "out_dir": str(out_dir),
           "optimizer": {"lr": 1e-2, "warmup_steps": 1}}
    return {"model": model, "job": job, "plan": {"micro_batch": 2, **plan}}


def few_rows(cfg: dict) -> dict:
    """cfg for plan.kernels=triton, which runs in Triton's interpreter, a program per row: a block per
    stage, one step of 2 micro-batches of 4 tokens (2 rows per rank under sequence parallel)."""
    cfg["model"] = dict(cfg["model"], n_layers=2)
    cfg["job"].update(seq_len=4, global_batch=2, steps=1)
    cfg["plan"]["micro_batch"] = 1
    return cfg


def four_rank_plans() -> dict[str, dict]:
    plans = {
        "tp2_dp2_zero0": dict(tp=2, dp=2),
        "tp2_dp2_zero3_sp": dict(tp=2, dp=2, zero_stage=3, sequence_parallel=True),
        # ZeRO-1: FSDP2 with the sync deferred to the last micro-batch (offloaded: the
        # tp2_dp2_zero1_offload_resume run below; under pp the stages defer it themselves)
        "tp2_dp2_zero1": dict(tp=2, dp=2, zero_stage=1),
        "pp2_dp2_zero1_1f1b": dict(pp=2, dp=2, zero_stage=1),
    }
    for schedule, virtual in SCHEDULES.items():
        pp = dict(pp=2, pp_schedule=schedule, pp_virtual_stages=virtual)
        plans[f"pp2_dp2_zero0_{schedule}"] = dict(dp=2, **pp)
        plans[f"pp2_dp2_zero3_{schedule}"] = dict(dp=2, zero_stage=3, **pp)
        plans[f"tp2_pp2_{schedule}"] = dict(tp=2, **pp)
    # recomputation inside stages and tp blocks changes nothing either
    plans["tp2_pp2_gpipe"]["activation_checkpointing"] = "full"
    plans["pp2_dp2_zero3_1f1b"]["activation_checkpointing"] = "selective"
    # per-operator under tp + sequence parallel + FSDP2, the attention core under tp x pp
    plans["tp2_dp2_zero3_sp"]["activation_checkpointing"] = "op"
    plans["tp2_pp2_1f1b"]["activation_checkpointing"] = "attention"
    # ... and each inside pipeline stages, per-operator (every other matmul) under interleaved stages
    # and DDP-like replicate, the attention core under FSDP2 accumulating micro-batches
    plans["pp2_dp2_zero0_interleaved_1f1b"].update(activation_checkpointing="op", checkpoint_every_k=2)
    plans["pp2_dp2_zero3_gpipe"]["activation_checkpointing"] = "attention"
    return plans


# tp=4 on a model whose heads, kv heads and d_ff divide by 4
SAVED_MODEL = dict(name="saved", n_layers=2, d_model=96, n_heads=8, n_kv_heads=4, d_ff=256, vocab_size=320, max_seq_len=64)
SAVED = {
    "saved_fp32": dict(model=SAVED_MODEL, b=2, s=32, precision="fp32", sp=False),
    "saved_fp32_sp": dict(model=SAVED_MODEL, b=2, s=32, precision="fp32", sp=True),
    "saved_bf16_sp": dict(model=SAVED_MODEL, b=2, s=32, precision="bf16", sp=True),
    "saved_gpt2_bf16_sp": dict(model={**SAVED_MODEL, "family": "gpt2", "n_kv_heads": None, "tie_embeddings": True},
                               b=2, s=32, precision="bf16", sp=True),
}
# per-operator and attention-core checkpointing on tp ranks (sequence parallel: the partial sums and
# reduce-scatter outputs op keeps, sp_hidden_layout)
for ckpt, k in (("op", 1), ("op", 2), ("attention", 2)):
    SAVED[f"saved_fp32_sp_{ckpt}{k}"] = dict(SAVED["saved_fp32_sp"], ckpt=ckpt, k=k)
SAVED["saved_gpt2_bf16_sp_op2"] = dict(SAVED["saved_gpt2_bf16_sp"], ckpt="op", k=2)
SAVED["saved_fp32_op2"] = dict(SAVED["saved_fp32"], ckpt="op", k=2)


def four_rank_spec(root: Path) -> dict:
    """What test_tp_pp_plans_match_one_process_and_resume trains on 4 ranks (tests/tp_pp_worker.py's
    SPEC), each run's folder under `root`: tests/conftest.py's four_rank_run launches it together
    with the other modules' 4-rank runs."""
    runs = {name: config(root / name, **plan) for name, plan in four_rank_plans().items()}
    # hybrid sharding: 2 replicas of 2 sharding ranks, accumulating 2 micro-batches: ZeRO-3 (the replicas'
    # all-reduce only on the last) and ZeRO-1 (the reduce-scatter and the all-reduce only on the last)
    runs["hsdp_r2_dp4_zero3"] = config(root / "hsdp3", dp=4, dp_replicate=2, zero_stage=3, micro_batch=1)
    runs["hsdp_r2_dp4_zero1"] = config(root / "hsdp1", dp=4, dp_replicate=2, zero_stage=1, micro_batch=1)
    runs["gpt2_tp2_dp2_zero2_sp"] = config(root / "gpt2", TINY_GPT2, tp=2, dp=2, zero_stage=2,
                                           sequence_parallel=True)
    # the tied embedding split between the first stage and a head copy on the last (autotune/engine/pipeline.py)
    runs["gpt2_pp2_dp2_zero0_1f1b"] = config(root / "gpt2-pp", TINY_GPT2, pp=2, dp=2)
    # ... with tp (the embedding's replicated gradient summed as vocabulary shards); no dp wrapper,
    # so tp DTensors sit beside plain positions (split AdamW groups)
    runs["gpt2_tp2_pp2_sp"] = config(root / "gpt2-tp-pp", TINY_GPT2, tp=2, pp=2, sequence_parallel=True)
    # fp16 across stages, dynamic and fixed (under ZeRO-3) scales, each with an overflow on rank 0
    # alone at step 2: every rank must skip that step, and only the dynamic scale backs off
    runs["pp2_dp2_fp16_1f1b"] = config(root / "fp16", pp=2, dp=2, precision="fp16")
    runs["pp2_dp2_zero3_fp16_fixed_gpipe"] = config(root / "fp16-fixed", pp=2, dp=2, zero_stage=3,
                                                    precision="fp16", loss_scale="65536", pp_schedule="gpipe")
    # the Triton kernels on the stages' local rows and sequence-sharded norms (the fused loss is not
    # used: the last stage runs torch's on vocabulary-sharded logits)
    runs["triton_tp2_pp2_sp_1f1b"] = few_rows(config(root / "triton", tp=2, pp=2, sequence_parallel=True,
                                                     kernels="triton"))
    overflow_at = {name: 2 for name in ("pp2_dp2_fp16_1f1b", "pp2_dp2_zero3_fp16_fixed_gpipe", "fp16", "fp16_fixed_zero3")}
    resume = {
        "tp2_pp2_sp_resume": {"save_at": 3, "config": config(
            root / "resume", tp=2, pp=2, dp=1, pp_schedule="1f1b", sequence_parallel=True, zero_stage=2)},
        # ZeRO-1 offloaded: the states saved as host DTensors of dp x tp shards
        "tp2_dp2_zero1_offload_resume": {"save_at": 3, "config": config(
            root / "resume-zero1", tp=2, dp=2, zero_stage=1, offload_optimizer=True)},
    }
    # tied copies: a checkpoint names the head copy tok_emb.weight, so a pp run resumes and moves to one process
    resume["gpt2_pp2_dp2_zero3_gpipe_resume"] = {"save_at": 3, "config": config(
        root / "resume-gpt2", TINY_GPT2, pp=2, dp=2, zero_stage=3, pp_schedule="gpipe")}
    accumulating = ["pp2_dp2_zero3_gpipe", "pp2_dp2_zero3_1f1b"]
    # the fp16 pipeline resumes after the overflow: with the backed-off scale
    resume_at = {"pp2_dp2_fp16_1f1b": 3}
    probe = {"probe_tp2_pp2": {"config": few_rows(config(root / "probe", tp=2, pp=2)), "warmup": 0, "steps": 1}}
    return {"runs": runs, "resume": resume, "overflow_at": overflow_at, "accumulating": accumulating,
            "resume_at": resume_at, "probe": probe, "saved": SAVED}


@pytest.mark.slow
def test_tp_pp_plans_match_one_process_and_resume(tmp_path, four_rank_run):
    root = four_rank_run["root"] / __name__
    spec, result = four_rank_spec(root), four_rank_run["out"]
    runs, overflow_at, accumulating = spec["runs"], spec["overflow_at"], spec["accumulating"]
    references = {"pp2_dp2_fp16_1f1b": "fp16", "pp2_dp2_zero3_fp16_fixed_gpipe": "fp16_fixed_zero3",
                  "triton_tp2_pp2_sp_1f1b": "llama_short"}
    # the references, and both checkpoints continued by one process: stages and shards keep the
    # full model's parameter names, so a checkpoint moves between layouts
    reference = run_worker(tmp_path, "reference", {
        "runs": {"llama": config(tmp_path / "ref"), "gpt2": config(tmp_path / "ref-gpt2", TINY_GPT2),
                 "fp16": config(tmp_path / "ref-fp16", precision="fp16"),
                 "llama_short": few_rows(config(tmp_path / "ref-short")),
                 "fp16_fixed_zero3": config(tmp_path / "ref-fp16-fixed", zero_stage=3, precision="fp16",
                                            loss_scale="65536")},
        "overflow_at": overflow_at,
        "load": {"gpt2_from_pp2": {"config": config(tmp_path / "ref-load-gpt2", TINY_GPT2),
                                   "checkpoint": str(root / "resume-gpt2" / "ckpt" / "step-3")},
                 "llama_from_tp2_pp2": {"config": config(tmp_path / "ref-load"),
                                        "checkpoint": str(root / "resume" / "ckpt" / "step-3")},
                 "llama_from_tp2_dp2_zero1": {"config": config(tmp_path / "ref-load-zero1"),
                                              "checkpoint": str(root / "resume-zero1" / "ckpt" / "step-3")}},
    }, nproc=1)

    for name in runs:
        expected = reference[references.get(name, "gpt2" if name.startswith("gpt2") else "llama")]
        # fp16 too: micro-batches of one shape round alike and no gradient underflows at a 2^16 scale
        # (at 2^13 the one-process run, whose micro-batch gradients are smaller, loses some: 3e-4 off)
        for key in ("loss", "grad_norm"):  # the norm spans tp shards, dp shards and pp stages
            assert len(result[name][key]) == runs[name]["job"]["steps"]
            for step, (got, want) in enumerate(zip(result[name][key], expected[key])):
                assert got == want or abs(got - want) / want < 1e-4, (name, key, step, got, want)  # inf: overflow
        assert result[name]["scale"] == expected["scale"], name
    llama = reference["llama"]["loss"]
    assert llama[-1] < llama[0] - 0.05  # the trajectory really moves
    hw = load_hardware(ClusterConfig(gpu="h100-sxm", gpus_per_node=4))
    for name in ("hsdp_r2_dp4_zero3", "hsdp_r2_dp4_zero1"):  # fp32: as close as the 2-rank ZeRO tests
        for key in ("loss", "grad_norm"):
            assert result[name][key] == pytest.approx(reference["llama"][key], rel=1e-5), (name, key)
        # each rank holds half the parameters and AdamW states (a shard of 2), as the estimate counts
        est = estimate(build_train_config(runs[name]), hw).model_states
        assert (result[name]["param_bytes"], result[name]["optimizer_bytes"]) == (est["params_bytes"], est["optimizer_bytes"])
        full = estimate(build_train_config(dict(runs[name], plan=dict(runs[name]["plan"], dp_replicate=1))), hw)
        assert est["params_bytes"] > full.model_states["params_bytes"]
    # the (pp, dp, tp) mesh, tp innermost: rank 0's tp peer is rank 1 (the same node), dp and pp further out
    assert result["tp2_dp2_zero0"]["mesh"] == {"pp": [0], "dp": [0, 2], "tp": [0, 1]}
    assert result["tp2_pp2_1f1b"]["mesh"] == {"pp": [0, 2], "dp": [0], "tp": [0, 1]}
    assert result["pp2_dp2_zero0_1f1b"]["mesh"] == {"pp": [0, 2], "dp": [0, 1], "tp": [0]}

    # Triton under tp x pp: the kernels ran (on some rank), and the loss and gradients are right to 1e-5
    # (an unsummed norm-weight gradient is ~1e-4 off: tests/test_tp_kernels.py); other runs launched none
    triton = result["triton_tp2_pp2_sp_1f1b"]
    assert {"_rms_norm_fwd", "_rms_norm_bwd", "_rope_kernel", "_swiglu_fwd", "_swiglu_bwd"} <= set(triton["kernels"])
    assert "_cross_entropy_kernel" not in triton["kernels"]
    for key in ("loss", "grad_norm"):
        assert triton[key] == pytest.approx(reference["llama_short"][key], rel=1e-5), key
    assert all(not result[name]["kernels"] for name in runs if name != "triton_tp2_pp2_sp_1f1b")
    # fp16 pp resumed after the overflow of step 2: the same steps, at the backed-off scale
    resumed, straight = result["pp2_dp2_fp16_1f1b"]["resumed"], result["pp2_dp2_fp16_1f1b"]
    assert resumed["start"] == 3 and resumed["scale"] == straight["scale"][3:] == [2.0**15] * 2
    for key in ("loss", "grad_norm"):
        assert resumed[key] == pytest.approx(straight[key][3:], rel=1e-6), key
    # the probe accepts a tp x pp plan: its loss is the one-process run's, the pipeline's forward and
    # backward are timed as one phase
    probed = result["probe_tp2_pp2"]
    assert probed["status"] == "ok" and probed["loss_first"] == pytest.approx(reference["llama_short"]["loss"][0], rel=1e-4)
    assert probed["tokens_per_s"] == pytest.approx(2 * 4 / probed["step_time_s"]) and probed["peak_mem_bytes"] > 0
    assert probed["breakdown"]["forward_backward_s"] > 0 and probed["breakdown"]["forward_s"] is None
    # what a block and the rest save for backward on a tp=4 rank, with and without sequence parallel:
    # as the estimator's activation model says (sequence parallel keeps the gathered linear inputs whole)
    for name, case in SAVED.items():
        predicted = predict_saved_bytes(ModelConfig(**case["model"]), case["b"], case["s"], case["precision"], "params",
                                        case.get("ckpt", "none"), every_k=case.get("k", 2), tp=4, sp=case["sp"])
        for part in ("block", "outside"):
            assert predicted[part] == pytest.approx(result[name][part], rel=0.01), (name, part)
    # ZeRO-1 over tp shards: the largest rank's AdamW states are those autotune.estimate counts (a
    # 4-rank layout, beyond tests/test_estimate.py's 2-rank check of what the engine holds)
    held = estimate(build_train_config(runs["tp2_dp2_zero1"]), hw).model_states["optimizer_bytes"]
    assert result["tp2_dp2_zero1"]["optimizer_bytes"] == held
    # pp x FSDP2: between a step's micro-batches a stage holds its gradients unsharded in fp32 (the
    # pipeline turns FSDP2's reduce-scatter off until the last), as the estimate counts them
    for name in accumulating:
        cfg = build_train_config(runs[name])
        layout = rank_layout(cfg.model, cfg.plan.dp, cfg.plan.tp, cfg.plan.pp, cfg.plan.pp_virtual_stages)
        est = estimate(cfg, hw)
        assert result[name]["accumulating_grad_bytes"] == 4 * max(layout[k]["local"] for k in ("first", "last")), name
        assert est.memory["grads_bytes"] == 4 * layout[est.peak_stage]["local"], name
    # fp16 really computes in fp16 (off the fp32 trajectory by more than the tolerance), the overflow
    # is skipped and halves the dynamic scale, and the fixed scale stays
    assert max(abs(a - b) / b for a, b in zip(reference["fp16"]["loss"], llama)) > 1e-4
    assert reference["fp16"]["scale"] == [2.0**16] * 2 + [2.0**15] * 3
    assert reference["fp16"]["grad_norm"][2] == reference["fp16_fixed_zero3"]["grad_norm"][2] == float("inf")
    assert reference["fp16_fixed_zero3"]["scale"] == [2.0**16] * STEPS

    gpt2 = reference["gpt2"]["loss"]
    resumed, moved = result["gpt2_pp2_dp2_zero3_gpipe_resume"], reference["gpt2_from_pp2"]
    assert resumed["straight"] == pytest.approx(gpt2, rel=1e-4)
    assert resumed["start"] == 3 and resumed["resumed"] == pytest.approx(resumed["straight"][3:], rel=1e-6)
    assert moved["start"] == 3 and moved["losses"] == pytest.approx(gpt2[3:], rel=1e-4)

    for name, loaded in (("tp2_pp2_sp_resume", "llama_from_tp2_pp2"),
                         ("tp2_dp2_zero1_offload_resume", "llama_from_tp2_dp2_zero1")):
        resumed, moved = result[name], reference[loaded]
        assert resumed["start"] == 3
        assert resumed["resumed"] == pytest.approx(resumed["straight"][3:], rel=1e-6), name
        assert resumed["straight"] == pytest.approx(llama, rel=1e-4), name
        assert moved["start"] == 3 and moved["losses"] == pytest.approx(llama[3:], rel=1e-4), loaded


def test_stage_layers_are_balanced_and_consecutive():
    assert stage_layers(4, 4) == [range(0, 1), range(1, 2), range(2, 3), range(3, 4)]
    assert stage_layers(10, 4) == [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]
    for n, s in ((32, 6), (80, 16), (7, 7)):
        sizes = [len(r) for r in stage_layers(n, s)]
        assert sum(sizes) == n and max(sizes) - min(sizes) <= 1


REFUSED = [
    (dict(tp=3, dp=1), {}, "must divide model.n_heads=4"),
    (dict(tp=4), {}, "and model.n_kv_heads=2"),  # grouped-query attention: tp divides n_heads, not the kv heads
    (dict(pp=8), {}, "exceeds model.n_layers=4"),
    (dict(pp=2, pp_schedule="interleaved_1f1b"), {}, "needs plan.pp_virtual_stages >= 2"),
    (dict(pp=2, pp_schedule="interleaved_1f1b", pp_virtual_stages=2, micro_batch=8), {"global_batch": 24},
     "divisible by plan.pp=2"),
    (dict(pp=4, pp_schedule="1f1b", micro_batch=4), {}, "needs at least plan.pp=4 micro-batches"),
    (dict(pp=2, pp_virtual_stages=2), {}, "needs plan.pp_schedule=interleaved_1f1b"),
    (dict(sequence_parallel=True), {}, "sequence_parallel needs plan.tp > 1"),
    (dict(tp=2, sequence_parallel=True), {"seq_len": 15}, "divisible by plan.tp=2"),
    (dict(tp=2, compile=True), {}, "use plan.compile=false under tp"),  # engine.parallel.check_supported
    (dict(activation_checkpointing="op", checkpoint_every_k=3), {}, "use 1 (keep every matmul's output) or 2"),
]


@pytest.mark.parametrize("plan,job,message", REFUSED)
def test_refused_plan_is_one_error_line_exit_2(tmp_path, capsys, plan, job, message):
    cfg = config(tmp_path / "run", **plan)
    cfg["job"].update(job)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert autotune_main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides", [["plan.tp=2", "cluster.nodes=2"],  # one GPU per node
                                       ["plan.tp=2", "cluster.gpus_per_node=3"]])  # a tp group across two nodes
def test_tp_beyond_a_node_is_one_error_line_exit_2(capsys, overrides):
    assert autotune_main(["estimate", "model=tiny", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: plan.tp=") and "must fit in a node" in err[0], err


def test_bench_tp_slice_slices_each_projection_by_tp():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_tp_slice.py"), "--help"],
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--tp" in r.stdout
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_tp_slice import block_flops, load_model_config, sliced_block

    cfg = load_model_config("llama-3-8b")
    full = {n: p.numel() for n, p in sliced_block(cfg, 1).named_parameters()}
    for tp in (2, 4, 8):
        part = {n: p.numel() for n, p in sliced_block(cfg, tp).named_parameters()}
        assert part.keys() == full.keys()
        for name, count in part.items():
            assert count == (full[name] if "norm" in name else full[name] // tp), name
        assert block_flops(cfg, tp, 4096, 4096) == pytest.approx(block_flops(cfg, 1, 4096, 4096) / tp)
    # tp=1: 6 x matmul parameters per token, plus causal attention
    matmul = sum(c for n, c in full.items() if "norm" not in n)
    assert block_flops(cfg, 1, 1, 1) == pytest.approx(6 * matmul + 3 * 2 * cfg.d_model)
