"""Hugging Face safetensors weights in and out of the engine's model (`model.init_from=DIR`).

A folder holds either `model.safetensors` or shards listed by `model.safetensors.index.json`
({"weight_map": {tensor name: shard file}}), read and written with the `safetensors` package: its
safe_open reads the headers (names, shapes, dtypes) without the data, then one tensor at a time.

Names: llama / mistral / qwen2 (`model.layers.N.self_attn.q_proj.weight`, ...) and gpt2 (`h.N.attn.
c_attn.weight`, ..., with or without a `transformer.` prefix). HF llama keeps q/k in the
"rotate_half" (halves) rotary layout that `engine.model.apply_rope` uses, so they load unpermuted.
gpt2's Conv1D weights are stored [in, out] and its q, k, v fused in `c_attn`: they are transposed
and split. Mixture-of-experts layers: Mixtral (`block_sparse_moe.gate`, `block_sparse_moe.experts.N.
w1/w2/w3`) or Qwen2-MoE (`mlp.gate`, `mlp.experts.N.gate_proj/up_proj/down_proj`, `mlp.shared_expert.*`,
`mlp.shared_expert_gate`), read as the checkpoint names them; each expert is its own nn.Linear
tensor there and one row of the engine's stacked [E, ., .] expert parameters here.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from autotune.engine.config import ConfigError, ModelConfig
from autotune.engine.files import atomic_path, write_atomic
from autotune.engine.model import Transformer, _copy_full

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = ("F64", "F32", "F16", "BF16")  # the safetensors dtypes of weights the engine reads


class Rule(NamedTuple):
    """Where an engine parameter lives in a HF checkpoint."""

    hf_name: str
    transpose: bool = False  # gpt2 Conv1D stores [in, out]
    part: int | None = None  # index into gpt2's fused q|k|v
    stacked: int = 0  # the parameter stacks this many tensors, one per expert: hf_name holds "{e}"

    def names(self) -> list[str]:
        return [self.hf_name.format(e=e) for e in range(self.stacked)] if self.stacked else [self.hf_name]


LLAMA_TOP = {"tok_emb.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
LLAMA_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    **{f"attn.{w}.{kind}": f"self_attn.{p}_proj.{kind}"
       for w, p in (("wq", "q"), ("wk", "k"), ("wv", "v"), ("wo", "o")) for kind in ("weight", "bias")},
    "mlp.w_gate.weight": "mlp.gate_proj.weight",
    "mlp.w_up.weight": "mlp.up_proj.weight",
    "mlp.w_down.weight": "mlp.down_proj.weight",
}
MIXTRAL_MOE = {
    "mlp.router.weight": "block_sparse_moe.gate.weight",
    **{f"mlp.experts.{w}": f"block_sparse_moe.experts.{{e}}.{hf}.weight"
       for w, hf in (("w_gate", "w1"), ("w_down", "w2"), ("w_up", "w3"))},
}
QWEN2_MOE = {
    "mlp.router.weight": "mlp.gate.weight",
    **{f"mlp.experts.{w}": f"mlp.experts.{{e}}.{hf}.weight"
       for w, hf in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj"))},
    **{f"mlp.shared.{w}.weight": f"mlp.shared_expert.{hf}.weight"
       for w, hf in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj"))},
    "mlp.shared_gate.weight": "mlp.shared_expert_gate.weight",
}
GPT2_TOP = {"tok_emb.weight": "wte.weight", "pos_emb.weight": "wpe.weight",
            "norm.weight": "ln_f.weight", "norm.bias": "ln_f.bias"}
GPT2_BLOCK = {
    "attn_norm.weight": Rule("ln_1.weight"), "attn_norm.bias": Rule("ln_1.bias"),
    "mlp_norm.weight": Rule("ln_2.weight"), "mlp_norm.bias": Rule("ln_2.bias"),
    **{f"attn.{w}.weight": Rule("attn.c_attn.weight", True, i) for i, w in enumerate(("wq", "wk", "wv"))},
    **{f"attn.{w}.bias": Rule("attn.c_attn.bias", False, i) for i, w in enumerate(("wq", "wk", "wv"))},
    "attn.wo.weight": Rule("attn.c_proj.weight", True), "attn.wo.bias": Rule("attn.c_proj.bias"),
    "mlp.w_up.weight": Rule("mlp.c_fc.weight", True), "mlp.w_up.bias": Rule("mlp.c_fc.bias"),
    "mlp.w_down.weight": Rule("mlp.c_proj.weight", True), "mlp.w_down.bias": Rule("mlp.c_proj.bias"),
}


def hf_rules(model: Transformer, prefix: str = "", moe: dict[str, str] | None = None) -> dict[str, Rule]:
    """Engine parameter name -> its Rule, for the parameters this model (or pipeline stage) holds.
    moe: the names of MoE layers' tensors (MIXTRAL_MOE or QWEN2_MOE); None: as `hf_moe_kind` writes."""
    gpt2 = model.cfg.family == "gpt2"
    moe = moe if moe is not None else (MIXTRAL_MOE if hf_moe_kind(model.cfg) == "mixtral" else QWEN2_MOE)
    rules = {}
    for name, _ in model.named_parameters():
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            if rest in moe:
                rule = Rule(moe[rest], stacked=model.cfg.n_experts if ".experts." in name else 0)
            else:
                rule = GPT2_BLOCK[rest] if gpt2 else Rule(LLAMA_BLOCK[rest])
            rule = rule._replace(hf_name=(f"h.{i}." if gpt2 else f"model.layers.{i}.") + rule.hf_name)
        else:
            rule = Rule((GPT2_TOP if gpt2 else LLAMA_TOP)[name])
        rules[name] = rule._replace(hf_name=prefix + rule.hf_name)
    return rules


