import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from autotune.cli import main
from autotune.profile import (
    TrafficCounter, flops_per_token, measure_saved_bytes, measure_traffic, model_profile, predict_saved_bytes,
    predict_traffic,
)
import yaml

from autotune.engine.config import ModelConfig, build_train_config
from autotune.engine.model import build_model, count_params

ROOT = Path(__file__).resolve().parents[1]

LLAMA = ModelConfig(name="t-llama", family="llama", n_layers=3, d_model=96, n_heads=6, n_kv_heads=2, d_ff=256,
                    vocab_size=320, max_seq_len=256)
GPT2 = ModelConfig(name="t-gpt2", family="gpt2", n_layers=3, d_model=96, n_heads=4, d_ff=384, vocab_size=320,
                   max_seq_len=256, tie_embeddings=True)
MHA = ModelConfig(name="t-mha", family="llama", n_layers=2, d_model=128, n_heads=4, d_ff=288, vocab_size=300,
                  max_seq_len=256, qkv_bias=True)
# one tensor-parallel rank's share of a model (autotune.search's stand-in): heads not d_model wide
SHARE = ModelConfig(name="t-share", family="llama", n_layers=2, d_model=128, n_heads=2, n_kv_heads=1, d_ff=144,
                    vocab_size=160, max_seq_len=256, attn_head_dim=32)


@pytest.mark.parametrize("model", [LLAMA, GPT2], ids=lambda m: m.family)
def test_flops_per_token_match_flop_counter(model):
    """6N + 12·L·a·d·s against the matmuls torch really runs in forward + backward (the math SDPA
    backend, so that attention is counted too; FlopCounterMode counts the full s x s scores)."""
    b, s = 2, 64
    net = build_model(model)
    tokens = torch.randint(0, model.vocab_size, (b, s))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        net(tokens, tokens).backward()
    predicted = flops_per_token(model, s)["total"] * b * s
    assert predicted == pytest.approx(counter.get_total_flops(), rel=0.02)


def test_moe_flops_per_token_count_the_active_experts(monkeypatch):
    """A MoE model's FLOPs are its active weights': the router, k of the E experts per token, the
    shared expert and its gate (tiny-moe: a dense block, then 3 MoE blocks), exactly what torch runs
    dropless (the loop over experts: FlopCounterMode has no formula for the grouped matmul)."""
    from autotune.engine import moe
    from autotune.engine.model import count_active_params, count_params

    monkeypatch.setattr(moe, "grouped_mm_runs", lambda x: False)
    model = build_train_config({"model": yaml.safe_load((ROOT / "conf" / "model" / "tiny-moe.yaml").read_text())}).model
    b, s = 2, 64
    tokens = torch.randint(0, model.vocab_size, (b, s))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        build_model(model)(tokens, tokens).backward()
    flops = flops_per_token(model, s)
    assert flops["total"] * b * s == counter.get_total_flops()
    # N: every active parameter but the input embedding and the norms (tiny-moe has no biases)
    norms = (2 * model.n_layers + 1) * model.d_model
    assert flops["matmul_params"] == count_active_params(model) - model.vocab_size * model.d_model - norms
    assert count_active_params(model) < count_params(model)


# Shapes larger than the fit (widths 32..80, b·s <= 24) in width, batch and sequence.
CASES = [
    (LLAMA, 2, 96, "fp32", "params", "none", "torch"),
    (LLAMA, 1, 200, "bf16", "params", "full", "torch"),
    (LLAMA, 3, 64, "bf16", "autocast", "selective", "torch"),
    (LLAMA, 2, 80, "bf16", "params", "none", "triton"),
    (LLAMA, 1, 128, "fp32", "params", "selective", "triton"),
    (GPT2, 2, 96, "fp32", "params", "none", "torch"),
    (GPT2, 4, 48, "fp16", "autocast", "full", "torch"),
    (GPT2, 2, 64, "bf16", "params", "selective", "triton"),
    (MHA, 2, 72, "bf16", "autocast", "none", "torch"),
    (SHARE, 2, 96, "bf16", "params", "none", "torch"),
    (SHARE, 1, 128, "fp32", "params", "full", "triton"),
]


# per-operator (every matmul's output kept, every other one's) and attention-core checkpointing
OP_CASES = [
    (LLAMA, 2, 96, "fp32", "params", "op", "torch", 1),
    (LLAMA, 1, 128, "bf16", "params", "op", "triton", 2),
    (LLAMA, 3, 64, "bf16", "autocast", "attention", "torch", 2),
    (GPT2, 2, 96, "fp32", "params", "op", "torch", 2),
    (GPT2, 2, 64, "bf16", "params", "attention", "triton", 2),
    (MHA, 2, 72, "bf16", "autocast", "op", "torch", 1),
]


