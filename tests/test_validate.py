"""`autotune validate` and `autotune calibrate`: the runs schema (docs/runs.md), the mapping of a run
to the engine, the report, and the calibration's fit and leave-one-source-out errors."""
import json

import numpy as np
import pandas as pd
import pytest

from autotune.cli import main
from autotune.estimate import Calibration
from autotune.profile import flops_per_token
from autotune.validate import NotExpressible, map_run, parse_run, read_runs, validate_runs
from autotune.validate.calibrate import PRIOR_SD, fit_multipliers

# a small Llama (the shape of Llama 3.2 1B): the grouped-query llama fit the other tests use
ARCH = {"n_layers": 16, "d_model": 2048, "n_heads": 32, "kv_heads": 8, "ffn": 8192, "vocab": 128256}


def row(**changes) -> dict:
    base = {"source": "github.com/example/trainer README", "table": "t1", "model": "Llama 1B", "arch": ARCH,
            "gpu": "A100 80GB", "gpus": 16, "nodes": 2, "interconnect": "200 Gb/s per GPU", "dp": 16, "tp": 1, "pp": 1,
            "cp": 1, "zero": "FSDP", "micro_batch": 2, "global_batch": 32, "seq_len": 4096, "precision": "bf16",
            "ac": "none", "other": "", "tokens_per_s_per_gpu": 20000, "tflops_per_gpu": "unstated", "mfu": "unstated",
            "peak_mem_gib": "unstated", "step_time_s": "unstated", "notes": ""}
    return base | changes


def write_runs(path, rows) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_a_malformed_row_is_one_error_line_naming_its_line_and_field_and_the_others_go_on(tmp_path, capsys):
    runs = write_runs(tmp_path / "runs.jsonl", [
        row(), row(gpus="eight"), "{not json", {k: v for k, v in row().items() if k != "seq_len"}, row(mfu=41),
        row(micro_batch=1),
    ])
    assert main(["validate", runs, "--out", str(tmp_path / "out")]) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 4 and len(captured.err.splitlines()) == 4
    assert "line 2: field 'gpus'" in errors[0] and "positive integer" in errors[0]
    assert "line 3" in errors[1] and "not JSON" in errors[1]
    assert "line 4: field 'seq_len'" in errors[2] and "missing" in errors[2]
    assert "line 5: field 'mfu'" in errors[3] and "fraction" in errors[3]
    table = pd.read_csv(tmp_path / "out" / "runs.csv")
    assert sorted(table["line"]) == [1, 6]
    assert "Rows not read" in (tmp_path / "out" / "report.md").read_text()


