import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from autotune.engine.config import ConfigError, build_train_config
from autotune.engine.data import check_vocab, main, micro_batches, prepare, synthetic_offsets, token_file
from autotune.engine.model import build_model


def config(source="synthetic", dtype="uint16", global_batch=8, micro=1, dp=1, seq_len=16, vocab=256):
    return build_train_config({
        "model": {"vocab_size": vocab},
        "job": {"seq_len": seq_len, "global_batch": global_batch, "data": {"source": source, "dtype": dtype}},
        "plan": {"micro_batch": micro, "dp": dp},
    })


def global_batch(cfg, step):
    """The step's inputs and targets, concatenated over dp ranks and micro-batches."""
    dp = cfg.plan.dp
    parts = [mb for r in range(dp) for mb in micro_batches(cfg.job, cfg.model, cfg.plan, step, r, dp)]
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


@pytest.fixture
def token_bin(tmp_path):
    path = tmp_path / "tokens.bin"
    np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint16).tofile(path)
    return path


@pytest.mark.parametrize("source", ["synthetic", "file"])
def test_global_batch_independent_of_split(source, token_bin):
    src = str(token_bin) if source == "file" else "synthetic"
    ref = global_batch(config(src), step=3)
    for micro, dp in [(2, 1), (8, 1), (1, 2), (2, 2), (2, 4), (1, 8)]:
        cfg = config(src, micro=micro, dp=dp)
        got = global_batch(cfg, step=3)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), (micro, dp)
        mbs = micro_batches(cfg.job, cfg.model, cfg.plan, 3, 0, dp)
        assert len(mbs) == cfg.plan.grad_accum
        for x, y in mbs:
            assert x.shape == y.shape == (micro, 16) and x.dtype == y.dtype == torch.int64


@pytest.mark.parametrize("source", ["synthetic", "file"])
def test_targets_are_inputs_shifted_and_steps_differ(source, token_bin):
    cfg = config(str(token_bin) if source == "file" else "synthetic")
    x, y = global_batch(cfg, 0)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert int(x.max()) < 256 and int(x.min()) >= 0
    assert not torch.equal(x, global_batch(cfg, 1)[0])
    assert torch.equal(x, global_batch(cfg, 0)[0])  # deterministic
    assert len({tuple(r.tolist()) for r in x}) == len(x)  # rows differ


def test_synthetic_depends_on_seed_and_follows_offsets():
    a = config()
    b = build_train_config({"job": {"seq_len": 16, "global_batch": 8, "seed": 7}})
    xa, xb = global_batch(a, 0)[0], global_batch(b, 0)[0]
    assert not torch.equal(xa, xb)
    # every step of the walk is one of the seed's offsets: the structure a model learns
    steps = (xa[:, 1:] - xa[:, :-1]) % 256
    assert set(steps.unique().tolist()) <= set(synthetic_offsets(a.job.seed, 256).tolist())


def test_synthetic_is_learnable():
    """A few dozen AdamW steps on the tiny model visibly lower the loss from ln(vocab)."""
    cfg = config(global_batch=8, micro=8, seq_len=32)
    torch.manual_seed(0)
    model = build_model(cfg.model, "cpu", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(25):
        (x, y), = micro_batches(cfg.job, cfg.model, cfg.plan, step, 0, 1)
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(256)) < 0.2
    assert losses[-1] < losses[0] - 0.4


def test_file_round_trip(tmp_path):
    """Every row of a file batch is a contiguous slice of the file, in the file's dtype."""
    for dtype in ("uint16", "uint32"):
        path = tmp_path / f"t_{dtype}.bin"
        data = np.arange(3000, dtype=dtype)  # token = its position: a row tells where it was read
        data.tofile(path)
        cfg = config(str(path), dtype=dtype, vocab=3000)
        x, y = global_batch(cfg, 5)
        assert len(set(x[:, 0].tolist())) == len(x)
        for row_x, row_y in zip(x, y):
            start = int(row_x[0])
            want = torch.from_numpy(data[start:start + 17].astype(np.int64))
            assert torch.equal(row_x, want[:-1]) and torch.equal(row_y, want[1:])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file .*missing.bin.*synthetic"):
        global_batch(config(str(tmp_path / "missing.bin")), 0)
    small = tmp_path / "small.bin"
    np.arange(10, dtype=np.uint16).tofile(small)
    with pytest.raises(ConfigError, match="holds 10 tokens"):
        global_batch(config(str(small)), 0)
    big = tmp_path / "big.bin"
    np.full(100, 300, dtype=np.uint16).tofile(big)
    with pytest.raises(ConfigError, match="token 300 >= model.vocab_size=256"):
        global_batch(config(str(big)), 0)
    late = tmp_path / "late.bin"  # one bad token deep in the file: found before training, in its chunk
    tokens = np.zeros(1000, dtype=np.uint16)
    tokens[900] = 256
    tokens.tofile(late)
    check_vocab(config(str(late), vocab=257).job, config(vocab=257).model)
    with pytest.raises(ConfigError, match=r"token 256 >= model.vocab_size=256 \(in tokens 896\.\.999\)"):
        check_vocab(config(str(late)).job, config().model, chunk=128)
    check_vocab(config().job, config().model)  # synthetic tokens: nothing to read
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\0" * 101)
    with pytest.raises(ConfigError, match="whole number of uint16"):
        token_file(str(odd), "uint16")


def test_prepare_round_trip(tmp_path):
    text = "héllo, wörld\n" * 50
    src = tmp_path / "in.txt"
    src.write_text(text, encoding="utf-8")
    out = tmp_path / "out.bin"
    assert prepare(src, out, chunk_bytes=7) == len(text.encode())
    tokens = np.fromfile(out, dtype=np.uint16)
    assert bytes(tokens.astype(np.uint8)).decode("utf-8") == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.bin"]  # no temporary left
    x, y = global_batch(config(str(out)), 0)
    assert bytes(x[0].to(torch.uint8).tolist()) in text.encode()


def test_prepare_command(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("abc" * 100)
    out = tmp_path / "out.bin"
    run = subprocess.run([sys.executable, "-m", "autotune.engine.data", "prepare", str(src), str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert np.fromfile(out, dtype=np.uint16).tolist() == list(b"abc" * 100)


def test_prepare_errors(tmp_path, capsys):
    assert main(["prepare", str(tmp_path / "nope.txt"), str(tmp_path / "out.bin")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no such text file") and len(err.splitlines()) == 1
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ConfigError, match="empty"):
        prepare(tmp_path / "empty.txt", tmp_path / "out.bin")
    (tmp_path / "in.txt").write_text("x")
    with pytest.raises(ConfigError, match="no folder"):
        prepare(tmp_path / "in.txt", tmp_path / "sub" / "out.bin")
    with pytest.raises(ConfigError, match="it is a folder"):
        prepare(tmp_path / "in.txt", tmp_path)
    with pytest.raises(ConfigError, match="it is the text file"):  # would replace the user's text
        prepare(tmp_path / "in.txt", tmp_path / "." / "in.txt")
    assert (tmp_path / "in.txt").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "in.txt"]
