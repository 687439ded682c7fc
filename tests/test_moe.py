"""Mixture-of-experts layers and expert parallelism (autotune/engine/moe.py).

In-process: the MoE layer against a plain token-by-token reference written here (routing both
ways, renormalisation, shared experts and their gate, token dropping at a capacity factor, the
load-balancing loss), grouped matmuls against the loop over experts, exact parameter counts of the
presets and of Mixtral / Qwen2-MoE config.json files, refused configs and plans as one error line,
and the logits of transformers' MixtralForCausalLM / Qwen2MoeForCausalLM on tiny random models
(their weights loaded by the engine, and the engine's loaded by transformers).
One 4-rank launch (tests/tp_pp_worker.py, shared with the other modules' 4-rank runs:
tests/conftest.py's four_rank_run): expert parallelism alone, with ZeRO-1, 2 and 3, with
pipeline parallelism, with token dropping, from Hugging Face weights, the probe and a checkpoint
moved to one process, all on the single-process loss trajectory.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from autotune.cli import main as autotune_main
from autotune.engine import moe as moe_module
from autotune.engine.config import ModelConfig, build_train_config
from autotune.engine.hf_config import model_from_hf_config
from autotune.engine.model import build_model, count_active_params, count_params, expert_params
from autotune.engine.moe import MoE, load_balancing_loss
from tp_pp_worker import launch as run_worker

ROOT = Path(__file__).resolve().parents[1]
TINY_MOE = yaml.safe_load((ROOT / "conf" / "model" / "tiny-moe.yaml").read_text())
STEPS = 5


def moe_layer(seed: int = 0, **fields) -> MoE:
    """The MoE of block 1 of a small model, initialised with larger weights than a model's (so that
    routing and the experts' outputs differ well beyond rounding)."""
    cfg = ModelConfig(**{**dict(n_layers=2, d_model=16, n_heads=2, d_ff=24, vocab_size=32, n_experts=4,
                                experts_per_token=2, moe_d_ff=20), **fields})
    layer = build_model(cfg, seed=seed).layers["1"].mlp
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(20)
    return layer


