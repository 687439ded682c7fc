"""Hugging Face safetensors weights: the reader follows the file format, the name mapping gives the
logits of a reference forward pass written the way Hugging Face's llama / gpt2 compute them."""
import json
import math
import struct

import pytest
import torch
import torch.nn.functional as F

from autotune.cli import main
from autotune.engine.config import ConfigError, build_train_config, to_yaml
from autotune.engine.data import micro_batches
from autotune.engine.hf import (INDEX_FILE, SINGLE_FILE, HFCheckpoint, check_hf_weights, hf_state_dict, load_hf_weights,
                                save_hf_weights, write_safetensors)
from autotune.engine.model import build_model

TINY_LLAMA = dict(family="llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48, vocab_size=64,
                  max_seq_len=32, rope_theta=500.0)
TINY_GPT2 = dict(family="gpt2", n_layers=2, d_model=32, n_heads=4, d_ff=128, vocab_size=64, max_seq_len=32,
                 tie_embeddings=True)


def model_cfg(**fields):
    return build_train_config({"model": fields, "job": {"seq_len": 16, "global_batch": 1}}).model


def random_hf_weights(cfg, seed=0):
    """HF-named tensors of the model's shapes, random enough that any mix-up changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in hf_state_dict(build_model(cfg, "cpu")).items():
        r = torch.randn(t.shape, generator=gen)
        out[name] = 1 + 0.1 * r if ("norm" in name or "ln_" in name) and name.endswith("weight") else 0.3 * r
    return out


def tokens(cfg, seed=1):
    return torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))


def causal_attention(q, k, v):
    """q, k, v [b, heads, s, hd] as HF's eager attention does it."""
    s = q.shape[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1) @ v