def hf_moe_kind(cfg: ModelConfig) -> str | None:
    """The Hugging Face family a MoE model is written as (None for a dense model): Mixtral (every
    layer MoE, no shared experts, no q/k/v biases, renormalised top-k) or Qwen2-MoE (q/k/v biases,
    shared experts behind their gate, if any); both route softmax first."""
    if cfg.n_experts == 0:
        return None
    if cfg.router_softmax == "before" and not cfg.qkv_bias and not cfg.n_shared_experts and cfg.router_norm_topk \
            and cfg.moe_layers == list(range(cfg.n_layers)):
        return "mixtral"
    if cfg.router_softmax == "before" and cfg.qkv_bias and cfg.shared_expert_gate == bool(cfg.n_shared_experts):
        return "qwen2_moe"
    raise ConfigError(
        "this mixture-of-experts model has no Hugging Face config: Mixtral's has every layer MoE, no shared "
        "experts, no q/k/v biases and renormalised top-k weights, Qwen2-MoE's q/k/v biases and gated shared "
        "experts (if any); both take the top k of a softmax (router_softmax=before)"
    )


def _moe_names(names: set[str]) -> dict[str, str]:
    """Which family's MoE tensor names a checkpoint uses."""
    return MIXTRAL_MOE if any(".block_sparse_moe." in n for n in names) else QWEN2_MOE


def _ignorable(name: str, cfg: ModelConfig) -> bool:
    """Tensors a HF checkpoint may hold that the engine recomputes or shares."""
    if name.endswith(("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")):  # rope table, causal masks
        return True
    return cfg.tie_embeddings and name == "lm_head.weight"


# --- reading --------------------------------------------------------------------------------

class HFCheckpoint:
    """The tensors of a HF weights folder (one file or shards), read by name: safetensors' safe_open
    maps each file and parses its header, and a tensor is read only when asked for."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"model.init_from: no such file or folder {path}; give a folder of Hugging Face weights")
        if path.is_file() and path.suffix == ".safetensors":
            self.folder, single = path.parent, path.name
        elif (path / INDEX_FILE).is_file():
            self.folder, single = path, None
        elif (path / SINGLE_FILE).is_file():
            self.folder, single = path, SINGLE_FILE
        else:
            raise ConfigError(
                f"model.init_from: no {SINGLE_FILE} or {INDEX_FILE} in {path}; give a folder of Hugging Face "
                "safetensors weights (pytorch_model.bin is not read)"
            )
        self._files: dict[str, safe_open] = {}
        self.where: dict[str, str] = dict.fromkeys(self._open(single).keys(), single) if single else self._index()

    def _index(self) -> dict[str, str]:
        """Tensor name -> shard file, from the index as Hugging Face writes it."""
        index = self.folder / INDEX_FILE
        try:
            weight_map = dict(json.loads(index.read_text())["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"model.init_from: {index} is not a safetensors index ({e})")
        for file in sorted(set(weight_map.values())):
            if not (self.folder / file).is_file():
                raise ConfigError(f"model.init_from: the index names {file}, which is not in {self.folder}")
        return weight_map

    def _open(self, file: str) -> safe_open:
        if file not in self._files:
            path = self.folder / file
            try:
                self._files[file] = safe_open(path, framework="pt")
            except SafetensorError as e:
                detail = str(e).removeprefix("Error while deserializing header: ")
                raise ConfigError(f"model.init_from: {path} is not a safetensors file, or one with a corrupt "
                                  f"header entry ({detail}); save or download it again")
        return self._files[file]

    def names(self) -> set[str]:
        return set(self.where)

    def _file_of(self, name: str) -> safe_open:
        file = self._open(self.where[name])
        if name not in file.keys():
            raise ConfigError(f"model.init_from: the index puts tensor {name} in {self.where[name]}, which lacks it")
        return file

    def shape(self, name: str) -> list[int]:
        """A tensor's shape, from the header alone; its dtype checked to be one the engine reads."""
        info = self._file_of(name).get_slice(name)
        if info.get_dtype() not in DTYPES:
            raise ConfigError(
                f"model.init_from: tensor {name} in {self.folder / self.where[name]} has dtype {info.get_dtype()}; "
                f"supported: {', '.join(DTYPES)}"
            )
        return list(info.get_shape())

    def get(self, name: str) -> torch.Tensor:
        self.shape(name)
        return self._file_of(name).get_tensor(name)