def reference(layer: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output [T, d] and load-balancing loss of `layer`, token by token, slot by slot."""
    cfg, k, n = layer.cfg, layer.cfg.experts_per_token, layer.cfg.n_experts
    logits = x @ layer.router.weight.t()
    probs = logits.softmax(-1)
    choices = []
    for t in range(x.shape[0]):
        if cfg.router_softmax == "after":
            top, experts = logits[t].topk(k)
            weights = top.softmax(-1)
        else:
            weights, experts = probs[t].topk(k)
            weights = weights / weights.sum() if cfg.router_norm_topk else weights
        choices.append((weights, experts))
    kept = {}
    limit = math.ceil(cfg.capacity_factor * x.shape[0] * k / n) if cfg.capacity_factor else None
    taken = [0] * n
    for j in range(k):  # every token's first choice before any second choice
        for t in range(x.shape[0]):
            e = int(choices[t][1][j])
            kept[t, j] = limit is None or taken[e] < limit
            taken[e] += 1
    w = layer.experts
    rows = []
    for t in range(x.shape[0]):
        y = torch.zeros_like(x[t])
        for j in range(k):
            e = int(choices[t][1][j])
            if kept[t, j]:
                hidden = F.silu(w.w_gate[e] @ x[t]) * (w.w_up[e] @ x[t])
                y = y + choices[t][0][j] * (w.w_down[e] @ hidden)
        if layer.shared is not None:
            s = layer.shared.w_down(F.silu(layer.shared.w_gate(x[t])) * layer.shared.w_up(x[t]))
            y = y + (torch.sigmoid(layer.shared_gate(x[t])) * s if layer.shared_gate is not None else s)
        rows.append(y)
    chosen = torch.zeros(n)
    for _, experts in choices:
        chosen[experts] += 1
    aux = n * (chosen / x.shape[0] * probs.mean(0)).sum()
    return torch.stack(rows), aux


CASES = {
    "mixtral": dict(),
    "no_renorm": dict(router_norm_topk=False),
    "softmax_after": dict(router_softmax="after", experts_per_token=3),
    "shared_gated": dict(n_shared_experts=2, shared_d_ff=12, shared_expert_gate=True),
    "shared_plain": dict(n_shared_experts=1),
    "capacity_1": dict(capacity_factor=1.0),
    "capacity_half_top1": dict(capacity_factor=0.5, experts_per_token=1),
}


@pytest.mark.parametrize("case", CASES)
def test_moe_layer_matches_a_plain_reference(case):
    layer = moe_layer(**CASES[case])
    x = torch.randn(24, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = layer(x[None])[0]
    want, aux = reference(layer, x)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert layer.last.aux_loss.item() == pytest.approx(aux.item() * layer.aux_weight, rel=1e-6)
    routing = layer.router(x)
    torch.testing.assert_close(load_balancing_loss(routing.probs, routing.experts), aux)
    if layer.cfg.capacity_factor:  # tokens really were dropped, and counted
        assert layer.last.dropped > 0
    assert int(layer.last.counts.sum()) == 24 * layer.cfg.experts_per_token
    # gradients of every parameter and the input, through the output and the load-balancing loss
    grad = torch.randn_like(out)
    got = torch.autograd.grad((out * grad).sum() + layer.last.aux_loss, [x, *layer.parameters()])
    expected = torch.autograd.grad((want * grad).sum() + aux * layer.aux_weight, [x, *layer.parameters()])
    for name, a, b in zip(["x", *(n for n, _ in layer.named_parameters())], got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_grouped_matmul_and_the_loop_over_experts_agree(monkeypatch):
    layer = moe_layer()
    x = torch.randn(2, 12, 16, generator=torch.Generator().manual_seed(2))
    runs = []
    for grouped in (True, False):
        monkeypatch.setattr(moe_module, "grouped_mm_runs", lambda _: grouped)
        out = layer(x)
        runs.append((out, torch.autograd.grad(out.square().sum(), list(layer.experts.parameters()))))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-6, atol=1e-6)
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_load_balancing_loss_joins_the_training_loss():
    cfg = build_train_config({"model": TINY_MOE}).model
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(3))
    losses, grads = [], []
    for coef in (0.0, 0.5):
        model = build_model(ModelConfig(**{**TINY_MOE, "aux_loss_coef": coef}), seed=1)
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        losses.append(loss.item())
        grads.append(model.layers["1"].mlp.router.weight.grad.clone())
        terms = [layer.mlp.last.aux_loss for layer in model.layers.values() if isinstance(layer.mlp, MoE)]
    # the same routing either way: the loss grew by the coefficient times the mean per-layer loss
    aux = sum(terms).item()
    assert losses[1] - losses[0] == pytest.approx(aux, rel=1e-4)
    assert aux == pytest.approx(0.5 * 2, rel=0.2)  # near k = 2 for a near-balanced router
    assert not torch.allclose(grads[0], grads[1])
    assert cfg.moe_layers == [1, 2, 3]  # block 0 is dense (dense_layers)


# --- parameter counts --------------------------------------------------------------------------

# published sizes (total, active), in billions, to the digits they are quoted with
PUBLISHED = {"mixtral-8x7b": (46.7, 12.9), "mixtral-8x22b": (141, 39), "qwen2-57b-a14b": (57.4, 14.2)}


@pytest.mark.parametrize("name", PUBLISHED)
def test_presets_have_the_published_total_and_active_sizes(name):
    model = build_train_config({"model": yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text())}).model
    total, active = PUBLISHED[name]
    digits = 0 if total > 100 else 1
    assert round(count_params(model) / 1e9, digits) == total
    assert round(count_active_params(model) / 1e9, digits) == active
    assert count_params(model) == sum(p.numel() for p in build_model(model, "meta").parameters())


def test_tiny_moe_counts_are_exact():
    cfg = build_train_config({"model": TINY_MOE}).model
    built = build_model(cfg, "meta")
    assert count_params(cfg) == sum(p.numel() for p in built.parameters())
    experts = sum(p.numel() for n, p in built.named_parameters() if ".experts." in n)
    assert expert_params(cfg) == experts == 3 * 4 * 3 * 64 * 96  # 3 MoE layers x 4 experts x SwiGLU
    assert count_active_params(cfg) == count_params(cfg) - experts // 2  # 2 of 4 experts per token


MIXTRAL_HF = dict(model_type="mixtral", architectures=["MixtralForCausalLM"], hidden_size=4096,
                  intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                  num_local_experts=8, num_experts_per_tok=2, vocab_size=32000, max_position_embeddings=32768,
                  rms_norm_eps=1e-5, rope_theta=1e6, router_aux_loss_coef=0.02, sliding_window=None,
                  tie_word_embeddings=False, hidden_act="silu")
QWEN2_MOE_HF = dict(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], hidden_size=3584,
                    intermediate_size=18944, moe_intermediate_size=2560, shared_expert_intermediate_size=20480,
                    num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, num_experts=64,
                    num_experts_per_tok=8, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
                    vocab_size=151936, max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1e6,
                    router_aux_loss_coef=0.001, use_sliding_window=False, tie_word_embeddings=False, hidden_act="silu")


@pytest.mark.parametrize("hf, preset", [(MIXTRAL_HF, "mixtral-8x7b"), (QWEN2_MOE_HF, "qwen2-57b-a14b")])
def test_hf_moe_configs_read_as_the_presets(tmp_path, hf, preset):
    (tmp_path / "config.json").write_text(json.dumps(hf))
    read = build_train_config({"model": {"hf_config": str(tmp_path / "config.json")}}).model
    want = build_train_config({"model": yaml.safe_load((ROOT / "conf" / "model" / f"{preset}.yaml").read_text())}).model
    assert count_params(read) == count_params(want) and count_active_params(read) == count_active_params(want)
    fields = ("n_experts", "experts_per_token", "expert_d_ff", "n_shared_experts", "shared_expert_d_ff",
              "shared_expert_gate", "router_softmax", "router_norm_topk", "aux_loss_coef", "moe_layers", "qkv_bias")
    assert {f: getattr(read, f) for f in fields} == {f: getattr(want, f) for f in fields}


def test_qwen2_moe_sparse_step_and_dense_layers(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(QWEN2_MOE_HF, decoder_sparse_step=2, mlp_only_layers=[5])))
    fields = model_from_hf_config(tmp_path / "config.json")
    assert ModelConfig(**fields).moe_layers == [1, 3, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27]


@pytest.mark.parametrize("hf, words", [
    (dict(MIXTRAL_HF, model_type="deepseek_v3"), "multi-head latent attention"),
    (dict(MIXTRAL_HF, model_type="qwen3_moe"), "q/k norms"),
    (dict(MIXTRAL_HF, router_jitter_noise=0.1), "router_jitter_noise"),
])
def test_hf_moe_configs_the_engine_cannot_compute_are_one_error_line(tmp_path, capsys, hf, words):
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert autotune_main(["estimate", f"model.hf_config={tmp_path / 'config.json'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: model.hf_config") and words in err[0], err


# --- refused plans and models ------------------------------------------------------------------

REFUSED = [
    (dict(dp=2, ep=3), {}, "plan.ep=3 must divide model.n_experts=4"),
    (dict(dp=2, ep=4), {}, "plan.ep=4 must divide plan.dp=2"),
    (dict(ep=0), {}, "plan.ep=0 must be at least 1"),
    (dict(dp=2, ep=2), {"n_experts": 0}, "needs a mixture-of-experts model"),
    (dict(tp=2), {}, "does not split experts over tensor-parallel ranks"),
    (dict(), {"experts_per_token": 5}, "model.experts_per_token=5 must be between 1 and model.n_experts=4"),
    (dict(), {"router_softmax": "sigmoid"}, "model.router_softmax='sigmoid'"),
    (dict(), {"capacity_factor": 0.0}, "model.capacity_factor=0.0 must be positive"),
    (dict(), {"dense_layers": [0, 1, 2, 3]}, "no layer is a MoE layer"),
    (dict(), {"n_shared_experts": 0}, "shared_expert_gate needs shared experts"),
]


@pytest.mark.parametrize("plan, model, message", REFUSED)
def test_refused_moe_plan_or_model_is_one_error_line(tmp_path, capsys, plan, model, message):
    cfg = {"model": {**TINY_MOE, **model}, "job": {"seq_len": 16, "global_batch": 8, "out_dir": str(tmp_path / "run")},
           "plan": {"micro_batch": 2, **plan}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert autotune_main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "run").exists()


# --- expert parallelism on 4 gloo ranks --------------------------------------------------------

def config(out_dir: Path, model: dict = TINY_MOE, **plan) -> dict:
    # every plan and its reference run micro-batches of 2 rows: the load-balancing loss and the
    # capacity are per micro-batch, so the same rows make the same batches of them
    job = {"seq_len": 16, "global_batch": 8, "steps": STEPS, "seed": 5, "out_dir": str(out_dir),
           "optimizer": {"lr": 1e-2, "warmup_steps": 1}}
    return {"model": model, "job": job, "plan": {"micro_batch": 2, **plan}}


DROPPING = {**TINY_MOE, "capacity_factor": 1.0, "aux_loss_coef": 0.1}


def from_hf(root: Path) -> dict:
    """Hugging Face weights (Qwen2-MoE names) under `root`, which every rank loads and cuts into its
    experts: the model fields that start from them."""
    from autotune.engine.hf import save_hf_weights

    if not (root / "hf").is_dir():
        save_hf_weights(build_model(ModelConfig(**{**TINY_MOE, "qkv_bias": True}), seed=9), root / "hf")
    return {"hf_config": str(root / "hf" / "config.json"), "init_from": str(root / "hf")}


def four_rank_spec(root: Path) -> dict:
    """What test_expert_parallel_plans_match_one_process trains on 4 ranks (tests/tp_pp_worker.py's
    SPEC), each run's folder under `root`: tests/conftest.py's four_rank_run launches it together
    with the other modules' 4-rank runs."""
    hf = from_hf(root)
    runs = {
        "dp4_ep2_zero0": config(root / "a", dp=4, ep=2),
        # experts FSDP-sharded over 2 edp ranks; per-operator checkpointing keeps the all-to-alls' and
        # the experts' grouped matmuls' outputs
        "dp4_ep2_zero3_op": config(root / "b", dp=4, ep=2, zero_stage=3, activation_checkpointing="op"),
        "dp4_ep4_zero1": config(root / "c", dp=4, ep=4, zero_stage=1),  # ZeRO-1 shards the experts within edp groups
        "pp2_dp2_ep2_1f1b_attention": config(root / "d", pp=2, dp=2, ep=2, activation_checkpointing="attention"),
        "pp2_dp2_ep2_zero3_gpipe_ckpt": config(root / "e", pp=2, dp=2, ep=2, zero_stage=3, pp_schedule="gpipe",
                                               activation_checkpointing="full"),
        "dp4_ep2_dropping": config(root / "f", DROPPING, dp=4, ep=2),
        "dp4_ep2_zero2_from_hf": config(root / "g", hf, dp=4, ep=2, zero_stage=2),
    }
    resume = {"dp4_ep2_zero3_resume": {"save_at": 3, "config": config(root / "resume", dp=4, ep=2, zero_stage=3)}}
    probe = {"probe_dp4_ep2": {"config": config(root / "probe", dp=4, ep=2), "warmup": 0, "steps": 2}}
    return {"runs": runs, "resume": resume, "probe": probe}


@pytest.mark.slow
def test_expert_parallel_plans_match_one_process(tmp_path, four_rank_run):
    root = four_rank_run["root"] / __name__
    runs, result = four_rank_spec(root)["runs"], four_rank_run["out"]
    reference = run_worker(tmp_path, "reference", {
        "runs": {"moe": config(tmp_path / "ref"), "dropping": config(tmp_path / "ref-drop", DROPPING),
                 "from_hf": config(tmp_path / "ref-hf", from_hf(root))},
        "load": {"from_ep2_zero3": {"config": config(tmp_path / "ref-load"),
                                    "checkpoint": str(root / "resume" / "ckpt" / "step-3")}},
    }, nproc=1)

    for name in runs:
        expected = reference["dropping" if "dropping" in name else "from_hf" if "from_hf" in name else "moe"]
        for key in ("loss", "grad_norm"):  # the loss holds the load-balancing term; the norm the router's gradient
            # rel 1e-4: fp32 sums reduced over gloo ranks in another order than one process (seen 1.1e-5)
            assert result[name][key] == pytest.approx(expected[key], rel=1e-4), (name, key)
        for step, (got, want) in enumerate(zip(result[name]["moe"], expected["moe"])):
            assert got == pytest.approx(want, rel=1e-5), (name, step)
    moe = reference["moe"]
    assert reference["from_hf"]["loss"][0] != pytest.approx(moe["loss"][0], rel=1e-3)  # other weights ran
    # AdamW's update hardly changes with a gradient's scale, but the norm (compared above) does: an
    # expert gradient not divided by ep shows there, as does one that misses the load-balancing term
    assert all(norm > 1.0 for norm in moe["grad_norm"])  # clipped: the norm enters every update too
    assert all(step["imbalance"] > 1 and step["dropped"] == 0 for step in moe["moe"])
    assert all(step["dropped"] > 0 for step in reference["dropping"]["moe"])  # capacity 1.0 drops slots
    assert result["dp4_ep2_zero0"]["mesh"] == {"pp": [0], "dp": [0, 1, 2, 3], "tp": [0]}
    resumed, moved = result["dp4_ep2_zero3_resume"], reference["from_ep2_zero3"]
    assert resumed["start"] == 3 and resumed["resumed"] == pytest.approx(resumed["straight"][3:], rel=1e-6)
    assert moved["start"] == 3 and moved["losses"] == pytest.approx(moe["loss"][3:], rel=1e-5)
    probed = result["probe_dp4_ep2"]
    assert probed["status"] == "ok" and probed["loss_first"] == pytest.approx(moe["loss"][0], rel=1e-5)
    first_two = [step["imbalance"] for step in moe["moe"][:2]]
    assert probed["moe"]["imbalance"] == pytest.approx(sum(first_two) / 2)  # the median of 2 measured steps


# --- Hugging Face: weights, and the logits of transformers' own models ----------------------------

def hf_tiny(kind: str, tmp_path: Path):
    """A tiny random transformers model of `kind`, its weights saved as Hugging Face saves them."""
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=5e5, tie_word_embeddings=False)
    if kind == "mixtral":
        config = transformers.MixtralConfig(**common, intermediate_size=40, num_hidden_layers=2, num_local_experts=4,
                                            num_experts_per_tok=2, router_aux_loss_coef=0.02)
        model = transformers.MixtralForCausalLM(config)
    else:
        config = transformers.Qwen2MoeConfig(**common, intermediate_size=48, moe_intermediate_size=24,
                                             shared_expert_intermediate_size=36, num_hidden_layers=3, num_experts=4,
                                             num_experts_per_tok=3, norm_topk_prob=False, mlp_only_layers=[1])
        model = transformers.Qwen2MoeForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # routers start at zero: every weight random, routing decisive
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    model.eval().save_pretrained(tmp_path / kind)
    return model, tmp_path / kind


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_logits_match_transformers(tmp_path, kind):
    from autotune.engine.hf import load_hf_weights

    hf_model, folder = hf_tiny(kind, tmp_path)
    cfg = build_train_config({"model": {"hf_config": str(folder / "config.json"), "init_from": str(folder)}}).model
    model = build_model(cfg, seed=3)
    load_hf_weights(model, folder)
    tokens = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf_model(tokens, output_router_logits=True)
    torch.testing.assert_close(ours, theirs.logits, rtol=1e-5, atol=1e-5)
    # each layer's load-balancing loss is HF's for that layer alone (HF pools the layers' statistics)
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    moe_blocks = [block.mlp for block in model.layers.values() if isinstance(block.mlp, MoE)]
    hf_logits = [r for r in theirs.router_logits if r is not None and r.shape[-1] == cfg.n_experts]
    assert len(moe_blocks) == len(hf_logits) == len(cfg.moe_layers)
    for layer, router_logits in zip(moe_blocks, hf_logits):
        want = load_balancing_loss_func((router_logits,), cfg.n_experts, cfg.experts_per_token)
        assert float(layer.last.aux_loss) / layer.aux_weight == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_engine_weights_load_into_transformers(tmp_path, kind):
    """The way back: the engine writes config.json and per-expert tensors that transformers loads."""
    transformers = pytest.importorskip("transformers")
    from autotune.engine.hf import save_hf_weights

    _, folder = hf_tiny(kind, tmp_path)
    cfg = build_train_config({"model": {"hf_config": str(folder / "config.json")}}).model
    model = build_model(cfg, seed=4)  # the engine's own weights, not the folder's
    save_hf_weights(model, tmp_path / "ours", max_shard_bytes=60_000)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    tokens = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), loaded(tokens).logits, rtol=1e-5, atol=1e-5)
