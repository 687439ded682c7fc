"""autotune.emit: best.yaml, ds_config.json and launch.sh for a chosen plan, written atomically."""
from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

import autotune.emit as emit
from autotune.engine import files
from autotune.config import ClusterConfig
from autotune.engine.config import ConfigError, PlanConfig, TrainConfig, build_train_config, load_train_config

FILES = ("best.yaml", "ds_config.json", "launch.sh")


def train_config(global_batch: int = 8, **plan) -> TrainConfig:
    return build_train_config({"job": {"global_batch": global_batch}, "plan": plan})


def test_best_yaml_round_trips_through_the_engine_loader(tmp_path):
    cfg = train_config(zero_stage=2, micro_batch=2, precision="bf16", activation_checkpointing="full")
    emit.write_outputs(tmp_path, cfg, ClusterConfig(gpus_per_node=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)
    loaded = load_train_config(tmp_path / "best.yaml")
    assert loaded == cfg
    assert loaded.plan.grad_accum == 4


PLANS = [
    dict(zero_stage=0, precision="fp32"),
    dict(zero_stage=1, precision="bf16", offload_optimizer=True, micro_batch=2),
    dict(zero_stage=2, precision="fp16", dp=2),
    dict(zero_stage=3, precision="bf16", offload_optimizer=True, offload_params=True, activation_checkpointing="full"),
    dict(zero_stage=3, precision="fp16", loss_scale="1024", dp=4, micro_batch=2),
]


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"zero{p['zero_stage']}-{p['precision']}")
def test_ds_config_carries_the_plan(plan):
    cfg = train_config(global_batch=16, **plan)
    ds = emit.ds_config(cfg)
    p, opt = cfg.plan, cfg.job.optimizer
    assert ds["train_batch_size"] == 16
    assert ds["train_micro_batch_size_per_gpu"] == p.micro_batch
    assert ds["gradient_accumulation_steps"] * p.micro_batch * p.dp == 16
    zero = ds["zero_optimization"]
    assert zero["stage"] == p.zero_stage
    assert ("offload_optimizer" in zero) == p.offload_optimizer
    assert ("offload_param" in zero) == p.offload_params
    if p.offload_optimizer:
        assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert ds["bf16"]["enabled"] == (p.precision == "bf16")
    assert ds["fp16"]["enabled"] == (p.precision == "fp16")
    if p.precision == "fp16":
        assert ds["fp16"]["loss_scale"] == (0 if p.loss_scale == "dynamic" else float(p.loss_scale))
        assert ds["fp16"]["initial_scale_power"] == 16
    assert ds["gradient_clipping"] == opt.grad_clip
    assert ds["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": opt.lr, "betas": [opt.beta1, opt.beta2], "eps": opt.eps, "weight_decay": opt.weight_decay,
                   "torch_adam": True},
    }
    assert "scheduler" not in ds  # the engine's schedule is none of DeepSpeed's: the training script's
    assert ("activation_checkpointing" in ds) == (p.activation_checkpointing != "none")
    json.dumps(ds)  # plain JSON types only


def test_ds_config_checkpointing_counts_blocks():
    cfg = build_train_config({"model": {"n_layers": 5}, "plan": {"activation_checkpointing": "selective", "checkpoint_every_k": 2}})
    assert emit.ds_config(cfg)["activation_checkpointing"]["number_checkpoints"] == 3  # blocks 0, 2, 4


@pytest.mark.parametrize("mode, says", [("op", "no per-operator policy"), ("attention", "core attention")])
def test_ds_config_says_deepspeeds_nearest_checkpointing(mode, says):
    cfg = build_train_config({"model": {"n_layers": 5}, "plan": {"activation_checkpointing": mode}})
    ds = emit.ds_config(cfg)
    assert ds["activation_checkpointing"]["number_checkpoints"] == 5 and says in ds["autotune"]["note"]