@pytest.mark.parametrize("model, b, s, precision, cast, ckpt, kernels, k", [(*c, 2) for c in CASES] + OP_CASES)
def test_activation_bytes_within_5_percent(model, b, s, precision, cast, ckpt, kernels, k):
    measured = measure_saved_bytes(model, b, s, precision, cast, ckpt, kernels, every_k=k)
    predicted = predict_saved_bytes(model, b, s, precision, cast, ckpt, kernels, every_k=k)
    assert predicted["total"] == pytest.approx(measured["total"], rel=0.05)
    assert predicted["outside"] == pytest.approx(measured["outside"], rel=0.05)
    if ckpt != "selective":
        assert predicted["block"] == pytest.approx(measured["block"], rel=0.05)


INTERPRETED = """
import json, torch
from autotune.profile import measure_saved_bytes
from autotune.engine.config import ModelConfig
small = ModelConfig(n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64, vocab_size=64, max_seq_len=16)
fast = measure_saved_bytes(small, 1, 8, "fp32", "params", "none", "triton")
real = measure_saved_bytes(small, 1, 8, "fp32", "params", "none", "triton", triton_arithmetic=True)
print(json.dumps([fast, real]))
"""


def test_triton_measured_without_arithmetic_equals_interpreter():
    """Skipping the Triton kernels' arithmetic changes nothing that is saved for backward
    (Triton's interpreter must be chosen before the kernels are imported: a fresh process)."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", INTERPRETED], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    fast, real = json.loads(r.stdout.strip().splitlines()[-1])
    assert fast == real and fast["total"] > 0


def test_model_profile_has_exact_params_and_every_choice():
    prof = model_profile(LLAMA, seq_len=64)
    assert prof["params"]["total"] == count_params(LLAMA) == sum(p.numel() for p in build_model(LLAMA, "meta").parameters())
    keys = prof["activations"]["at"]["bytes"].keys()
    for precision in ("fp32", "bf16", "fp16"):
        for ckpt in ("none", "full"):
            for kernels in ("torch", "triton"):
                assert f"{precision}/params/{ckpt}/{kernels}" in keys


@pytest.mark.parametrize("name", ["gpt2", "llama-3-8b", "qwen2.5-0.5b"])
def test_params_per_module_are_exact(name):
    """The closed-form count of each module kind equals the built model's parameters of that kind."""
    from autotune.config import planner_config
    from autotune.engine.model import param_counts

    model = planner_config([f"model={name}"]).train.model
    kind = lambda n: ("norms" if "norm" in n else "attention" if ".attn." in n else "mlp" if ".mlp." in n  # noqa: E731
                      else {"tok_emb": "embedding", "pos_emb": "position_embedding", "lm_head": "lm_head"}[n.split(".")[0]])
    held = {}
    for n, p in build_model(model, "meta").named_parameters():
        held[kind(n)] = held.get(kind(n), 0) + p.numel()
    assert {k: v for k, v in param_counts(model).items() if k != "total" and v} == held