def _engine_shape(hf_shape: list[int], rule: Rule) -> list[int]:
    """The shape a HF tensor has once read into the engine's layout."""
    shape = hf_shape[::-1] if rule.transpose else list(hf_shape)
    if rule.part is not None and shape and shape[0] % 3 == 0:
        shape[0] //= 3
    return [rule.stacked, *shape] if rule.stacked else shape


def _match(model: Transformer, ckpt: HFCheckpoint, path: str | Path) -> dict[str, Rule]:
    """The Rule of each of the model's parameters, checked against the checkpoint's headers only:
    every parameter present with its shape and a readable dtype, every tensor with a place in the
    full model (else the model config does not match the weights)."""
    names = ckpt.names()
    prefix = "transformer." if model.cfg.family == "gpt2" and "transformer.wte.weight" in names else ""
    moe = _moe_names(names)
    with torch.device("meta"):  # the full model's names, whatever part of it this model holds
        expected = {n for r in hf_rules(Transformer(model.cfg), prefix, moe).values() for n in r.names()}
    extra = sorted(n for n in names - expected if not _ignorable(n, model.cfg))
    if extra:
        raise ConfigError(
            f"model.init_from: {path} holds tensors the model has no place for ({', '.join(extra[:3])}"
            f"{', ...' if len(extra) > 3 else ''}); the model config does not match these weights "
            f"(give model.hf_config=DIR/config.json of the same weights)"
        )
    params = dict(model.named_parameters())
    rules = hf_rules(model, prefix, moe)
    for name, rule in rules.items():
        missing = [n for n in rule.names() if n not in names]
        if missing:
            raise ConfigError(
                f"model.init_from: {path} lacks tensor {missing[0]} (for the engine's {name}); "
                "the model config does not match these weights"
            )
        shapes = {tuple(ckpt.shape(n)) for n in rule.names()}
        if len(shapes) > 1:
            raise ConfigError(f"model.init_from: the experts of {rule.hf_name} have different shapes {sorted(shapes)}")
        shape = _engine_shape(list(shapes.pop()), rule)
        if shape != list(params[name].shape):
            raise ConfigError(
                f"model.init_from: tensor {rule.hf_name} has shape {shape}"
                f"{' (as the engine reads it)' if rule.transpose or rule.part is not None else ''}, the engine's "
                f"{name} needs {list(params[name].shape)}; the model config does not match these weights"
            )
    return rules


