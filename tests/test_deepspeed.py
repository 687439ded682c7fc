"""The emitted ds_config against the real DeepSpeed: every key is one DeepSpeed reads, and DeepSpeed's
engine trains the engine's model and data on the same trajectory as the engine (2 gloo ranks)."""
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from autotune.cli import main
from autotune.emit import ds_config
from autotune.engine.config import build_train_config, to_yaml

deepspeed = pytest.importorskip("deepspeed")
from deepspeed.runtime import config as ds_runtime_config  # noqa: E402
from deepspeed.runtime.config_utils import DeepSpeedConfigModel  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NOTE_KEY = "autotune"  # the documented key DeepSpeed ignores (autotune.emit._not_deepspeed)


def train_config(steps: int = 5, **plan):
    return build_train_config({
        "model": {"n_layers": 2},
        "job": {"seq_len": 16, "global_batch": 8, "steps": steps, "optimizer": {"lr": 1e-3, "eps": 1e-2, "warmup_steps": 2, "grad_clip": 0.5}},
        "plan": {"dp": 2, "micro_batch": 2, **plan},
    })


# --- every key the emitter writes is one DeepSpeed reads -----------------------------------------

class Recorder(dict):
    """A config dict that notes each key DeepSpeed's parser looks up (nested dicts too)."""

    def __init__(self, data: dict, read: set, prefix: str = ""):
        super().__init__(data)
        self.read, self.prefix = read, prefix

    def __getitem__(self, key):
        self.read.add(self.prefix + key)
        value = super().__getitem__(key)
        return Recorder(value, self.read, f"{self.prefix}{key}.") if isinstance(value, dict) else value

    def get(self, key, default=None):
        return self[key] if super().__contains__(key) else default

    def __contains__(self, key):
        self.read.add(self.prefix + key)
        return super().__contains__(key)


def unknown_to_model(section: dict, model: type[DeepSpeedConfigModel], prefix: str) -> list[str]:
    """Keys of `section` that are not live fields of DeepSpeed's pydantic config class (a deprecated
    field is read only to be moved or ignored), nested config classes walked too."""
    fields = {}
    for name, info in model.model_fields.items():
        fields[name] = info
        if info.alias:
            fields[info.alias] = info
    bad = []
    for key, value in section.items():
        info = fields.get(key)
        if info is None or (info.json_schema_extra or {}).get("deprecated"):
            bad.append(prefix + key)
            continue
        nested = [t for t in (info.annotation, *getattr(info.annotation, "__args__", ()))
                  if isinstance(t, type) and issubclass(t, DeepSpeedConfigModel)]
        if isinstance(value, dict) and nested:
            bad += unknown_to_model(value, nested[0], f"{prefix}{key}.")
    return bad


def unread_keys(ds: dict, dp: int, monkeypatch) -> list[str]:
    """The keys of `ds` that DeepSpeed does not read, as its own classes say."""

    class DataParallelOnly:
        def get_data_parallel_world_size(self):
            return dp

    monkeypatch.setattr(ds_runtime_config.dist, "get_rank", lambda: 0)  # as rank 0 of a launched job
    read: set = set()
    parsed = ds_runtime_config.DeepSpeedConfig(Recorder(ds, read), mpu=DataParallelOnly())
    bad = [key for key in ds if key not in read and key != NOTE_KEY]
    # sections DeepSpeed parses with pydantic classes that forbid unknown keys: each key a live field
    for key, model in (("zero_optimization", type(parsed.zero_config)), ("fp16", type(parsed.float16_config)),
                       ("bf16", type(parsed.bfloat16_config))):
        bad += unknown_to_model(ds.get(key, {}), model, f"{key}.")
    # activation_checkpointing is read key by key (recorded); the optimizer's params go to the
    # optimizer DeepSpeed builds (torch's AdamW, as torch_adam asks), less the keys DeepSpeed pops
    bad += [f"activation_checkpointing.{k}" for k in ds.get("activation_checkpointing", {})
            if f"activation_checkpointing.{k}" not in read]
    bad += [f"optimizer.{k}" for k in ds["optimizer"] if f"optimizer.{k}" not in read]
    accepted = set(inspect.signature(torch.optim.AdamW).parameters) | {"torch_adam", "adam_w_mode"}
    bad += [f"optimizer.params.{k}" for k in ds["optimizer"]["params"] if k not in accepted]
    return bad


PLANS = [
    dict(zero_stage=0),
    dict(zero_stage=1, offload_optimizer=True, precision="bf16"),
    dict(zero_stage=2, precision="fp16", loss_scale="1024"),
    dict(zero_stage=2, precision="fp16", activation_checkpointing="selective"),
    dict(zero_stage=3, offload_optimizer=True, offload_params=True, activation_checkpointing="full"),
    dict(zero_stage=3, dp=4, dp_replicate=2),  # hybrid sharding: ZeRO++ hierarchical partitioning
    dict(zero_stage=2, precision="bf16", reduce_dtype="bf16"),  # communication_data_type
]


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: "-".join(f"{k}={v}" for k, v in p.items()))
def test_every_emitted_key_is_read_by_deepspeed(plan, monkeypatch):
    ds = ds_config(train_config(**plan))
    assert unread_keys(ds, plan.get("dp", 2), monkeypatch) == []


def test_the_walk_finds_keys_deepspeed_ignores(monkeypatch):
    """The walk can fail: a misspelt top-level key, a deprecated ZeRO key, an unknown optimizer param."""
    ds = ds_config(train_config(zero_stage=3))
    ds["gradient_clip"] = 1.0
    ds["zero_optimization"]["cpu_offload"] = True  # deprecated: read only to be moved
    ds["optimizer"]["params"]["max_grad_norm"] = 1.0
    assert sorted(unread_keys(ds, 2, monkeypatch)) == [
        "gradient_clip", "optimizer.params.max_grad_norm", "zero_optimization.cpu_offload"]