def test_validate_reports_errors_rank_agreement_the_plot_and_what_it_cannot_express(tmp_path, capsys):
    runs = write_runs(tmp_path / "runs.jsonl", [
        row(micro_batch=1, global_batch=64, tokens_per_s_per_gpu=18000),
        row(micro_batch=2, global_batch=64, tokens_per_s_per_gpu=20000),
        row(micro_batch=4, global_batch=64, tokens_per_s_per_gpu=21000),
        row(precision="bf16 + float8 linears", gpu="H100 SXM"),  # predicted: plan.fp8=tensorwise; cp=2: plan.cp
        row(precision="bf16 + float8 linears"), row(cp=2, dp=8), row(zero="HSDP"), row(other="FSDP + async TP", tp=2, dp=8),
        row(gpu="MI300X"),
    ])
    assert main(["validate", runs, "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "7 rows predicted" in out and "2 the engine cannot express" in out
    report = (tmp_path / "out" / "report.md").read_text()
    assert "dp 8 cp 2 tp" in report and "dp 8 tp 2 pp 1, micro_batch 2 x 2, none, sp, async tp" in report
    for reason in ("no float8 tensor cores", "not in the catalog"):
        assert reason in report
    # hybrid sharding: by default FSDP's, shard within a node (8 ranks) and replicate across the 2 nodes
    assert "dp 16 (2 replicas x 8)" in report and "shard within a node (8 ranks)" in report
    assert "Kendall's tau" in report
    table = pd.read_csv(tmp_path / "out" / "runs.csv")
    assert table["tokens_error"].notna().all() and (table["predicted_tokens_per_s_per_gpu"] > 0).all()
    assert (tmp_path / "out" / "predicted_vs_published.png").read_bytes()[:4] == b"\x89PNG"


def test_the_plan_the_source_left_unstated_is_the_nearest_the_framework_defaults_that_fits():
    run = parse_run(1, json.dumps(row(micro_batch="unstated", ac="unstated", tp="unstated", pp="unstated", dp=2,
                                      gpus=16, global_batch=16, zero="unstated")))
    validation = validate_runs([run])
    assumed = validation.table["assumptions"].iloc[0]
    assert "micro_batch unstated" in assumed and "activation checkpointing unstated" in assumed
    assert "tp x pp unstated: tp=8, pp=1" in assumed  # tensor parallel fills a node first
    assert "the plan nearest the defaults that fits" in assumed and validation.table["fits"].iloc[0]


@pytest.mark.parametrize("text, entry", [
    ("H100 SXM HBM2e 96GB (Grand Teton), 500W power limit", "H100-SXM5-96GB-HBM2e-500W"),
    ("H100 80GB HBM3 SXM, 700W TDP", "H100-SXM5-80GB"), ("H100 PCIe", "H100-PCIe-80GB"),
    ("A100 40GB", "A100-SXM4-40GB"), ("H200 141GB", "H200-SXM-141GB"),
])
def test_published_gpu_names_map_to_the_catalog(text, entry):
    from autotune.hardware import catalog_gpu

    assert catalog_gpu("h100-pcie").gpu == "H100-PCIe-80GB" or entry != "H100-PCIe-80GB"
    mapped = map_run(parse_run(1, json.dumps(row(gpu=text))))
    assert mapped.hw.gpu == catalog_gpu({"H100-SXM5-96GB-HBM2e-500W": "h100-sxm-96g-500w", "H100-SXM5-80GB": "h100-sxm",
                                         "H100-PCIe-80GB": "h100-pcie", "A100-SXM4-40GB": "a100-40g",
                                         "H200-SXM-141GB": "h200"}[entry]).gpu


def test_a_variant_left_unstated_is_assumed_and_said():
    mapped = map_run(parse_run(1, json.dumps(row(gpu="H100 (variant unstated)"))))
    assert any("gpu variant unstated: h100-sxm" in a for a in mapped.assumptions)
    with pytest.raises(NotExpressible, match="catalog"):
        map_run(parse_run(1, json.dumps(row(gpu="MI300X"))))


def test_a_ports_line_rate_per_node_is_shared_by_the_nodes_gpus():
    per_node = map_run(parse_run(1, json.dumps(row(interconnect="8x 200Gbps HDR InfiniBand per node"))))
    per_gpu = map_run(parse_run(1, json.dumps(row(interconnect="NDR 400 Gb/s per GPU"))))
    assert per_gpu.hw.inter_node_bytes_per_s == pytest.approx(2 * per_node.hw.inter_node_bytes_per_s)
    bare = map_run(parse_run(1, json.dumps(row(interconnect="200 Gbps"))))
    assert bare.hw.inter_node_bytes_per_s == pytest.approx(per_gpu.hw.inter_node_bytes_per_s / 2)
    assert any("neither per GPU nor per node: taken per GPU" in a for a in bare.assumptions)
    assert not any("network" in a for a in per_gpu.assumptions)


def test_a_bare_line_rate_beyond_one_gpus_port_is_the_nodes():
    # an A100 server's ports are 200 Gb/s each: 400 Gb/s can only be the node's 8 GPUs together
    bare = map_run(parse_run(1, json.dumps(row(interconnect="400 Gbps"))))
    per_node = map_run(parse_run(1, json.dumps(row(interconnect="2x 200Gbps per node"))))
    assert bare.hw.inter_node_bytes_per_s == pytest.approx(per_node.hw.inter_node_bytes_per_s)
    assert any("so the node's: 50 Gb/s per GPU" in a for a in bare.assumptions)


def test_the_measured_speed_comes_from_what_the_source_gives():
    by_step = map_run(parse_run(1, json.dumps(row(tokens_per_s_per_gpu="unstated", step_time_s=2.0))))
    assert by_step.tokens_per_s_per_gpu == pytest.approx(32 * 4096 / 2.0 / 16) and by_step.tokens_source == "from step_time_s"
    by_flops = map_run(parse_run(1, json.dumps(row(tokens_per_s_per_gpu="unstated", tflops_per_gpu=150))))
    per_token = flops_per_token(by_flops.train.model, 4096)["total"]
    assert by_flops.tokens_per_s_per_gpu == pytest.approx(150e12 / per_token)
    by_mfu = map_run(parse_run(1, json.dumps(row(tokens_per_s_per_gpu="unstated", mfu=0.5))))
    assert by_mfu.tokens_per_s_per_gpu == pytest.approx(0.5 * 312e12 / per_token)


def test_calibrate_fits_scales_that_a_command_applies_and_reports_leave_one_source_out(tmp_path, capsys):
    """Runs 30% slower than the catalog's model, from two sources: the fit moves the scales so that
    the calibrated model meets them, leave-one-source-out transfers it, and the file is read back
    by validate and by estimate."""
    shapes = [dict(micro_batch=b, seq_len=s, global_batch=16 * b) for b in (1, 2) for s in (2048, 4096)]
    rows = [row(source=("alpha report", "beta paper")[i % 2], **shape) for i, shape in enumerate(shapes)]
    truth = validate_runs([parse_run(i + 1, json.dumps(r)) for i, r in enumerate(rows)]).table
    for r, predicted in zip(rows, truth["predicted_tokens_per_s_per_gpu"]):
        r["tokens_per_s_per_gpu"] = predicted / 1.3
    runs = write_runs(tmp_path / "runs.jsonl", rows)
    calib_path = tmp_path / "calib.json"
    assert main(["calibrate", runs, "--out", str(calib_path)]) == 0
    out = capsys.readouterr().out
    assert "median_abs_error_loso" in out and "alpha" in out and "beta" in out
    calib = Calibration.load(calib_path)
    assert calib.scales and calib.records == 4 and min(calib.scales.values()) < 0.95
    fitted = validate_runs(read_runs(runs)[0], calib=calib).table
    before = truth["predicted_tokens_per_s_per_gpu"] / (truth["predicted_tokens_per_s_per_gpu"] / 1.3) - 1
    assert fitted["tokens_error"].abs().median() < 0.5 * before.abs().median()
    assert main(["validate", runs, "--calibration", str(calib_path), "--out", str(tmp_path / "out")]) == 0
    catalog = json.loads(_estimate_json(capsys, []))["tokens_per_s"]
    calibrated = json.loads(_estimate_json(capsys, [f"estimate.calibration={calib_path}"]))["tokens_per_s"]
    assert calibrated < catalog


def test_a_run_far_off_for_a_reason_outside_the_hardware_does_not_drag_the_fit():
    """Seven runs whose matmuls take 1.3x the model's time and one 3x slower (its engine differs):
    the fitted matmul multiplier stays at the seven's, where squares would be pulled towards the one."""
    rng = np.random.default_rng(0)
    parts = np.column_stack([rng.uniform(1, 2, 8), rng.uniform(0.1, 0.3, (8, 3)), np.full(8, 0.05)])
    measured = 1.3 * parts[:, 0] + parts[:, 1:].sum(axis=1)
    measured[0] *= 3
    k = fit_multipliers(parts, measured, np.ones(4), PRIOR_SD, np.full(4, 0.1))
    assert k[0] == pytest.approx(1.3, rel=0.05)


def _estimate_json(capsys, extra) -> str:
    capsys.readouterr()
    assert main(["estimate", "--json", "model=llama-3.2-1b", "cluster=8xa100-80g", "job.seq_len=2048",
                 "job.global_batch=16", "plan.precision=bf16", "plan.zero_stage=3"] + extra) == 0
    return capsys.readouterr().out


def test_a_calibration_with_a_scale_out_of_range_is_one_error_line(tmp_path, capsys):
    path = tmp_path / "calib.json"
    Calibration(scales={"matmul_efficiency": 100.0}).save(path)
    assert main(["estimate", "model=tiny", f"estimate.calibration={path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: estimate.calibration") and len(err.splitlines()) == 1


@pytest.mark.parametrize("ac, source, mode", [
    ("selective (torchtitan default selective op)", "github.com/pytorch/torchtitan benchmarks", ("op", 2)),
    ("selective (per-op SAC)", "github.com/pytorch/torchtitan benchmarks", ("op", 2)),
    ("selective layer", "github.com/pytorch/torchtitan docs/performance.md", ("selective", 2)),
    ("selective (attention core recompute) + sequence parallelism", "Korthikanti et al. 2022", ("attention", 2)),
    ("selective + sequence parallelism", "Korthikanti et al. 2022, 'Reducing Activation Recomputation'", ("attention", 2)),
])
def test_published_selective_rows_map_to_the_mode_the_run_used(ac, source, mode):
    from autotune.validate.mapping import activation_mode

    assert activation_mode(ac, source) == mode


@pytest.mark.parametrize("zero, source, stage", [
    ("FSDP", "github.com/example/trainer README", 3),
    ("FSDP, no reshard after forward", "github.com/example/trainer README", 2),
    ("FSDP (DP dimension is FSDP per Fig. 5 caption)", "Llama Team, 'The Llama 3 Herd of Models' (arXiv 2407.21783)", 2),
])
def test_fsdp_that_keeps_parameters_gathered_after_forward_maps_to_zero2(zero, source, stage):
    mapped = map_run(parse_run(1, json.dumps(row(zero=zero, source=source))))
    assert mapped.train.plan.zero_stage == stage
    assert any("Sec. 3.3.2" in a for a in mapped.assumptions) == ("2407.21783" in source)


def test_megatrons_distributed_optimizer_is_zero1_with_and_without_a_pipeline():
    """The engine's ZeRO-1 reduce-scatters during the last backward and gathers once per step beside
    the compute, as Megatron's overlapped distributed optimizer does; under pp it runs as ZeRO-2
    does, and the estimate says the same of both there."""
    import dataclasses

    from autotune.estimate import estimate

    overlapped = "overlap-grad-reduce, overlap-param-gather, tp-comm-overlap"
    piped = map_run(parse_run(1, json.dumps(row(zero="unstated", tp=2, pp=2, dp=4, other=overlapped))))
    assert piped.train.plan.zero_stage == 1
    assert any("a distributed optimizer (ZeRO-1)" in a for a in piped.assumptions)
    flat = parse_run(2, json.dumps(row(zero="distributed optimizer", tp=2, dp=8, other=overlapped)))
    assert validate_runs([flat]).table["plan"].iloc[0].startswith("zero 1")
    zero1, zero2 = (estimate(dataclasses.replace(piped.train, plan=dataclasses.replace(piped.train.plan, zero_stage=z)),
                             piped.hw) for z in (1, 2))
    assert zero1.step_time_s == zero2.step_time_s and zero1.memory == zero2.memory


@pytest.mark.parametrize("source, other, compiled_loss", [
    ("github.com/pytorch/torchtitan benchmarks/llama3_h100_202412_torchtitan.md (docs @ d4c86e375, 2025-01-30)", "torch.compile", False),
    ("github.com/pytorch/torchtitan benchmarks/llama3-8b_h200_202506_trainy-whitefiber.md", "torch.compile", True),
    ("github.com/pytorch/torchtitan benchmarks/asyncTP_llama3_h100_2025-06_torchtitan.md", "no compile", False),
    ("github.com/foundation-model-stack/fms-fsdp README.md", "torch.compile", False),
    ("github.com/example/trainer README", "torch.compile", True),
])
def test_a_compiled_run_compiles_its_loss_as_its_framework_did_then(source, other, compiled_loss):
    """torchtitan compiles its loss with the model from April 2025 (bbb1b616e), by the latest month
    its source names; fms-fsdp never does; another framework as the engine does."""
    mapped = map_run(parse_run(1, json.dumps(row(source=source, other=other))))
    plan = mapped.train.plan
    assert (plan.compile and plan.compile_loss) == compiled_loss
    assert any(a.startswith("loss ") for a in mapped.assumptions) == (plan.compile and "example" not in source)


@pytest.mark.parametrize("source, sequence_parallel", [
    ("Llama Team, 'The Llama 3 Herd of Models' (arXiv 2407.21783), Sec 3.3.2 Table 4", True),
    ("github.com/example/trainer README", False),
])
def test_a_source_that_documents_sequence_parallel_tp_maps_to_it(source, sequence_parallel):
    """Unstated elsewhere, sequence parallelism is free (the plan nearest the defaults that fits: off
    where that fits); the Llama 3 paper's tensor parallelism cites its paper (Korthikanti et al.)."""
    mapped = map_run(parse_run(1, json.dumps(row(source=source, tp=2, dp=8, zero="unstated"))))
    assert mapped.train.plan.sequence_parallel == sequence_parallel
    assert any("Korthikanti" in a for a in mapped.assumptions) == sequence_parallel


def test_an_unfit_sequence_parallel_run_says_what_megatrons_regather_would_save():
    """Korthikanti et al.'s attention-recompute rows: this engine's sequence-parallel linears save
    their gathered inputs, 2·b·s·h bytes a block, where Megatron-LM keeps the 1/t shard; on the
    first pipeline rank for each block it holds and each micro-batch in flight (1F1B: min(p, m))."""
    from autotune.engine.config import build_train_config
    from autotune.validate.unfit import gathered_input_excess, why_unfit

    def train(**plan):
        return build_train_config({"model": {"name": "g", "family": "gpt2", "n_layers": 8, "d_model": 256, "n_heads": 4,
                                             "d_ff": 1024, "vocab_size": 512, "max_seq_len": 512},
                                   "job": {"seq_len": 512, "global_batch": 8},
                                   "plan": {"precision": "bf16", "tp": 2, "pp": 2, "sequence_parallel": True,
                                            "activation_checkpointing": "attention", "micro_batch": 1} | plan})

    cfg = train()
    held = 2 * 1 * 512 * 256 * 2 * (1 - 1 / 2) * 4 * 2  # per block, x 4 blocks on the first rank, x 2 in flight
    assert gathered_input_excess(cfg) == pytest.approx(held)
    assert gathered_input_excess(train(activation_checkpointing="full")) == 0
    assert gathered_input_excess(train(sequence_parallel=False)) == 0
    unfit = pd.Series({"fits": False, "reason": "needs 10 GiB", "mem_total_bytes": held + 1e9})
    assert why_unfit(cfg, unfit, 1.5e9).endswith("(fits)") and "1/2 shard" in why_unfit(cfg, unfit, 1.5e9)
    assert why_unfit(cfg, unfit, 0.5e9).endswith("(still does not fit)")
    assert why_unfit(cfg, pd.Series({"fits": True, "reason": "fits", "mem_total_bytes": 1e8}), 0.5e9) == "fits"


@pytest.mark.parametrize("source, gpu, other, precision, kernel, said", [
    ("github.com/NVIDIA/Megatron-LM README.md (Megatron-Core r0.8.0)", "H100 80GB SXM", "", "bf16", "cudnn",
     "Transformer Engine"),
    ("github.com/NVIDIA/Megatron-LM README.md @ 50a4b5fa02 (Apr 2021)", "A100 80GB", "", "bf16", "sdpa", ""),
    ("github.com/pytorch/torchtitan benchmarks/llama3_h100_202412_torchtitan.md", "H100 80GB SXM", "", "bf16", "sdpa", ""),
    ("github.com/example/trainer README", "H100 80GB SXM", "", "bf16", "cudnn", "unstated"),
    ("github.com/example/trainer README", "H100 80GB SXM", "FlashAttention-2", "bf16", "sdpa", ""),
    ("github.com/example/trainer README", "A100 80GB", "cuDNN attention", "bf16", "cudnn", ""),
    ("github.com/example/trainer README", "H100 80GB SXM", "", "fp32", "sdpa", ""),
])
def test_a_runs_attention_kernel_is_the_one_it_states_or_its_framework_runs(source, gpu, other, precision, kernel,
                                                                             said):
    """Stated, or the framework's on Hopper (Megatron-Core's Transformer Engine prefers cuDNN's fused
    attention there; torchtitan and fms-fsdp call SDPA), or an unnamed framework's on Hopper: cuDNN's,
    said; elsewhere and in fp32, SDPA's own."""
    mapped = map_run(parse_run(1, json.dumps(row(source=source, gpu=gpu, other=other, precision=precision))))
    assert mapped.train.plan.attention == kernel
    attention_notes = [a for a in mapped.assumptions if a.startswith("attention")]
    assert (said in attention_notes[0]) if said else not attention_notes


@pytest.mark.parametrize("source,precision,reduce", [
    ("github.com/foundation-model-stack/fms-fsdp README.md", "bf16", "bf16"),  # its bfSixteen policy
    ("github.com/foundation-model-stack/fms-fsdp README.md", "fp32", "fp32"),  # bf16 needs 16-bit compute
    ("github.com/pytorch/torchtitan docs/performance.md", "bf16", "fp32"),  # mixed_precision_reduce: float32
])
def test_a_runs_gradients_are_reduced_in_its_frameworks_dtype(source, precision, reduce):
    mapped = map_run(parse_run(1, json.dumps(row(source=source, precision=precision))))
    assert mapped.train.plan.reduce_dtype == reduce
    assert any("reduced in bf16" in a for a in mapped.assumptions) == (reduce == "bf16")