def check_hf_weights(cfg: ModelConfig, path: str | Path) -> None:
    """Raise ConfigError unless `path` holds weights for this model (reads headers, not data)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    _match(model, HFCheckpoint(path), path)


@torch.no_grad()
def load_hf_weights(model: Transformer, path: str | Path) -> None:
    """Copy the Hugging Face weights at `path` (folder or .safetensors file) into `model`'s parameters.

    Checked first as `check_hf_weights` does. A pipeline stage that dropped blocks loads the blocks
    it holds. Works on plain and sharded (DTensor) parameters; loading before sharding is cheapest.
    """
    ckpt = HFCheckpoint(path)
    rules = _match(model, ckpt, path)
    params = dict(model.named_parameters())
    for name, rule in rules.items():
        t = torch.stack([ckpt.get(n) for n in rule.names()]) if rule.stacked else ckpt.get(rule.hf_name)
        if rule.transpose:
            t = t.t()
        if rule.part is not None:
            t = t.chunk(3, dim=0)[rule.part]
        _copy_full(params[name], t.to(params[name].dtype))


# --- writing (tests, and handing a trained model to Hugging Face tools) ---------------------

@torch.no_grad()
def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's parameters under Hugging Face names and layouts (gpt2: fused, [in, out])."""
    params = dict(model.named_parameters())
    grouped: dict[str, list[tuple[Rule, torch.Tensor]]] = {}
    for name, rule in hf_rules(model).items():
        p = params[name]
        grouped.setdefault(rule.hf_name, []).append((rule, p.full_tensor() if hasattr(p, "full_tensor") else p))
    out = {}
    for hf_name, parts in grouped.items():
        parts.sort(key=lambda rp: rp[0].part or 0)
        t = torch.cat([p for _, p in parts]) if len(parts) > 1 else parts[0][1]
        t = (t.t() if parts[0][0].transpose else t).detach().cpu()
        rule = parts[0][0]
        out.update(zip(rule.names(), t.unbind(0)) if rule.stacked else [(hf_name, t)])
    return {name: t.contiguous() for name, t in out.items()}


def hf_config(cfg: ModelConfig) -> dict:
    """A Hugging Face config.json for the model (what `model.hf_config` reads back)."""
    if cfg.family == "gpt2":
        if cfg.attn_head_dim is not None:
            raise ConfigError("a gpt2 model with model.attn_head_dim has no Hugging Face config; unset attn_head_dim")
        return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=cfg.d_model, n_layer=cfg.n_layers,
                    n_head=cfg.n_heads, n_inner=cfg.d_ff, vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len,
                    layer_norm_epsilon=cfg.norm_eps, activation_function="gelu_new", tie_word_embeddings=True)
    kind, arch = ("qwen2", "Qwen2ForCausalLM") if cfg.qkv_bias else ("llama", "LlamaForCausalLM")
    scaling = None if cfg.rope_scaling_factor == 1 else dict(
        rope_type="llama3", factor=cfg.rope_scaling_factor, low_freq_factor=cfg.rope_low_freq_factor,
        high_freq_factor=cfg.rope_high_freq_factor, original_max_position_embeddings=cfg.rope_original_max_seq_len)
    common = dict(hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                  num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
                  vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                  rope_theta=cfg.rope_theta, rope_scaling=scaling, tie_word_embeddings=cfg.tie_embeddings,
                  hidden_act="silu", head_dim=cfg.head_dim)
    moe = hf_moe_kind(cfg)
    if moe == "mixtral":
        return dict(common, model_type=moe, architectures=["MixtralForCausalLM"], intermediate_size=cfg.expert_d_ff,
                    num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.experts_per_token,
                    router_aux_loss_coef=cfg.aux_loss_coef, sliding_window=None)
    if moe == "qwen2_moe":
        return dict(common, model_type=moe, architectures=["Qwen2MoeForCausalLM"], num_experts=cfg.n_experts,
                    num_experts_per_tok=cfg.experts_per_token, moe_intermediate_size=cfg.expert_d_ff,
                    shared_expert_intermediate_size=cfg.n_shared_experts * cfg.shared_expert_d_ff,
                    norm_topk_prob=cfg.router_norm_topk, router_aux_loss_coef=cfg.aux_loss_coef,
                    decoder_sparse_step=cfg.moe_every, mlp_only_layers=list(cfg.dense_layers), use_sliding_window=False)
    return dict(common, model_type=kind, architectures=[arch])


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write `tensors` as one safetensors file (metadata format "pt", as Hugging Face writes it),
    atomically. A tensor given under two names (a tied copy) is written twice."""
    seen, whole = set(), {}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        storage = t.untyped_storage().data_ptr()
        whole[name] = t.clone() if storage in seen else t  # save_file refuses tensors that share memory
        seen.add(storage)
    with atomic_path(path) as tmp:
        save_file(whole, tmp, metadata={"format": "pt"})


def save_hf_weights(model: Transformer, path: str | Path, max_shard_bytes: int | None = None) -> None:
    """Write the model as a Hugging Face folder: config.json and model.safetensors, or shards of at
    most `max_shard_bytes` (a tensor never split) with model.safetensors.index.json."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(model)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        write_safetensors(folder / SINGLE_FILE, shards[0])
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(folder / file, shard)
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_atomic(folder / INDEX_FILE, json.dumps(index, indent=2))
    write_atomic(folder / "config.json", json.dumps(hf_config(model.cfg), indent=2))