def test_profile_cli_writes_profile_json(tmp_path, capsys):
    assert main(["profile", "model=tiny", "cluster=8xh100", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "205,376 parameters" in out and "H100" in out
    prof = json.loads((tmp_path / "profile.json").read_text())
    assert prof["params"]["total"] == 205_376 and prof["hardware"]["n_gpus"] == 8
    assert [p.name for p in tmp_path.iterdir()] == ["profile.json"]  # no temp file left behind


@pytest.mark.parametrize("name, copies", [("llama-3-8b", 28), ("mistral-7b", 28)])
def test_saved_bytes_match_published_measurement(name, copies):
    """ml-engineering measured 28·2·b·s·h bytes per layer for Llama-3.1-8B and Mistral-7B (bf16,
    flash attention) ([Activations] in docs/formulas.md); the fit from tiny models reproduces it at full width."""
    from autotune.config import planner_config

    model = planner_config([f"model={name}"]).train.model
    b, s = 1, 4096
    block = predict_saved_bytes(model, b, s, "bf16", "params", "none")["block"]
    assert block / (2 * b * s * model.d_model) == pytest.approx(copies, rel=0.05)


@pytest.mark.slow
def test_profile_under_torchrun_measures_collectives(tmp_path):
    """2 gloo ranks: all-reduce, all-gather and reduce-scatter bus bandwidth land in profile.json."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", "-m", "autotune",
         "profile", "model=tiny", "cluster.gpus_per_node=2", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    hw = json.loads((tmp_path / "profile.json").read_text())["hardware"]
    assert set(hw["collectives"]) == {"all_reduce", "all_gather", "reduce_scatter"}
    assert all(v > 0 for v in hw["collectives"].values())
    assert hw["intra_node_bytes_per_s"] == hw["collectives"]["all_reduce"]
    assert r.stdout.count("wrote ") == 1  # rank 0 alone reports


# --- memory traffic (the step time's memory-bound part) -------------------------------------------

def test_traffic_counter_counts_what_each_op_reads_and_writes():
    """Each memory-bound op reads its inputs and writes its outputs once; a broadcast operand is
    read once; views move nothing; matmuls are counted as ops but timed from their FLOPs."""
    a, b, x, w = torch.ones(1000), torch.ones(1000), torch.ones(100, 64), torch.ones(64)
    with TrafficCounter() as counter:
        a + b
        a.view(10, 100)
        x * w
        x @ x.T
        a.add_(b)
    assert counter.bytes["fwd"] == 3 * 4000 + (2 * 100 * 64 + 64) * 4 + 3 * 4000
    assert counter.ops["fwd"] == 4


TRAFFIC_CASES = [
    (LLAMA, 2, 96, "bf16", "params", "torch"),
    (LLAMA, 1, 200, "bf16", "params", "triton"),
    (GPT2, 2, 96, "fp32", "params", "torch"),
    (GPT2, 2, 96, "fp16", "autocast", "triton"),
    (MHA, 2, 72, "bf16", "autocast", "torch"),
    (SHARE, 2, 96, "bf16", "params", "torch"),
]


@pytest.mark.parametrize("model, b, s, precision, cast, kernels", TRAFFIC_CASES)
def test_traffic_within_5_percent_at_larger_shapes(model, b, s, precision, cast, kernels):
    measured = measure_traffic(model, b, s, precision, cast, kernels)
    predicted = predict_traffic(model, b, s, precision, cast, kernels)
    assert predicted["fwd"] == pytest.approx(measured["fwd"], rel=0.05)
    assert predicted["bwd"] == pytest.approx(measured["bwd"], rel=0.05)


# mixture-of-experts blocks, wider and with more experts than the fit's: Qwen2-MoE-like (a dense
# block, shared expert and gate) and Mixtral-like (no shared expert), both dropless
MOE = ModelConfig(name="t-moe", n_layers=3, d_model=128, n_heads=8, n_kv_heads=4, d_ff=256, vocab_size=320,
                  max_seq_len=256, n_experts=8, experts_per_token=3, moe_d_ff=200, n_shared_experts=1,
                  shared_d_ff=160, shared_expert_gate=True, dense_layers=[0])
MIXTRAL_LIKE = ModelConfig(name="t-mixtral", n_layers=2, d_model=96, n_heads=6, n_kv_heads=2, d_ff=176,
                           vocab_size=300, max_seq_len=256, n_experts=6, experts_per_token=2)
MOE_CASES = [
    (MOE, 2, 64, "fp32", "params", "none", "torch"),
    (MOE, 1, 96, "bf16", "autocast", "none", "torch"),
    (MOE, 2, 48, "bf16", "params", "full", "triton"),
    (MIXTRAL_LIKE, 3, 40, "bf16", "params", "none", "torch"),
    (MIXTRAL_LIKE, 2, 56, "fp16", "autocast", "none", "triton"),
]
# per-operator (the experts' grouped matmuls among the kept outputs) and attention-core checkpointing
MOE_OP_CASES = [
    (MOE, 2, 64, "fp32", "params", "op", "torch", 1),
    (MIXTRAL_LIKE, 2, 48, "bf16", "autocast", "op", "torch", 2),
    (MOE, 1, 80, "bf16", "params", "attention", "triton", 2),
]


@pytest.mark.parametrize("model, b, s, precision, cast, ckpt, kernels, k", [(*c, 2) for c in MOE_CASES] + MOE_OP_CASES)
def test_moe_block_bytes_and_traffic_within_5_percent(model, b, s, precision, cast, ckpt, kernels, k):
    """A MoE block's two parts, the block without its routed experts and the experts, saved bytes
    and memory traffic as fitted on the small MoE models, against fresh measurements of larger ones."""
    from autotune.profile import predict_moe_saved_bytes, predict_moe_traffic

    measured = measure_saved_bytes(model, b, s, precision, cast, ckpt, kernels, every_k=k)
    predicted = predict_moe_saved_bytes(model, b, s, precision, cast, ckpt, kernels, every_k=k)
    for part in ("moe_block", "experts"):
        assert predicted[part] == pytest.approx(measured[part], rel=0.05, abs=64), part
    if model.dense_layers:  # a MoE model's dense block, as the dense fit predicts it
        dense = predict_saved_bytes(model, b, s, precision, cast, ckpt, kernels, every_k=k)["block"]
        assert dense == pytest.approx(measured["dense_block"], rel=0.05)
    traffic, layers = measure_traffic(model, b, s, precision, cast, kernels), len(model.moe_layers)
    for key, value in predict_moe_traffic(model, b, s, precision, cast, kernels).items():
        assert value == pytest.approx(traffic[key] / layers, rel=0.05), key


def test_op_checkpointing_keeps_exactly_the_experts_matmul_outputs():
    """Under op (every matmul kept) a dropless MoE layer's experts keep their three grouped matmuls'
    outputs, gate and up [S, f_e] and down [S, h] at S = b·s·k slots, and nothing else."""
    b, s, m = 2, 32, MIXTRAL_LIKE
    experts = measure_saved_bytes(m, b, s, "fp32", "params", "op", every_k=1)["experts"]
    assert experts == b * s * m.experts_per_token * (2 * m.expert_d_ff + m.d_model) * 4


def test_moe_measurements_tell_the_routed_experts_apart():
    """The experts' bytes and traffic grow with k (the slots they compute), the rest of the block's
    with the router's width, and the experts' weights cast by autocast are theirs."""
    one, two = (measure_saved_bytes(dataclasses.replace(MIXTRAL_LIKE, experts_per_token=k), 2, 32) for k in (1, 2))
    assert two["experts"] == pytest.approx(2 * one["experts"], rel=0.02)
    cast = measure_saved_bytes(MIXTRAL_LIKE, 2, 32, "bf16", "autocast")["experts"]
    copies = measure_saved_bytes(MIXTRAL_LIKE, 2, 32, "bf16", "params")["experts"]
    weights = MIXTRAL_LIKE.n_experts * 3 * MIXTRAL_LIKE.d_model * MIXTRAL_LIKE.d_ff * 2  # bf16 copies of every expert
    assert cast - copies >= weights
    t_one, t_two = (measure_traffic(dataclasses.replace(MIXTRAL_LIKE, experts_per_token=k), 2, 32) for k in (1, 2))
    assert t_two["experts_fwd"] > 1.8 * t_one["experts_fwd"] and t_two["block_fwd"] > t_one["block_fwd"]


def test_triton_kernels_save_passes_over_memory():
    """The fused kernels (norms, SwiGLU, rotary, linear cross-entropy) move fewer bytes than the
    eager ops they replace, in every block and in the loss, forward and backward."""
    from autotune.config import planner_config

    model = planner_config(["model=llama-3-8b"]).train.model
    torch_, triton = (predict_traffic(model, 1, 4096, "bf16", "params", k) for k in ("torch", "triton"))
    for key in ("block_fwd", "block_bwd", "outside_fwd", "outside_bwd"):
        assert 0 < triton[key] < torch_[key], key


def test_fits_are_cached_in_the_folder_autotune_cache_names(tmp_path, monkeypatch):
    """A fitted table is written to $AUTOTUNE_CACHE (the test session's own folder, not ~/.cache)
    and read back from there by the next process instead of being measured again."""
    from autotune.profile.fits import cache_dir, cached_fit

    assert cache_dir() == Path(os.environ["AUTOTUNE_CACHE"]) != Path.home() / ".cache" / "autotune"
    monkeypatch.setenv("AUTOTUNE_CACHE", str(tmp_path / "cache"))
    calls = []
    table = {"fp32/params/torch": {"block": {"tok": 1.5}}}
    assert cached_fit("traffic", "llama", True, lambda: calls.append(1) or table) == table
    assert [p.name.split("-")[:3] for p in (tmp_path / "cache").iterdir()] == [["traffic", "llama", "gqa"]]
    assert cached_fit("traffic", "llama", True, lambda: calls.append(1) or {}) == table and calls == [1]


def test_fp16_saves_exactly_what_bf16_saves():
    """The fits measure bf16 and key fp16 to it (fp16_as_bf16): true for a dense and a MoE fit shape
    under every cast, checkpointing and kernels choice."""
    from autotune.profile.activations import MEASURED_CHECKPOINTING
    from autotune.profile.fits import fit_shapes
    from autotune.profile.moe import moe_fit_shapes

    moe_kind = ("llama", True, "before", True, True, True, True, False)
    for m in (fit_shapes("llama", True)[0], moe_fit_shapes(moe_kind)[0]):
        for cast in ("params", "autocast"):
            for kernels in ("torch", "triton"):
                for mode, every_k in MEASURED_CHECKPOINTING.values():
                    bf16, fp16 = (measure_saved_bytes(m, 3, 8, p, cast, mode, kernels, every_k=every_k)
                                  for p in ("bf16", "fp16"))
                    assert fp16 == bf16 and bf16["total"] > 0, (m.name, cast, kernels, mode)
