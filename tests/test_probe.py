"""The probe's JSON contract, its progress lines, and "oom" (exit 0) under a memory cap it cannot meet."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from autotune.engine import probe
from autotune.engine.model import build_model
from autotune.engine.config import build_train_config

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(name="tiny", family="llama", n_layers=4, d_model=64, n_heads=4, n_kv_heads=2, d_ff=160,
            vocab_size=256, max_seq_len=128)
FIELDS = {
    "status", "step_time_s", "tokens_per_s", "tflops_per_gpu", "mfu", "peak_mem_bytes", "peak_mem_kind",
    "reserved_bytes", "loss_first", "loss_last", "device", "world_size", "versions", "breakdown", "error", "plan",
    "moe",
}


def write_config(tmp_path: Path, **plan) -> Path:
    cfg = {"model": TINY, "job": {"seq_len": 32, "global_batch": 8, "steps": 100, "out_dir": str(tmp_path / "never")},
           "plan": {"micro_batch": 4, **plan}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_probe_writes_its_whole_contract(tmp_path):
    config = write_config(tmp_path)
    out, progress = tmp_path / "m" / "metrics.json", tmp_path / "progress.jsonl"
    argv = [str(config), "--steps", "3", "--warmup", "1", "--out", str(out), "--progress", str(progress),
            "plan.activation_checkpointing=full"]
    # a fresh process, as the search runs it: the CPU peak is the resident-set growth of the run,
    # which a long-lived test process (memory freed by earlier tests) would not show
    run = subprocess.run([sys.executable, "-m", "autotune.engine.probe", *argv], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result) == FIELDS
    assert result["status"] == "ok" and result["error"] is None
    assert result["device"] == "cpu" and result["world_size"] == 1
    assert result["mfu"] is None and result["reserved_bytes"] is None  # no dense peak / allocator on a CPU
    assert result["moe"] is None  # a dense model (tests/test_moe.py probes a MoE one)
    assert result["peak_mem_kind"] == "cpu_peak_rss_growth" and result["peak_mem_bytes"] > 0
    assert result["plan"]["activation_checkpointing"] == "full" and result["plan"]["grad_accum"] == 2
    assert set(result["versions"]) == {"torch", "triton", "python"}
    lines = [json.loads(line) for line in progress.read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1, 2, 3]
    assert result["loss_first"] == lines[0]["loss"] and result["loss_last"] == lines[-1]["loss"]
    measured = sorted(line["step_time_s"] for line in lines[1:])
    assert result["step_time_s"] == measured[1]  # the median of the 3 measured steps
    assert result["tokens_per_s"] == pytest.approx(8 * 32 / result["step_time_s"])
    breakdown = result["breakdown"]
    assert set(breakdown) == {"forward_s", "backward_s", "forward_backward_s", "optimizer_s", "comm_s"}
    assert breakdown["comm_s"] is None and breakdown["forward_backward_s"] is None  # pp only
    for phase in ("forward_s", "backward_s", "optimizer_s"):  # medians of parts of the measured steps
        assert 0 < breakdown[phase] < measured[-1]
    # FLOPs per token: 6N + 12 L a d s, N the matmul weights: not the norms, nor the (untied) input embedding
    cfg = build_train_config({"model": TINY, "job": {"seq_len": 32}})
    n = sum(p.numel() for name, p in build_model(cfg.model, "meta").named_parameters()
            if p.dim() == 2 and name != "tok_emb.weight")
    flops = 6 * n + 12 * 4 * 4 * 16 * 32
    assert result["tflops_per_gpu"] == pytest.approx(result["tokens_per_s"] * flops / 1e12)
    assert not (tmp_path / "never").exists()  # the probe writes no checkpoint or metrics folder


@pytest.mark.slow
def test_memory_cap_it_cannot_meet_is_status_oom_and_exit_0(tmp_path):
    config = write_config(tmp_path)
    out = tmp_path / "metrics.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, "-m", "autotune.engine.probe", str(config), "--steps", "2", "--warmup", "0", "--out", str(out),
         "--max-memory-bytes", str(2**20)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert set(result) == FIELDS
    assert result["status"] == "oom" and "allocate" in result["error"]
    assert result["plan"]["micro_batch"] == 4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_probe_config_error_is_reported_and_exit_2(tmp_path, capsys):
    config = write_config(tmp_path)
    out = tmp_path / "metrics.json"
    assert probe.main([str(config), "--steps", "1", "--out", str(out), "plan.micro_batch=3"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    result = json.loads(out.read_text())
    assert result["status"] == "error" and "micro_batch=3" in result["error"]


def test_probe_over_its_time_limit_reports_timeout_with_what_it_measured(tmp_path):
    config = write_config(tmp_path)
    out = tmp_path / "metrics.json"
    assert probe.main([str(config), "--steps", "5", "--warmup", "0", "--timeout", "1e-9", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["status"] == "timeout" and result["step_time_s"] > 0  # stopped after one measured step


def test_probe_refuses_an_unwritable_out_before_running(tmp_path, capsys):
    config = write_config(tmp_path)
    (tmp_path / "a-file").write_text("mine\n")
    for out in (tmp_path, tmp_path / "a-file" / "metrics.json"):
        with pytest.raises(SystemExit) as exit:
            probe.main([str(config), "--steps", "1", "--out", str(out)])
        assert exit.value.code == 2 and f"--out {out}: not a file path" in capsys.readouterr().err
    assert (tmp_path / "a-file").read_text() == "mine\n" and not list(tmp_path.glob(".*"))


def test_a_failed_rank_keeps_the_result_written_first(tmp_path):
    """The first rank to fail tells what happened; a success replaces whatever is there."""
    out = tmp_path / "metrics.json"
    probe.write_result(str(out), {"status": "oom"}, exclusive=True)
    probe.write_result(str(out), {"status": "error"}, exclusive=True)
    assert json.loads(out.read_text()) == {"status": "oom"}
    probe.write_result(str(out), {"status": "ok"}, exclusive=False)
    assert json.loads(out.read_text()) == {"status": "ok"}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temp file left
