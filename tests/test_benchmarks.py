"""Each script of benchmarks/ runs end to end on the CPU at the tiniest sizes: the measuring logic,
the JSON it writes and the Markdown table it prints. These are smoke runs (the GPU figures come
from benchmarks/gpu_session.sh on a lent GPU); the checks recompute each derived figure from the
measured ones, so a row that was not measured cannot pass."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def run_script(name: str, *args: str) -> SimpleNamespace:
    """benchmarks/<name>'s main(args) in this process (torch's import, seconds, is paid once), with
    its stdout; the tests ask each script for the CPU (--device cpu / --probe cpu). The environment
    is restored after (bench_kernels sets TRITON_INTERPRET for the CPU)."""
    out = io.StringIO()
    with mock.patch.dict(os.environ, OMP_NUM_THREADS="1"), contextlib.redirect_stdout(out):
        rc = load_bench(name.removesuffix(".py")).main(list(args))
    assert rc in (0, None), f"{name} returned {rc}:\n{out.getvalue()[-3000:]}"
    return SimpleNamespace(stdout=out.getvalue())


def load_bench(name: str):
    """A benchmark script as a module (benchmarks/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_engine_cpu(tmp_path):
    out = tmp_path / "engine.json"
    proc = run_script("bench_engine.py", "--device", "cpu", "--models", "tiny", "--micro-batches", "2",
                      "--modes", "engine", "eager", "--seq-len", "32", "--steps", "2", "--warmup", "1",
                      "--out", str(out))
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["benchmark"] == "engine"
    assert [(r["mode"], r["status"]) for r in result["rows"]] == [("engine", "ok"), ("eager", "ok")]
    for r in result["rows"]:
        assert r["device"] == "cpu"
        assert r["mfu"] is None  # a CPU has no peak to divide by: never a made-up MFU
        assert r["step_time_s"] > 0 and r["peak_mem_bytes"] > 0
        assert math.isclose(r["tokens_per_s"], 2 * 32 / r["step_time_s"], rel_tol=1e-6)
    assert "| tiny | 2 | engine |" in proc.stdout and "| tiny | 2 | eager |" in proc.stdout


def test_bench_tp_slice_cpu(tmp_path):
    bench = load_bench("bench_tp_slice")
    cfg = bench.load_model_config("tiny")
    full, half = bench.sliced_block(cfg, 1), bench.sliced_block(cfg, 2)
    assert half.attn.wq.weight.shape == (cfg.n_heads * cfg.head_dim // 2, cfg.d_model)
    assert half.mlp.w_down.weight.shape == (cfg.d_model, cfg.d_ff // 2)
    assert full.mlp.w_down.weight.shape == (cfg.d_model, cfg.d_ff)

    out = tmp_path / "tp.json"
    proc = run_script("bench_tp_slice.py", "--device", "cpu", "--models", "tiny", "--tp", "1", "2", "4",
                      "--seq-len", "32", "--iters", "2", "--warmup", "1", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["device"] == "cpu"
    one, two, four = result["rows"]
    assert four["status"] == "error" and "does not divide" in four["error"]  # tiny has 2 kv heads
    for r in (one, two):
        assert r["status"] == "ok" and r["peak_mem_bytes"] is None  # no memory figure on a CPU
        assert math.isclose(r["total_ms"], r["fwd_ms"] + r["bwd_ms"])
        flops = bench.block_flops(cfg, r["tp"], 32, 32)
        assert math.isclose(r["tflops"], flops / (r["total_ms"] / 1e3) / 1e12, rel_tol=1e-9)
    assert one["ratio_to_tp1"] == 1.0
    assert math.isclose(two["ratio_to_tp1"], two["total_ms"] / one["total_ms"])
    assert math.isclose(two["efficiency"], one["total_ms"] / (2 * two["total_ms"]))
    assert "| tiny | 2 |" in proc.stdout


def test_bench_kernels_cpu(tmp_path):
    bench = load_bench("bench_kernels")
    out = tmp_path / "kernels.json"
    proc = run_script("bench_kernels.py", "--device", "cpu", "--ops", "rms_norm,linear_cross_entropy",
                      "--tokens", "64", "--hidden", "128", "--vocab", "256", "--warmup", "0", "--repeats", "1",
                      "--impls", "eager,triton", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["triton_interpret"] and not result["liger"]
    rows = result["results"]
    assert [(r["op"], r["impl"]) for r in rows] == [("rms_norm", "eager"), ("rms_norm", "triton"),
                                                   ("linear_cross_entropy", "eager"),
                                                   ("linear_cross_entropy", "triton")]
    bandwidth = result["hbm_copy_bytes_per_s"]
    assert bandwidth > 0
    for r in rows:
        assert "error" not in r, r
        assert r["time_s"] > 0 and r["peak_bytes"] is None
        if r["op"] == "rms_norm":
            moved = bench.bytes_moved(r, 2)
            assert math.isclose(r["bandwidth_fraction"], moved / r["time_s"] / bandwidth)
        else:
            assert math.isclose(r["tflops"], 6 * 64 * 128 * 256 / r["time_s"] / 1e12)
    assert "| rms_norm | tokens=64 hidden=128 | triton |" in proc.stdout


@pytest.mark.slow
def test_bench_moe_cpu(tmp_path):
    """A MoE step under expert parallelism on 2 gloo ranks: the probe's time and router figures,
    and the estimate of the same plan, per row."""
    out = tmp_path / "moe.json"
    proc = run_script("bench_moe.py", "--device", "cpu", "--models", "tiny-moe:3", "--micro-batches", "1",
                      "--seq-len", "32", "--precision", "fp32", "--steps", "2", "--warmup", "1", "--nproc", "2",
                      "--ep", "2", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["benchmark"] == "moe"
    (row,) = result["rows"]
    assert (row["status"], row["model"], row["dp"], row["ep"]) == ("ok", "tiny-moe:3", 2, 2), row
    assert row["mfu"] is None  # a CPU has no peak to divide by
    assert math.isclose(row["tokens_per_s"], 2 * 32 / row["step_time_s"], rel_tol=1e-6)
    moe = row["moe"]
    assert 1 <= moe["imbalance"] <= moe["imbalance_max"] <= 4 and moe["dropped"] == 0  # 4 experts, dropless
    assert row["est_step_time_s"] > 0 and row["est_ep_comm_s"] > 0 and row["est_imbalance"] > 1
    assert "| tiny-moe:3 | 1 | 2 x 2 | ok |" in proc.stdout


@pytest.mark.slow
def test_bench_estimate_cpu(tmp_path):
    out = tmp_path / "vs_probe.jsonl"
    proc = run_script("bench_estimate.py", "--probe", "cpu", "--steps", "1", "--calibrate", "--out", str(out))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3
    for r in records:
        assert r["status"] == "ok" and r["device"] == "cpu" and r["peak_mem_kind"] == "cpu_peak_rss_growth"
        assert r["step_time_s"] > 0 and r["peak_mem_bytes"] > 0
        assert r["est_step_time_s"] > 0 and r["est_allocated_bytes"] > 0
        assert r["cal_step_time_s"] > 0 and r["cal_allocated_bytes"] > 0  # leave-one-out calibrated
    # fit_calibration takes the records as they are written
    from autotune.estimate import fit_calibration
    from autotune.hardware import catalog_gpu

    assert fit_calibration(records, catalog_gpu("h100-sxm")).records == 3
    table = out.with_suffix(".md").read_text()
    assert "device: cpu" in table and "leave-one-out calibrated" in table and table.strip() in proc.stdout


@pytest.mark.slow
def test_bench_search_cpu(tmp_path):
    """Two grid plans, each probed twice; autotune and random replay them at a budget of 1 and 2
    trials; the pick measured again. Every figure of the table follows from the recorded runs."""
    run_script("bench_search.py", "--models", "tiny", "--global-batch", "4", "--seq-len", "32", "--budgets", "1", "2",
               "--seeds", "0", "--grid-limit", "2", "--repeats", "2", "--probe-steps", "1", "--warmup-steps", "1",
               "--methods", "autotune", "random", "--remeasure", "--out", str(tmp_path))
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["device"] == "cpu"
    entry = result["models"]["tiny"]
    grid = {g["key"]: g for g in map(json.loads, (tmp_path / "tiny" / "grid.jsonl").read_text().splitlines())}
    assert entry["grid"]["plans"] == len(grid) == 2 and entry["grid"]["partial"]
    assert all(len(g["runs"]) == 2 for g in grid.values())
    best = max(g["value"] for g in grid.values() if g["value"])
    assert entry["grid"]["best_tokens_per_s"] == best
    assert len(entry["runs"]) == 4 and {r["method"] for r in entry["runs"]} == {"autotune", "random"}
    for run in entry["runs"]:
        assert len(run["order"]) == run["trials"] <= run["trials_budget"]
        values = [(grid[k]["value"] or 0) if k in grid else 0 for k in run["order"]]  # off the partial grid: 0
        first = next((n for n, v in enumerate(values, 1) if v >= 0.97 * best), None)
        assert run["reached_at"] == first
        picked = (grid[run["pick"]]["value"] or 0) if run["pick"] in grid else 0
        assert run["pick_over_best"] == pytest.approx(picked / best)
        assert (run["pick_again_over_best"] > 0) == (run["pick"] in grid)

def test_bench_fp8_cpu(tmp_path):
    pytest.importorskip("torchao")
    out = tmp_path / "fp8.json"
    proc = run_script("bench_fp8.py", "--device", "cpu", "--shapes", "32x64x48", "--modes", "eager",
                      "--iters", "1", "--warmup", "1", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["smoke_run"] and result["benchmark"] == "fp8"
    kinds = [(r["kind"], r["recipe"]) for r in result["rows"]]
    assert kinds == [("gemm", "bf16"), ("gemm", "tensorwise"), ("gemm", "rowwise"),
                     ("linear_eager", "bf16"), ("linear_eager", "tensorwise"), ("linear_eager", "rowwise")]
    for r in result["rows"]:
        flops = (2 if r["kind"] == "gemm" else 6) * 32 * 64 * 48
        assert math.isclose(r["tflops"], flops / (r["ms"] / 1e3) / 1e12, rel_tol=1e-6)
    assert "| 32x64x48 | gemm | tensorwise |" in proc.stdout


def test_bench_cp_cpu(tmp_path):
    """One cp rank's ring blocks at a tiny size: what they save is the q, k, v, output and
    log-sum-exp of the rank's tokens (no scores); the cost model's figures are those of its plan."""
    out = tmp_path / "cp.json"
    proc = run_script("bench_cp.py", "--device", "cpu", "--seq", "64", "--cp", "1", "2", "3", "--heads", "4",
                      "--kv-heads", "2", "--iters", "1", "--warmup", "0", "--out", str(out))
    result = json.loads(out.read_text())
    one, two, three = result["rows"]
    assert three["status"] == "error" and "2 x cp = 6 equal chunks" in three["error"]
    for r in (one, two):
        s, d = r["tokens_per_rank"], 128  # llama-3-8b's head width
        assert r["status"] == "ok" and r["peak_bytes"] is None  # no memory figure on a CPU
        assert r["saved_bytes"] == s * (4 + 2 + 2 + 4) * d * 2 + 4 * s * 4  # bf16 q, k, v, out; fp32 lse
        assert r["model_bwd_ms"] == pytest.approx(2.5 * r["model_fwd_ms"], rel=1e-12)
    # the same attention FLOPs split over 2 ranks; the block's bytes are those of half the tokens,
    # less k and v's repeat over the 2 query heads of each kv head (the ring does not repeat them)
    assert two["model_fwd_ms"] < one["model_fwd_ms"]
    assert two["model_block_bytes"] == pytest.approx(one["model_block_bytes"] / 2 - 2 * 32 * 2 * 128 * 2, rel=1e-9)
    assert "| 64 | 2 |" in proc.stdout