# --- DeepSpeed's engine follows the engine's ---------------------------------------------------------

FP32 = {f"zero{z}": dict(zero_stage=z) for z in range(4)} | {
    "zero3-checkpointing": dict(zero_stage=3, activation_checkpointing="full"),
    "zero1-offload": dict(zero_stage=1, offload_optimizer=True),
    "zero2-offload": dict(zero_stage=2, offload_optimizer=True),
    "zero3-offload": dict(zero_stage=3, offload_optimizer=True, offload_params=True),
}
BF16 = {"zero0-bf16": dict(zero_stage=0, precision="bf16"), "zero2-bf16": dict(zero_stage=2, precision="bf16")}


@pytest.fixture(scope="module")
def trajectories(tmp_path_factory):
    """One 2-rank launch: every case trained by DeepSpeed's engine and by the engine."""
    tmp = tmp_path_factory.mktemp("deepspeed")
    cases = {name: as_dict(train_config(**plan)) for name, plan in (FP32 | BF16).items()}
    (tmp / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "tests" / "deepspeed_worker.py"), str(tmp / "cases.json"), str(tmp / "out")],
        env=env, capture_output=True, text=True, timeout=400, cwd=tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "deepspeed_shm_comm" not in done.stdout + done.stderr  # training compiles no inference op
    return tmp / "out"


def as_dict(cfg) -> dict:
    return OmegaConf.to_container(OmegaConf.create(to_yaml(cfg)))


def metrics(folder: Path) -> list[dict]:
    errors = folder.parent / "error.txt"
    assert not errors.exists(), errors.read_text()
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("case", FP32)
def test_deepspeed_follows_the_engine_fp32(trajectories, case):
    """fp32, micro-batch 2 x accumulation 2 x dp 2, clipping at 0.5 (below the norm: it clips):
    the losses within 1e-4 at every step, the same lr schedule, the same gradient norms. Adam's eps
    is 1e-2, near the gradients' size, so that the update depends on their scale: with a tiny eps
    Adam undoes the clipping's scale and a run that does not clip would pass too."""
    ours, theirs = metrics(trajectories / case / "engine"), metrics(trajectories / case / "deepspeed")
    assert [r["step"] for r in theirs] == [1, 2, 3, 4, 5] and set(theirs[0]) == set(ours[0])
    for a, b in zip(ours, theirs):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (case, a["step"])
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-12)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert all(r["grad_norm"] > 0.5 for r in ours)  # clipping was active
    assert theirs[-1]["loss"] < theirs[0]["loss"]


@pytest.mark.slow
@pytest.mark.parametrize("case", BF16)
def test_deepspeed_trains_bf16(trajectories, case):
    """bf16: DeepSpeed keeps bf16 weights with fp32 master copies, the engine fp32 weights under
    autocast; the same trajectory within bf16's rounding."""
    ours, theirs = metrics(trajectories / case / "engine"), metrics(trajectories / case / "deepspeed")
    for a, b in zip(ours, theirs, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-2
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-12)


# --- the command ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_autotune_train_deepspeed_command(tmp_path):
    """`autotune emit` then `autotune train CONFIG --deepspeed ds_config.json`: torchrun's 2 ranks,
    the engine's metrics.jsonl."""
    cfg = train_config(steps=2, zero_stage=2)
    (tmp_path / "train.yaml").write_text(to_yaml(cfg))
    assert main(["emit", str(tmp_path / "train.yaml"), "--out", str(tmp_path / "emitted")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "autotune", "train", "emitted/best.yaml", "--deepspeed", "emitted/ds_config.json",
         f"job.out_dir={tmp_path / 'run'}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert set(records[0]) == {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_bytes"}


def test_command_errors(tmp_path, capsys, monkeypatch):
    """Each mistake is one error line, before any process is launched or a file written."""
    cfg = train_config(zero_stage=2)
    (tmp_path / "train.yaml").write_text(to_yaml(cfg))
    ds = ds_config(cfg)
    out = tmp_path / "run"

    def error(ds_text: str, *overrides: str) -> str:
        (tmp_path / "ds.json").write_text(ds_text)
        capsys.readouterr()
        assert main(["train", str(tmp_path / "train.yaml"), "--deepspeed", str(tmp_path / "ds.json"),
                     f"job.out_dir={out}", *overrides]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.splitlines()) == 1, err
        assert not out.exists()
        return err

    assert "cannot read" in error("{not json")
    assert "train_micro_batch_size_per_gpu=4 but the training config has 2" in error(
        json.dumps(ds | {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1}))
    assert "data parallel only" in error(json.dumps(ds), "plan.tp=2", "plan.dp=1")
    assert "communication_data_type=bf16 but the training config has plan.reduce_dtype=fp32" in error(
        json.dumps(ds | {"communication_data_type": "bf16"}))
    if not torch.cuda.is_available():
        from deepspeed.accelerator import get_accelerator
        # a CPU with AVX512-FP16/AMX does train fp16: the refusal is checked as on one that does not
        monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: False)
        assert "does not train fp16" in error(json.dumps(ds | {"fp16": {"enabled": True}}))
    capsys.readouterr()
    assert main(["train", str(tmp_path / "train.yaml"), "--deepspeed", str(tmp_path / "none.json")]) == 2
    assert "no such file" in capsys.readouterr().err