def test_ds_config_does_not_claim_tensor_or_pipeline_parallel():
    cfg = train_config(dp=1, tp=2, pp=2)
    ds = emit.ds_config(cfg)
    extra = ds["autotune"]
    assert (extra["tensor_parallel"], extra["pipeline_parallel"], extra["data_parallel"]) == (2, 2, 1)
    assert "mpu" in extra["note"] and "tensor_parallel=2" in extra["note"]
    # batch size is per data-parallel rank group, as DeepSpeed with an mpu counts it
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 1


@pytest.mark.parametrize("plan", [*PLANS, dict(zero_stage=2, precision="bf16", dp=2, tp=2, pp=2, micro_batch=2)],
                         ids=lambda p: f"zero{p['zero_stage']}-{p['precision']}-dp{p.get('dp', 1)}")
def test_ds_config_accepted_by_deepspeed(plan, monkeypatch):
    """DeepSpeed's own parser (`DeepSpeedConfig`, what `deepspeed.initialize` builds) reads the plan back
    (deepspeed is a test extra; tests/test_deepspeed.py trains under it)."""
    runtime_config = pytest.importorskip("deepspeed.runtime.config")
    cfg = train_config(global_batch=16, **plan)
    p = cfg.plan

    class DataParallelOnly:  # DeepSpeed asks an mpu for the data-parallel world size
        def get_data_parallel_world_size(self):
            return p.dp

    # Without a process group DeepSpeed's parser falls back to a world of 1 and ignores the mpu:
    # stand in for rank 0 of an initialised job so that the mpu's dp size is what it checks against.
    monkeypatch.setattr(runtime_config.dist, "get_rank", lambda: 0)
    parsed = runtime_config.DeepSpeedConfig(emit.ds_config(cfg), mpu=DataParallelOnly())
    assert parsed.world_size == p.dp
    assert (parsed.train_batch_size, parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps) == (
        16, p.micro_batch, p.grad_accum)
    assert parsed.zero_optimization_stage == p.zero_stage
    zero = parsed.zero_config
    assert (zero.offload_optimizer is not None and zero.offload_optimizer.device == "cpu") == p.offload_optimizer
    assert (zero.offload_param is not None and zero.offload_param.device == "cpu") == p.offload_params
    assert parsed.float16_config.enabled == (p.precision == "fp16")
    assert parsed.bfloat16_config.enabled == (p.precision == "bf16")
    if p.precision == "fp16":
        assert parsed.float16_config.loss_scale == (0 if p.loss_scale == "dynamic" else float(p.loss_scale))
    assert parsed.gradient_clipping == cfg.job.optimizer.grad_clip
    assert parsed.optimizer_name == "adamw" and parsed.optimizer_params["lr"] == cfg.job.optimizer.lr


