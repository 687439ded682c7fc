"""The training command: SIGTERM saves and resume continues the same trajectory, checkpoints are
atomic and reshard across ZeRO stages, and a user's mistake is one `error:` line, exit 2, no output."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from autotune.cli import main as autotune_main
from autotune.engine.checkpoint import COMPLETE, LATEST, check_readable, latest_checkpoint
from autotune.engine.config import ConfigError, load_train_config

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(name="tiny", family="llama", n_layers=4, d_model=64, n_heads=4, n_kv_heads=2, d_ff=160,
            vocab_size=256, max_seq_len=128)


def write_config(tmp_path: Path, steps: int = 6, out: str = "run", **plan) -> Path:
    cfg = {
        "model": TINY,
        "job": {"seq_len": 32, "global_batch": 8, "steps": steps, "out_dir": str(tmp_path / out),
                "optimizer": {"warmup_steps": 2}},
        "plan": {"micro_batch": 8, **plan},
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def by_step(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records}


ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


@pytest.mark.slow
def test_sigterm_saves_and_resume_continues_the_same_trajectory(tmp_path):
    """`autotune train` on 2 ranks (it launches torchrun), SIGTERM to it after step 3: the workers
    save and it exits 0; rerunning resumes, and every step equals a single-process run's."""
    steps = 20  # enough that the signal lands mid-run
    reference = write_config(tmp_path, steps=steps, out="reference")
    assert autotune_main(["train", str(reference)]) == 0
    config = write_config(tmp_path, steps=steps, zero_stage=2, dp=2, micro_batch=4)
    command = [sys.executable, "-m", "autotune", "train", str(config)]

    out = tmp_path / "run"
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not ((out / "metrics.jsonl").exists() and len(metrics(out)) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert "stopped by SIGTERM" in stdout
    stopped_at = len(metrics(out))
    assert 3 <= stopped_at < steps
    assert latest_checkpoint(out / "ckpt").name == f"step-{stopped_at}"

    resumed = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out / 'ckpt' / f'step-{stopped_at}'}" in resumed.stdout
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    expected = by_step(metrics(tmp_path / "reference"))
    for step, loss in by_step(records).items():
        assert loss == pytest.approx(expected[step], rel=1e-5), step


@pytest.mark.parametrize(
    "first, second",
    [
        (["plan.zero_stage=1"], ["plan.zero_stage=0"]),
        (["plan.zero_stage=1", "plan.offload_optimizer=true"], ["plan.zero_stage=3", "plan.micro_batch=4"]),
    ],
)
def test_resume_under_another_plan(tmp_path, capsys, first, second):
    """A checkpoint of step 3 resumes under another ZeRO stage (and micro-batch) on the same trajectory."""
    config = write_config(tmp_path)
    assert autotune_main(["train", str(config), "job.checkpoint_every=3", *first]) == 0
    out = tmp_path / "run"
    reference = by_step(metrics(out))
    shutil.rmtree(out / "ckpt" / "step-6")  # `latest` now names a missing folder: step-3 is the newest
    assert autotune_main(["train", str(config), *second]) == 0
    records = metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # steps 4..6 logged once, by the resumed run
    for step, loss in by_step(records).items():
        assert loss == pytest.approx(reference[step], rel=1e-5), step
    assert set(records[0]) == {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_bytes"}
    assert all(r["tokens_per_s"] > 0 and r["peak_mem_bytes"] >= 0 and r["mfu"] is None for r in records)  # CPU: no peak
    # the lr a step ran with: linear warmup over 2 steps, then cosine to 0.1 x lr at step 6
    cosine = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (i - 2) / 4)) for i in range(2, 6)]
    assert [r["lr"] for r in records] == pytest.approx([3e-4 * f for f in [0.5, 1.0, *cosine]], rel=1e-6)
    assert autotune_main(["train", str(config), *second]) == 0  # done already: says so, changes nothing
    assert "nothing to train: job.steps=6 is reached" in capsys.readouterr().out
    assert metrics(out) == records
    # a new out_dir continued from this run's step 3 (job.resume_from): the same steps 4..6
    moved = tmp_path / "moved"
    assert autotune_main(["train", str(config), *second, f"job.out_dir={moved}",
                          f"job.resume_from={out / 'ckpt' / 'step-3'}"]) == 0
    assert by_step(metrics(moved)) == pytest.approx({s: reference[s] for s in (4, 5, 6)}, rel=1e-5)