def llama_reference(sd, cfg, ids):
    """LlamaForCausalLM's forward written out from its HF tensors (rotate_half rotary)."""
    b, s = ids.shape
    nh, nkv, hd = cfg.n_heads, cfg.kv_heads, cfg.head_dim

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps))

    def rotate_half(x):
        return torch.cat((-x[..., hd // 2:], x[..., : hd // 2]), dim=-1)

    def proj(x, name):
        return x @ sd[name + ".weight"].T + sd.get(name + ".bias", 0)

    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
    emb = torch.cat([torch.outer(torch.arange(s).float(), inv_freq)] * 2, dim=-1)
    cos, sin = emb.cos(), emb.sin()
    x = sd["model.embed_tokens.weight"][ids]
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        q = proj(h, p + "self_attn.q_proj").view(b, s, nh, hd).transpose(1, 2)
        k = proj(h, p + "self_attn.k_proj").view(b, s, nkv, hd).transpose(1, 2)
        v = proj(h, p + "self_attn.v_proj").view(b, s, nkv, hd).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        # repeat_kv: each kv head serves n_heads / n_kv_heads consecutive query heads
        k = k[:, :, None].expand(b, nkv, nh // nkv, s, hd).reshape(b, nh, s, hd)
        v = v[:, :, None].expand(b, nkv, nh // nkv, s, hd).reshape(b, nh, s, hd)
        x = x + proj(causal_attention(q, k, v).transpose(1, 2).reshape(b, s, -1), p + "self_attn.o_proj")
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        x = x + proj(F.silu(proj(h, p + "mlp.gate_proj")) * proj(h, p + "mlp.up_proj"), p + "mlp.down_proj")
    head = sd["model.embed_tokens.weight"] if cfg.tie_embeddings else sd["lm_head.weight"]
    return rms(x, sd["model.norm.weight"]) @ head.T


def gpt2_reference(sd, cfg, ids):
    """GPT2LMHeadModel's forward from its HF tensors (Conv1D: x @ W + b, fused c_attn, gelu_new)."""
    b, s = ids.shape
    d, nh = cfg.d_model, cfg.n_heads

    def ln(x, name):
        return F.layer_norm(x, (d,), sd[name + ".weight"], sd[name + ".bias"], cfg.norm_eps)

    def conv1d(x, name):
        return x @ sd[name + ".weight"] + sd[name + ".bias"]

    def gelu_new(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x.pow(3))))

    x = sd["wte.weight"][ids] + sd["wpe.weight"][torch.arange(s)]
    for i in range(cfg.n_layers):
        p = f"h.{i}."
        q, k, v = conv1d(ln(x, p + "ln_1"), p + "attn.c_attn").split(d, dim=-1)
        q, k, v = (t.view(b, s, nh, d // nh).transpose(1, 2) for t in (q, k, v))
        x = x + conv1d(causal_attention(q, k, v).transpose(1, 2).reshape(b, s, d), p + "attn.c_proj")
        x = x + conv1d(gelu_new(conv1d(ln(x, p + "ln_2"), p + "mlp.c_fc")), p + "mlp.c_proj")
    return ln(x, "ln_f") @ sd["wte.weight"].T


@pytest.mark.parametrize("variant", ["llama", "qwen2-bias", "tied", "head_dim"])
def test_llama_weights_give_hf_logits(tmp_path, variant):
    # head_dim: heads wider in total than d_model (Mistral-NeMo's 32 x 128 on 5120)
    cfg = model_cfg(**TINY_LLAMA, qkv_bias=variant == "qwen2-bias", tie_embeddings=variant == "tied",
                    attn_head_dim=16 if variant == "head_dim" else None)
    sd = random_hf_weights(cfg)
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(cfg.head_dim // 2)  # older checkpoints hold it
    write_safetensors(tmp_path / SINGLE_FILE, sd)
    model = build_model(cfg, "cpu", seed=5)
    load_hf_weights(model, tmp_path)
    ids = tokens(cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), llama_reference(sd, cfg, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_gpt2_weights_give_hf_logits(tmp_path, prefix):
    cfg = model_cfg(**TINY_GPT2)
    sd = random_hf_weights(cfg)
    on_disk = {prefix + k: v for k, v in sd.items()}
    on_disk[prefix + "h.0.attn.bias"] = torch.ones(1, 1, 32, 32).tril()  # the causal-mask buffer old files hold
    on_disk["lm_head.weight"] = sd["wte.weight"]  # tied copy
    write_safetensors(tmp_path / SINGLE_FILE, on_disk)
    model = build_model(cfg, "cpu", seed=5)
    load_hf_weights(model, tmp_path)
    ids = tokens(cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), gpt2_reference(sd, cfg, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fields", [TINY_LLAMA, TINY_GPT2, {**TINY_LLAMA, "attn_head_dim": 4}],
                         ids=["llama", "gpt2", "head_dim"])
@pytest.mark.parametrize("shard_bytes", [None, 20_000], ids=["single", "sharded"])
def test_save_load_round_trip(tmp_path, fields, shard_bytes):
    cfg = model_cfg(**fields)
    original = build_model(cfg, "cpu", seed=1)
    save_hf_weights(original, tmp_path, max_shard_bytes=shard_bytes)
    assert (tmp_path / (INDEX_FILE if shard_bytes else SINGLE_FILE)).is_file()
    if shard_bytes:
        index = json.loads((tmp_path / INDEX_FILE).read_text())
        assert len(set(index["weight_map"].values())) > 1
    assert not list(tmp_path.glob(".*.tmp"))
    # config.json describes the same architecture
    again = build_train_config({"model": {"hf_config": str(tmp_path / "config.json")},
                                "job": {"seq_len": 16, "global_batch": 1}}).model
    for key in fields:
        assert getattr(again, key) == getattr(cfg, key), key
    model = build_model(cfg, "cpu", seed=2)
    ids = tokens(cfg)
    assert not torch.equal(model(ids), original(ids))
    load_hf_weights(model, tmp_path)
    assert torch.equal(model(ids), original(ids))
    for (n, a), (_, b) in zip(original.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), n


def test_reader_follows_the_format(tmp_path):
    """A file laid out by hand from the format description: u64 header length, JSON, raw bytes."""
    a = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    b = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    header = {"__metadata__": {"format": "pt"},
              "b": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]},
              "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [4, 28]}}
    raw = json.dumps(header).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b.view(torch.int16).numpy().tobytes()
                     + struct.pack("<6f", *range(6)))
    st = HFCheckpoint(path)
    assert st.names() == {"a", "b"}
    assert torch.equal(st.get("a"), a) and torch.equal(st.get("b"), b)
    # and the writer's output reads back the same
    write_safetensors(tmp_path / "y.safetensors", {"a": a, "b": b})
    raw_len = struct.unpack("<Q", (tmp_path / "y.safetensors").read_bytes()[:8])[0]
    assert raw_len % 8 == 0
    back = HFCheckpoint(tmp_path / "y.safetensors")
    assert torch.equal(back.get("a"), a) and torch.equal(back.get("b"), b)


def test_errors(tmp_path):
    cfg = model_cfg(**TINY_LLAMA)
    model = build_model(cfg, "cpu", seed=0)
    with pytest.raises(ConfigError, match="no such file or folder .*nowhere"):
        load_hf_weights(model, tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="no model.safetensors"):
        load_hf_weights(model, tmp_path)
    sd = random_hf_weights(cfg)

    def load(tensors):
        write_safetensors(tmp_path / SINGLE_FILE, tensors)
        load_hf_weights(model, tmp_path)

    with pytest.raises(ConfigError, match="lacks tensor model.layers.1.mlp.up_proj.weight"):
        load({k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(ConfigError, match=r"model.layers.0.mlp.down_proj.weight has shape \[32, 40\].*\[32, 48\]"):
        load({**sd, "model.layers.0.mlp.down_proj.weight": torch.zeros(32, 40)})
    write_safetensors(tmp_path / SINGLE_FILE, {**sd, "model.norm.weight": torch.zeros(32, dtype=torch.float64)})
    raw = (tmp_path / SINGLE_FILE).read_bytes()
    (tmp_path / SINGLE_FILE).write_bytes(raw.replace(b'"F64"', b'"I64"', 1))  # same size: an int64 tensor
    with pytest.raises(ConfigError, match="model.norm.weight .*dtype I64"):
        load_hf_weights(model, tmp_path)
    with pytest.raises(ConfigError, match="no place for .*model.layers.2.input_layernorm.weight"):
        load({**sd, "model.layers.2.input_layernorm.weight": torch.ones(32)})
    write_safetensors(tmp_path / SINGLE_FILE, sd)
    (tmp_path / SINGLE_FILE).write_bytes((tmp_path / SINGLE_FILE).read_bytes()[:-8])  # truncated
    with pytest.raises(ConfigError, match="corrupt header entry"):
        check_hf_weights(cfg, tmp_path)  # headers alone tell
    (tmp_path / SINGLE_FILE).write_bytes(b"\xff" * 64)
    with pytest.raises(ConfigError, match="not a safetensors file"):
        load_hf_weights(model, tmp_path)
    (tmp_path / SINGLE_FILE).unlink()
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"model.norm.weight": "gone.safetensors"}}))
    with pytest.raises(ConfigError, match="gone.safetensors"):
        load_hf_weights(model, tmp_path)


def test_train_starts_from_loaded_weights(tmp_path, capsys):
    """`autotune train CONFIG model.init_from=DIR`: the first step's loss is the loaded model's."""
    cfg = build_train_config({
        "model": TINY_LLAMA,
        "job": {"seq_len": 16, "global_batch": 2, "steps": 1, "seed": 3, "out_dir": str(tmp_path / "run")},
        "plan": {"micro_batch": 2},
    })
    (tmp_path / "train.yaml").write_text(to_yaml(cfg))
    source = build_model(cfg.model, "cpu", seed=11)
    save_hf_weights(source, tmp_path / "hf")
    (inputs, targets), = micro_batches(cfg.job, cfg.model, cfg.plan, 0, 0, 1)
    with torch.no_grad():
        want = source(inputs, targets).item()
        from_scratch = build_model(cfg.model, "cpu", seed=cfg.job.seed)(inputs, targets).item()
    assert abs(want - from_scratch) > 1e-3
    assert main(["train", str(tmp_path / "train.yaml"), f"model.init_from={tmp_path / 'hf'}"]) == 0
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(want, rel=1e-5)
    # weights of another architecture: one error line before anything is written
    other = build_model(model_cfg(**{**TINY_LLAMA, "d_ff": 64}), "cpu", seed=0)
    save_hf_weights(other, tmp_path / "other")
    capsys.readouterr()
    out = tmp_path / "run2"
    assert main(["train", str(tmp_path / "train.yaml"), f"model.init_from={tmp_path / 'other'}",
                 f"job.out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.init_from:") and "shape" in err and len(err.splitlines()) == 1
    assert not out.exists()


LLAMA_32 = {"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 1, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 512, "vocab_size": 64, "max_position_embeddings": 131072,
            "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}


def test_llama3_rope_scaling(tmp_path):
    """Llama 3.1+'s rope_scaling is read, written back, and slows only the low frequencies: those
    with under 1 period in the original 8192 positions by the factor 32, none with over 4 periods."""
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_32))
    cfg = model_cfg(hf_config=str(tmp_path / "config.json"))
    assert (cfg.rope_scaling_factor, cfg.rope_original_max_seq_len) == (32.0, 8192)
    from autotune.engine.hf import hf_config
    from autotune.engine.model import rope_tables

    assert hf_config(cfg)["rope_scaling"] == LLAMA_32["rope_scaling"] | {"factor": 32.0}

    def inv_freq(scaling):  # the angle advanced per position
        cos, sin = rope_tables(64, 2, 500000.0, scaling=scaling)
        return torch.atan2(sin[1].double(), cos[1].double())

    plain, scaled = inv_freq(None), inv_freq(cfg)
    periods = 8192 * plain / (2 * math.pi)
    high, low, band = periods > 4, periods < 1, (periods >= 1) & (periods <= 4)
    assert high.sum() and low.sum() and band.sum() >= 2
    torch.testing.assert_close(scaled[high], plain[high])
    torch.testing.assert_close(scaled[low], plain[low] / 32)
    ratio = scaled[band] / plain[band]  # blended: between 1/32 and 1, more slowed at lower frequency
    assert (ratio > 1 / 32).all() and (ratio < 1).all() and (ratio.diff() < 0).all()


@pytest.mark.parametrize("change, words", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'; supported: llama3"),
    ({"hidden_act": "gelu"}, "activation 'gelu'"),
    ({"attention_bias": True}, "attention_bias=true"),
])
def test_hf_config_the_engine_cannot_compute_is_refused(tmp_path, change, words):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_32 | change))
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        model_cfg(hf_config=str(tmp_path / "config.json"))


