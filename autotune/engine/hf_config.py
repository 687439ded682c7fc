"""A Hugging Face config.json as the engine's ModelConfig fields (`model.hf_config=PATH`): the
llama-family kinds, gpt2, and the Mixtral and Qwen2-MoE mixtures of experts; a model whose layers
the engine does not compute is refused in one line that says what it lacks."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from autotune.engine.config import ConfigError

HF_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2", "mixtral", "qwen2_moe")
# mixture-of-experts families whose layers the engine does not compute, and what it lacks
HF_REFUSED_MOE = {
    "deepseek_v2": "multi-head latent attention and group-limited routing",
    "deepseek_v3": "multi-head latent attention and sigmoid group-limited routing with expert biases",
    "qwen3_moe": "q/k norms in attention", "olmoe": "q/k norms in attention",
    "dbrx": "clipped fused qkv", "jamba": "Mamba layers", "phimoe": "sparsemixer routing",
    "gpt_oss": "attention sinks and clamped, biased experts", "granitemoe": "scaled embeddings and residuals",
    "jetmoe": "mixture-of-attention heads",
}


def model_from_hf_config(path: str | Path) -> dict[str, Any]:
    """Map a Hugging Face config.json to ModelConfig fields."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        hf = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"model.hf_config: no such file {path}; give the path of a Hugging Face config.json")
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"model.hf_config: cannot read {path} as JSON ({e})")
    kind = hf.get("model_type")
    if kind in HF_REFUSED_MOE:
        raise ConfigError(f"model.hf_config: {path} is a {kind} model, whose {HF_REFUSED_MOE[kind]} the engine "
                          f"does not compute; supported: {', '.join(HF_MODEL_TYPES)}")
    if kind not in HF_MODEL_TYPES:
        raise ConfigError(
            f"model.hf_config: model_type {kind!r} is not supported; supported: {', '.join(HF_MODEL_TYPES)}"
        )
    _check_hf_architecture(hf, kind, path)
    name = hf.get("_name_or_path") or path.parent.name or kind
    try:
        if kind == "gpt2":
            d = hf["n_embd"]
            return dict(
                name=name, family="gpt2", n_layers=hf["n_layer"], d_model=d, n_heads=hf["n_head"],
                n_kv_heads=None, d_ff=hf.get("n_inner") or 4 * d, vocab_size=hf["vocab_size"],
                max_seq_len=hf["n_positions"], norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                tie_embeddings=True,
            )
        return dict(
            name=name, family="llama", n_layers=hf["num_hidden_layers"], d_model=hf["hidden_size"],
            n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            d_ff=hf["intermediate_size"], vocab_size=hf["vocab_size"],
            max_seq_len=_hf_max_seq_len(hf, kind), norm_eps=hf.get("rms_norm_eps", 1e-5),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # only where it differs, so that the usual config names d_model / n_heads as before
            attn_head_dim=None if hf.get("head_dim") in (None, hf["hidden_size"] // hf["num_attention_heads"])
            else hf["head_dim"],
            # transformers 5 writes rope_theta and the scaling into rope_parameters
            rope_theta=float(hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            qkv_bias=kind in ("qwen2", "qwen2_moe"),
            **_hf_rope_scaling(hf.get("rope_scaling") or hf.get("rope_parameters"), path), **_hf_experts(hf, kind, path),
        )
    except KeyError as e:
        raise ConfigError(f"model.hf_config: {path} lacks the key {e.args[0]!r} that a {kind} config has")


def _check_hf_architecture(hf: dict[str, Any], kind: str, path: Path) -> None:
    """Refuse what the engine's two families do not compute, rather than train another model."""
    act = hf.get("activation_function", "gelu_new") if kind == "gpt2" else hf.get("hidden_act", "silu")
    acts = ("gelu_new", "gelu_pytorch_tanh") if kind == "gpt2" else ("silu",)
    if act not in acts:
        raise ConfigError(f"model.hf_config: {path} uses activation {act!r}; a {kind} model here uses {acts[0]}")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ConfigError(f"model.hf_config: {path} sets {key}=true, which the engine's {kind} model does not have")


def _hf_experts(hf: dict[str, Any], kind: str, path: Path) -> dict[str, Any]:
    """Mixtral's and Qwen2-MoE's mixture-of-experts keys -> ModelConfig fields (none for dense kinds).
    Both route softmax-then-top-k; Mixtral always renormalises the k weights."""
    if kind == "mixtral":
        if hf.get("router_jitter_noise"):
            raise ConfigError(f"model.hf_config: {path} sets router_jitter_noise, which the engine's router does not add")
        return dict(n_experts=hf["num_local_experts"], experts_per_token=hf["num_experts_per_tok"],
                    router_norm_topk=True, aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.02)))
    if kind != "qwen2_moe":
        return {}
    shared = hf.get("shared_expert_intermediate_size") or 0
    return dict(n_experts=hf["num_experts"], experts_per_token=hf["num_experts_per_tok"],
                moe_d_ff=hf["moe_intermediate_size"], n_shared_experts=1 if shared else 0,
                shared_d_ff=shared or None, shared_expert_gate=bool(shared),
                router_norm_topk=bool(hf.get("norm_topk_prob", False)),
                aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
                moe_every=hf.get("decoder_sparse_step", 1), dense_layers=list(hf.get("mlp_only_layers") or []))


def _hf_max_seq_len(hf: dict[str, Any], kind: str) -> int:
    """max_position_embeddings, capped at a sliding attention window where there is one (Mistral
    v0.1, Qwen2 with use_sliding_window): within the window the engine's full attention is the same."""
    longest = hf.get("max_position_embeddings", 4096)
    window = hf.get("sliding_window") if hf.get("use_sliding_window", kind in ("mistral", "mixtral")) else None
    return min(longest, window) if window else longest


def _hf_rope_scaling(scaling: dict[str, Any] | None, path: Path) -> dict[str, Any]:
    """HF rope_scaling -> ModelConfig fields: none, or Llama 3.1+'s "llama3"."""
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return {}
    if kind != "llama3":
        raise ConfigError(f"model.hf_config: {path} has rope_scaling type {kind!r}; supported: llama3 (or none)")
    return dict(
        rope_scaling_factor=float(scaling["factor"]), rope_low_freq_factor=float(scaling["low_freq_factor"]),
        rope_high_freq_factor=float(scaling["high_freq_factor"]),
        rope_original_max_seq_len=int(scaling["original_max_position_embeddings"]),
    )