def test_the_mfu_divides_by_the_gpu_catalogs_peak():
    """The engine's MFU uses conf/gpu's dense peak of the device it runs on, matched by the CUDA
    device name; a CPU or a GPU the catalog lacks logs none (never a made-up MFU)."""
    import torch

    from autotune.engine.train import peak_flops
    from autotune.hardware import CUDA_NAMES, catalog_gpu, catalog_gpu_of, gpu_catalog

    assert {entry for _, entry in CUDA_NAMES} == set(gpu_catalog())  # every entry has its device names
    for name, entry in [("NVIDIA H100 80GB HBM3", "h100-sxm"), ("NVIDIA H100 PCIe", "h100-pcie"),
                        ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-40GB", "a100-40g"),
                        ("NVIDIA A100 80GB PCIe", "a100-80g"), ("NVIDIA L4", "l4"), ("NVIDIA L40S", "l40s")]:
        assert catalog_gpu_of(name) == catalog_gpu(entry), name
    assert catalog_gpu_of("NVIDIA B200") is None and catalog_gpu_of("cpu") is None
    assert peak_flops(torch.device("cpu"), "bf16") is None


def test_unfinished_checkpoints_are_never_resumed_from(tmp_path):
    root = tmp_path / "ckpt"
    for name, complete in (("step-2", True), ("step-4", False), ("step-6.tmp", True)):
        (root / name).mkdir(parents=True)
        (root / name / ".metadata").write_bytes(b"x")
        if complete:
            (root / name / COMPLETE).write_text("done\n")
    assert latest_checkpoint(root) == root / "step-2"
    (root / LATEST).write_text("step-4\n")  # names an unfinished one: ignored
    assert latest_checkpoint(root) == root / "step-2"
    assert latest_checkpoint(tmp_path / "none") is None


def assert_user_error(capsys, argv: list[str], *words: str) -> str:
    assert autotune_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for word in words:
        assert word in err[0]
    return err[0]


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["model.family=gpt3"], ["model.family"]),
        (["model.hf_config=/no/such/config.json"], ["model.hf_config"]),
        (["plan.micro_batch=3"], ["job.global_batch=8", "micro_batch=3"]),
        (["plan.dp=3"], ["plan.dp=3"]),
        (["job.data.source=/no/such/tokens.bin"], ["/no/such/tokens.bin"]),
        (["model=gpt2"], ["'model=gpt2'", "section.key=value"]),  # a Hydra group choice: not in a saved config
        (["job.steps=1.5"], ["job.steps"]),
        (["job.log_every=0"], ["job.log_every=0"]),
        (["job.optimizer.lr=-1"], ["job.optimizer.lr"]),
        (["job.resume_from=/no/such/run"], ["job.resume_from=/no/such/run", "no complete checkpoint"]),
    ],
)
def test_bad_input_is_one_error_line_and_no_output(tmp_path, capsys, overrides, words):
    config = write_config(tmp_path)
    assert_user_error(capsys, ["train", str(config), *overrides], *words)
    assert not (tmp_path / "run").exists()


def test_a_config_that_is_not_yaml_is_one_error_line(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("model: [\n")
    assert_user_error(capsys, ["train", str(tmp_path / "bad.yaml")], "cannot read", "line 2")
    (tmp_path / "list.yaml").write_text("- model\n")
    assert_user_error(capsys, ["train", str(tmp_path / "list.yaml")], "not a training config")


@pytest.mark.parametrize("damage", ["metadata", "shard"])
def test_corrupt_checkpoint_is_a_user_error(tmp_path, capsys, damage):
    config = write_config(tmp_path, steps=2)
    assert autotune_main(["train", str(config)]) == 0
    capsys.readouterr()
    out = tmp_path / "run"
    ckpt = out / "ckpt" / "step-2"
    if damage == "metadata":
        # another model's checkpoint (DCP alone would load the 4 layers a 5-layer model shares with it)
        assert_user_error(capsys, ["train", str(config), "model.n_layers=5"], str(ckpt), "another model", "layers.4")
        (ckpt / ".metadata").write_bytes(b"not a checkpoint")
    else:
        shard = next(ckpt.glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[:100])
        # found from the metadata, before any process is launched
        with pytest.raises(ConfigError, match=f"{shard.name} is 100 bytes of"):
            check_readable(ckpt, load_train_config(config).model)
    before = (out / "metrics.jsonl").read_text()
    message = assert_user_error(capsys, ["train", str(config), "job.steps=4"], str(ckpt), "job.resume=false")
    assert "delete" in message
    assert (out / "metrics.jsonl").read_text() == before  # nothing appended
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == [LATEST, "step-2"]
    # the way out the message names works
    assert autotune_main(["train", str(config), "job.steps=4", "job.resume=false"]) == 0


@pytest.mark.slow
def test_cli_error_is_one_line_from_a_real_process(tmp_path):
    config = write_config(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "autotune", "train", str(config), "plan.micro_batch=3"],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ")
    assert not (tmp_path / "run").exists()