@pytest.mark.parametrize("kind, window, use, max_seq_len", [
    ("mistral", 4096, None, 4096),  # Mistral v0.1: attends 4096 back
    ("mistral", None, None, 32768),  # v0.3: no window
    ("qwen2", 4096, False, 32768),  # Qwen2.5 lists a window it does not use
    ("qwen2", 4096, True, 4096),
])
def test_hf_sliding_window_caps_the_sequence_length(tmp_path, kind, window, use, max_seq_len):
    """The engine attends to every earlier position: the same as a sliding window only within it."""
    hf = {**LLAMA_32, "model_type": kind, "max_position_embeddings": 32768, "sliding_window": window}
    del hf["rope_scaling"]
    if use is not None:
        hf["use_sliding_window"] = use
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert model_cfg(hf_config=str(tmp_path / "config.json")).max_seq_len == max_seq_len


@pytest.mark.parametrize("head_dim, attn_head_dim", [(None, None), (64, None), (128, 128)])
def test_hf_head_dim(tmp_path, head_dim, attn_head_dim):
    """head_dim other than hidden_size / heads (Mistral-NeMo: 5120 / 32 heads of 128) is kept."""
    hf = {**LLAMA_32, "hidden_size": 2048, "num_attention_heads": 32, "head_dim": head_dim}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    cfg = model_cfg(hf_config=str(tmp_path / "config.json"))
    assert cfg.attn_head_dim == attn_head_dim and cfg.head_dim == (head_dim or 64)
