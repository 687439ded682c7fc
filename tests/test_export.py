"""`autotune export RUN_DIR --out DIR`: a trained run's checkpoint as a Hugging Face folder that
transformers loads with the engine's logits, and that `model.init_from` resumes."""
import json
import os
import subprocess
import sys

import pytest
import torch

from autotune.cli import main
from autotune.engine.config import build_train_config, to_yaml
from autotune.engine.data import micro_batches
from autotune.engine.hf import load_hf_weights
from autotune.engine.model import build_model
from autotune.export import load_checkpoint_model

transformers = pytest.importorskip("transformers")

LLAMA = dict(family="llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48, vocab_size=64, max_seq_len=32,
             rope_theta=500.0)
GPT2 = dict(family="gpt2", n_layers=2, d_model=32, n_heads=4, d_ff=128, vocab_size=64, max_seq_len=32,
            tie_embeddings=True)


def trained_run(tmp_path, model: dict, **plan):
    """`autotune train` of a tiny model for 3 steps (lr high enough to move every weight)."""
    cfg = build_train_config({
        "model": model, "plan": {"micro_batch": 2, **plan},
        "job": {"seq_len": 16, "global_batch": 4, "steps": 3, "out_dir": str(tmp_path / "run"),
                "optimizer": {"lr": 1e-2, "warmup_steps": 0}},
    })
    (tmp_path / "train.yaml").write_text(to_yaml(cfg))
    if cfg.plan.world_size == 1:
        assert main(["train", str(tmp_path / "train.yaml")]) == 0
    else:  # torchrun's ranks, in a process of their own
        done = subprocess.run([sys.executable, "-m", "autotune", "train", str(tmp_path / "train.yaml")],
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    return cfg


@pytest.mark.parametrize("family", [pytest.param("llama", marks=pytest.mark.slow), "gpt2"])
def test_export_gives_the_engines_logits_in_transformers(tmp_path, family):
    """llama: a dp=2 ZeRO-3 run (sharded checkpoint); gpt2: one process, tied embeddings."""
    plan = dict(dp=2, zero_stage=3) if family == "llama" else {}
    cfg = trained_run(tmp_path, LLAMA if family == "llama" else GPT2, **plan)
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    engine = load_checkpoint_model(tmp_path / "run" / "ckpt" / "step-3", cfg.model)
    initial = build_model(cfg.model, "cpu", seed=cfg.job.seed)
    for (name, a), (_, b) in zip(engine.named_parameters(), initial.named_parameters()):
        assert not torch.equal(a, b), f"{name} was not trained"  # the checkpoint's weights, not the seed's
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.dtype == torch.float32
    assert type(hf).__name__ == ("LlamaForCausalLM" if family == "llama" else "GPT2LMHeadModel")
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, engine(ids), rtol=0, atol=1e-5)

    # model.init_from of the folder: the same model, and training from it starts where the run ended
    resumed = build_model(cfg.model, "cpu", seed=7)
    load_hf_weights(resumed, tmp_path / "hf")
    for (name, a), (_, b) in zip(engine.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name
    dp = cfg.plan.dp
    batches = [b for rank in range(dp) for b in micro_batches(cfg.job, cfg.model, cfg.plan, 0, rank, dp)]
    with torch.no_grad():
        want = sum(engine(inputs, targets).item() for inputs, targets in batches) / len(batches)
    assert main(["train", str(tmp_path / "train.yaml"), f"model.init_from={tmp_path / 'hf'}", "plan.dp=1",
                 "plan.zero_stage=0", f"job.out_dir={tmp_path / 'again'}", "job.steps=1"]) == 0
    first = json.loads((tmp_path / "again" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(want, rel=1e-5)


def test_export_errors(tmp_path, capsys):
    cfg = trained_run(tmp_path, LLAMA)
    run = tmp_path / "run"
    capsys.readouterr()

    def error(*argv) -> str:
        assert main(["export", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.splitlines()) == 1, err
        return err

    assert "no complete checkpoint" in error(str(tmp_path), "--out", str(tmp_path / "a"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert "not an empty folder" in error(str(run), "--out", str(tmp_path / "full"))
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    (run / "config.yaml").rename(tmp_path / "moved.yaml")
    assert "--config" in error(str(run), "--out", str(tmp_path / "b"))
    other = build_train_config({"model": {**LLAMA, "d_ff": 64}, "job": {"seq_len": 16, "global_batch": 4}})
    (tmp_path / "other.yaml").write_text(to_yaml(other))
    assert "holds another model" in error(str(run), "--out", str(tmp_path / "c"), "--config", str(tmp_path / "other.yaml"))
    assert not any(p.name.startswith((".b.", ".c.", "b", "c")) for p in tmp_path.iterdir())
    # a step folder and an explicit config work too
    assert main(["export", str(run / "ckpt" / "step-3"), "--out", str(tmp_path / "d"),
                 "--config", str(tmp_path / "moved.yaml")]) == 0
    assert json.loads((tmp_path / "d" / "config.json").read_text())["model_type"] == "llama"
    assert cfg.model.family == "llama"