def fake_torchrun(tmp_path: Path) -> dict[str, str]:
    """A `torchrun` on PATH that prints its arguments, one per line, instead of training."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "torchrun"
    tool.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    tool.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NODEID")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env


def run_launch(script: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(script), *args], env=env, capture_output=True, text=True, timeout=30)


def test_launch_single_node(tmp_path):
    out = tmp_path / "run"
    emit.write_outputs(out, train_config(dp=2), ClusterConfig(gpus_per_node=4))
    script = out / "launch.sh"
    assert script.stat().st_mode & stat.S_IXUSR
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "set -euo pipefail" in script.read_text()
    done = run_launch(script, fake_torchrun(tmp_path), "job.steps=3")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "--standalone", "--nproc_per_node=2", "-m", "autotune.engine.train", str(out.resolve() / "best.yaml"), "job.steps=3",
    ]


def test_launch_multi_node(tmp_path):
    out = tmp_path / "run"
    emit.write_outputs(out, train_config(global_batch=16, dp=8, tp=2), ClusterConfig(gpus_per_node=8, nodes=2))
    script = out / "launch.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = fake_torchrun(tmp_path)
    done = run_launch(script, {**env, "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.7"})
    assert done.returncode == 0, done.stderr
    args = done.stdout.splitlines()
    for expected in ("--nnodes=2", "--nproc_per_node=8", "--node_rank=1", "--rdzv_backend=c10d",
                     "--rdzv_endpoint=10.0.0.7:29500", "autotune.engine.train", str(out.resolve() / "best.yaml")):
        assert expected in args
    missing = run_launch(script, env)  # no MASTER_ADDR: refuse rather than hang at rendezvous
    assert missing.returncode != 0 and "MASTER_ADDR" in missing.stderr


def test_launch_refuses_plans_the_cluster_cannot_hold():
    with pytest.raises(ConfigError, match="needs dp x cp x tp x pp = 4 GPUs"):
        emit.launch_script(train_config(dp=4), ClusterConfig(gpus_per_node=2, nodes=1))
    with pytest.raises(ConfigError, match="whole nodes"):
        emit.launch_script(train_config(global_batch=6, dp=3), ClusterConfig(gpus_per_node=2, nodes=2))


def test_invalid_plan_writes_nothing(tmp_path):
    bad = train_config()
    bad.plan = PlanConfig(micro_batch=3)  # 8 sequences do not split into micro-batches of 3
    with pytest.raises(ConfigError, match="not divisible"):
        emit.write_outputs(tmp_path, bad, ClusterConfig())
    assert list(tmp_path.iterdir()) == []


def test_failure_while_rendering_keeps_the_old_files(tmp_path, monkeypatch):
    emit.write_outputs(tmp_path, train_config(), ClusterConfig())
    before = {name: (tmp_path / name).read_bytes() for name in FILES}

    def broken(cfg):
        raise RuntimeError("serialisation failed")

    monkeypatch.setattr(emit, "ds_config", broken)
    with pytest.raises(RuntimeError):
        emit.write_outputs(tmp_path, train_config(zero_stage=1, micro_batch=4), ClusterConfig())
    assert {name: (tmp_path / name).read_bytes() for name in FILES} == before


def test_failure_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "ds_config.json"
    files.write_atomic(target, "old\n")

    def fail(fd):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        files.write_atomic(target, "new and longer\n")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["ds_config.json"]  # no temp file left behind


def test_emit_command(tmp_path, capsys):
    """`autotune emit CONFIG --out DIR [overrides]`: any training config, the three files; a mistake
    is one error line and nothing is written; a file of other contents in DIR is kept."""
    from autotune.cli import main

    (tmp_path / "train.yaml").write_text(emit.to_yaml(train_config(global_batch=16, dp=2, tp=2)))
    out = tmp_path / "out"
    assert main(["emit", str(tmp_path / "train.yaml"), "--out", str(out), "plan.zero_stage=3"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert load_train_config(out / "best.yaml").plan.zero_stage == 3
    assert json.loads((out / "ds_config.json").read_text())["zero_optimization"]["stage"] == 3
    assert "--nproc_per_node=4" in (out / "launch.sh").read_text()
    assert main(["emit", str(tmp_path / "train.yaml"), "--out", str(out), "plan.zero_stage=3"]) == 0  # same files
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    for argv, words in [
        (["plan.zero_stage=2"], "best.yaml exists with other contents"),
        (["plan.micro_batch=3"], "not divisible"),
        (["--gpus-per-node", "3"], "whole nodes"),
        (["plan.zero_stage=5"], "plan.zero_stage=5"),
    ]:
        assert main(["emit", str(tmp_path / "train.yaml"), "--out", str(out), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and len(err.splitlines()) == 1, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(["emit", str(tmp_path / "train.yaml"), "--out", str(tmp_path / "two"), "--gpus-per-node", "2"]) == 0
    assert "--nnodes=2" in (tmp_path / "two" / "launch.sh").read_text()
    assert main(["emit", str(tmp_path / "nowhere.yaml"), "--out", str(tmp_path / "three")]) == 2
    assert not (tmp_path / "three").exists()
