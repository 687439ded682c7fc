"""The schema of what the engine runs: model, job and plan, as OmegaConf structured configs.

The engine owns this schema; the planner imports it, the Hydra tree in `conf/` fills it and the
search writes it back out. Every check that can be made without hardware is made here, when a
config is built, and each violation is one `ConfigError` that says what to change. A setting with a
fixed set of values is an enum (`choices`): OmegaConf checks it when a config is read, and a
config dataclass built in Python converts its strings (`check_choices`). The dataclass defaults are
the only defaults.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
from dataclasses import dataclass, field, fields
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any, List, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A mistake of the user's: reported as one `error: ...` line and exit status 2."""


def choices(name: str, *values: str) -> type[StrEnum]:
    """An enum of the allowed values of one setting, each member named by its value: OmegaConf reads
    a YAML string or an override by member name, and a StrEnum member prints and compares as its
    value. Made with the functional API because some values (1f1b) are not Python identifiers."""
    return StrEnum(name, [(v, v) for v in values])


Family = choices("Family", "llama", "gpt2")
Precision = choices("Precision", "fp32", "bf16", "fp16")
# none; full: every block recomputed; selective: every k-th block; op: every block under a
# per-operator policy (matmul and attention outputs kept, every k-th matmul's for k = 1 or 2, the
# rest recomputed: torchtitan's); attention: only the attention core recomputed (Megatron's)
Checkpointing = choices("Checkpointing", "none", "full", "selective", "op", "attention")
OP_CHECKPOINT_EVERY_K = (1, 2)  # op: keep every matmul's output, or every other one's
PipelineSchedule = choices("PipelineSchedule", "gpipe", "1f1b", "interleaved_1f1b")
Kernels = choices("Kernels", "torch", "triton")
# sdpa: SDPA's own choice (FlashAttention-2 for 16-bit on CUDA, its flash kernel on the CPU);
# cudnn: cuDNN's fused attention (SDPA's CUDNN_ATTENTION; Transformer Engine's FusedAttention,
# which it prefers on Hopper), 16-bit on a CUDA GPU only
Attention = choices("Attention", "sdpa", "cudnn")
Float8 = choices("Float8", "none", "tensorwise", "rowwise")
# The dtype data-parallel gradients are reduced in (FSDP2's reduce_dtype, DDP's bf16_compress_hook,
# DeepSpeed's communication_data_type): bf16 halves their traffic but rounds the summed gradients,
# so it needs 16-bit compute and the search never picks it (as DeepSpeed's autotuner, it leaves
# it to the user; searched plans reduce in fp32)
ReduceDtype = choices("ReduceDtype", "fp32", "bf16")
TokenDtype = choices("TokenDtype", "uint16", "uint32")
RouterSoftmax = choices("RouterSoftmax", "before", "after")

PRECISIONS = tuple(Precision.__members__)  # as plain strings, for the cost model's tables
KERNELS = tuple(Kernels.__members__)
FLOAT8 = tuple(Float8.__members__)


def choice_error(key: str, value: Any, allowed: typing.Iterable[str]) -> str:
    """The one message of a value that is not one of a setting's choices."""
    return f"{key}={str(value)!r}: use one of {', '.join(allowed)}"


def check_choices(config: Any, section: str) -> None:
    """Turn the plain strings of a config built in Python into its enum members (OmegaConf does this
    for YAML and overrides); a value that is none of them is a ConfigError naming the choices."""
    hints = _enum_fields(type(config))
    for name, enum in hints.items():
        value = getattr(config, name)
        items = value if isinstance(value, list) else [value]
        try:
            converted = [v if isinstance(v, enum) else enum[v] for v in items]
        except (KeyError, TypeError):
            bad = next(v for v in items if not isinstance(v, enum) and v not in enum.__members__)
            raise ConfigError(choice_error(f"{section}.{name}", bad, enum.__members__)) from None
        setattr(config, name, converted if isinstance(value, list) else converted[0])


@functools.cache
def _enum_fields(cls: type) -> dict[str, type[Enum]]:
    """The fields of a config dataclass typed by an enum (or a list of one)."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint)
        kind = args[0] if typing.get_origin(hint) is list and args else hint
        if isinstance(kind, type) and issubclass(kind, Enum):
            out[name] = kind
    return out


@dataclass
class ModelConfig:
    """A decoder-only transformer architecture (see conf/model/). The defaults are the `tiny` model
    (conf/model/tiny.yaml) without its grouped-query attention."""

    name: str = "tiny"
    family: Family = Family.llama
    n_layers: int = 4
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None: as many as n_heads (no grouped-query attention)
    # width of one attention head; None: d_model / n_heads. Set where the heads together are not
    # d_model wide (HF head_dim, e.g. Mistral-NeMo; one tensor-parallel rank's share of a model)
    attn_head_dim: Optional[int] = None
    d_ff: int = 160
    vocab_size: int = 256
    max_seq_len: int = 128
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    # Llama 3.1+ rope scaling (HF rope_scaling type "llama3"); a factor of 1 is none
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    qkv_bias: bool = False  # Qwen2: biases on q, k, v only
    init_std: float = 0.02
    # Mixture of experts (n_experts > 0, llama family; autotune/engine/moe.py): the MLP of each MoE
    # layer is a router over n_experts SwiGLU experts of width moe_d_ff, experts_per_token of which
    # each token uses, plus n_shared_experts that every token uses (Qwen2-MoE)
    n_experts: int = 0
    experts_per_token: int = 2  # top-k (HF num_experts_per_tok)
    moe_d_ff: Optional[int] = None  # width of one routed expert; None: d_ff
    n_shared_experts: int = 0
    shared_d_ff: Optional[int] = None  # width of one shared expert; None: moe_d_ff
    shared_expert_gate: bool = False  # Qwen2-MoE: a per-token sigmoid gate on the shared experts' output
    # before: softmax over all experts, then top-k (Mixtral, Qwen2-MoE) | after: top-k logits, then softmax
    router_softmax: RouterSoftmax = RouterSoftmax.before
    router_norm_topk: bool = True  # rescale the top-k weights to sum to 1 (HF norm_topk_prob; Mixtral always)
    aux_loss_coef: float = 0.01  # load-balancing loss weight (HF router_aux_loss_coef); 0: none
    # None: dropless. Else an expert takes at most ceil(capacity_factor x tokens x k / n_experts) of
    # a micro-batch's tokens on each rank, first choices first; the rest of its slots are dropped
    capacity_factor: Optional[float] = None
    moe_every: int = 1  # layer i is MoE when (i + 1) % moe_every == 0 (HF decoder_sparse_step)
    dense_layers: List[int] = field(default_factory=list)  # layers kept dense, width d_ff (HF mlp_only_layers)
    hf_config: Optional[str] = None  # a Hugging Face config.json on disk; overrides the fields above
    init_from: Optional[str] = None  # a folder of Hugging Face safetensors weights to start from

    def __post_init__(self) -> None:
        check_choices(self, "model")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.d_model // self.n_heads

    @property
    def norm(self) -> str:
        return "layernorm" if self.family == "gpt2" else "rmsnorm"

    def is_moe_layer(self, i: int) -> bool:
        """Whether block i's MLP is a mixture of experts (HF Qwen2-MoE's rule)."""
        return self.n_experts > 0 and (i + 1) % self.moe_every == 0 and i not in self.dense_layers

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]

    @property
    def expert_d_ff(self) -> int:
        return self.moe_d_ff or self.d_ff

    @property
    def shared_expert_d_ff(self) -> int:
        return self.shared_d_ff or self.expert_d_ff


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | a path to a uint16/uint32 token .bin file
    dtype: TokenDtype = TokenDtype.uint16  # of the .bin file

    def __post_init__(self) -> None:
        check_choices(self, "job.data")


@dataclass
class JobConfig:
    """What the user decided and the tuner must not change."""

    seq_len: int = 64
    global_batch: int = 8  # sequences per optimizer step
    steps: int = 20
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 1234
    out_dir: str = "outputs/train"
    log_every: int = 1
    checkpoint_every: int = 0  # steps between checkpoints; 0: only at the end and on SIGTERM
    resume: bool = True  # continue from the newest complete checkpoint in out_dir
    # where to start when out_dir has no checkpoint: a step folder, or another run's out_dir
    resume_from: Optional[str] = None


@dataclass
class PlanConfig:
    """How the job is executed: the thing being tuned."""

    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    micro_batch: int = 1
    grad_accum: Optional[int] = None  # derived: global_batch / (micro_batch * dp)
    precision: Precision = Precision.fp32
    loss_scale: str = "dynamic"  # fp16 only: dynamic | none | a fixed number
    reduce_dtype: ReduceDtype = ReduceDtype.fp32  # see ReduceDtype
    activation_checkpointing: Checkpointing = Checkpointing.none
    checkpoint_every_k: int = 2  # selective: checkpoint every k-th block; op: keep every k-th matmul output
    dp: int = 1
    tp: int = 1
    pp: int = 1
    pp_schedule: PipelineSchedule = PipelineSchedule["1f1b"]
    pp_virtual_stages: int = 1  # stages per rank (interleaved_1f1b needs >= 2)
    sequence_parallel: bool = False
    async_tp: bool = False  # sequence parallel's collectives pipelined behind the matmuls (engine/async_tp.py)
    # expert parallelism: each group of ep data-parallel ranks splits a MoE layer's experts between
    # them and exchanges tokens all-to-all; the experts' states are data-parallel (and ZeRO-sharded)
    # over the dp / ep ranks that hold the same experts
    ep: int = 1
    # hybrid sharding (HSDP): ZeRO 1-3 shard over groups of dp / dp_replicate ranks and the groups
    # replicate each other (their gradients all-reduced once per step); 1: shard over all dp ranks
    dp_replicate: int = 1
    # context parallelism: each sequence split over cp ranks (2 chunks each, load-balanced causal
    # attention over a ring of k/v: autotune/engine/context_parallel.py); 1: whole sequences
    cp: int = 1
    kernels: Kernels = Kernels.torch
    attention: Attention = Attention.sdpa  # the attention kernel: see Attention
    compile: bool = False
    # under compile, the loss too where the model computes it on the whole vocabulary (tp 1, pp 1):
    # inductor fuses the fp32 upcast, log-softmax and nll with their backward, so neither the fp32
    # logits nor their gradients exist (torchtitan compiles its loss with the model since April 2025)
    compile_loss: bool = True
    # float8 training of the blocks' linears (torchao, dynamic scaling; autotune/engine/float8.py):
    # tensorwise (one scale a tensor; under ZeRO 1-3 the weights are all-gathered in float8) or
    # rowwise (a scale a row, gathered in bf16); master weights, optimizer, norms and loss unchanged
    fp8: Float8 = Float8.none

    def __post_init__(self) -> None:
        check_choices(self, "plan")

    @property
    def world_size(self) -> int:
        return self.dp * self.cp * self.tp * self.pp


PLAN_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(PlanConfig))


@dataclass
class TrainConfig:
    """Everything the engine needs to train: a generated best.yaml is one of these."""

    model: ModelConfig = field(default_factory=ModelConfig)
    job: JobConfig = field(default_factory=JobConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)


# --- building and validating ----------------------------------------------------------------

def _structured(schema: type, data: Any, what: str) -> Any:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), data)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(omegaconf_message(e, what))


def omegaconf_message(e: OmegaConfBaseException, section: str = "") -> str:
    """One line for OmegaConf's complaint about `section` (empty: the key is the full path)."""
    msg = str(e).splitlines()[0]
    key = ".".join(filter(None, [section, getattr(e, "full_key", None) or ""]))
    bad_choice = re.fullmatch(r"Invalid value '(.*)', expected one of \[(.*)\]", msg)
    if bad_choice and key:
        return choice_error(re.sub(r"\[\d+\]$", "", key), bad_choice[1], bad_choice[2].split(", "))
    return f"{key}: {msg}" if key and key not in msg else f"{key or section}: {msg}"


def build_train_config(data: Any) -> TrainConfig:
    """A validated TrainConfig from a dict/DictConfig (model, job, plan)."""
    if isinstance(data, DictConfig):
        data = OmegaConf.to_container(data, resolve=True)
    data = dict(data or {})
    unknown = set(data) - {"model", "job", "plan"}
    if unknown:
        raise ConfigError(f"unknown config section(s) {sorted(unknown)}; a training config has model, job, plan")
    model = dict(data.get("model") or {})
    if model.get("hf_config"):
        from autotune.engine.hf_config import model_from_hf_config  # which imports this module

        model.update(model_from_hf_config(model["hf_config"]))
    cfg = TrainConfig(
        model=_structured(ModelConfig, model, "model"),
        job=_structured(JobConfig, data.get("job") or {}, "job"),
        plan=_structured(PlanConfig, data.get("plan") or {}, "plan"),
    )
    validate(cfg)
    return cfg


def with_changes(cfg: TrainConfig, *, model: Any = None, job: Any = None, plan: Any = None) -> TrainConfig:
    """A validated copy of `cfg` with a section replaced (a ModelConfig, JobConfig or PlanConfig) or
    some of its fields changed (a dict); grad_accum is derived again from the batch shape."""

    def changed(current: Any, new: Any) -> Any:
        if new is None:
            return current
        return new if dataclasses.is_dataclass(new) else dataclasses.replace(current, **new)

    new = TrainConfig(model=changed(cfg.model, model), job=changed(cfg.job, job),
                      plan=dataclasses.replace(changed(cfg.plan, plan), grad_accum=None))
    validate(new)
    return new


def load_train_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """A TrainConfig from a YAML file plus `section.key=value` overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no such config file: {path}")
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+")
        if "=" not in o or "." not in key:
            # a Hydra group choice (model=gpt2) would replace a whole section with a string
            raise ConfigError(
                f"override {o!r}: give section.key=value (e.g. plan.micro_batch=4); a model from conf/model/ "
                f"is chosen when the config is made (`autotune search model=NAME`), or use model.hf_config=PATH"
            )
    try:
        base = OmegaConf.load(path)
        dot = OmegaConf.from_dotlist([o.lstrip("+") for o in overrides])
    except (OmegaConfBaseException, ValueError, OSError, yaml.YAMLError) as e:
        detail = " ".join(str(e).split())  # YAML errors span lines
        raise ConfigError(f"cannot read {path} with overrides {list(overrides)}: {detail}")
    if not isinstance(base, DictConfig):
        raise ConfigError(f"{path} is not a training config: it should map model, job and plan to their settings")
    keys = {o.split("=", 1)[0].lstrip("+") for o in overrides}
    if keys & {"plan.micro_batch", "plan.dp", "job.global_batch"} and "plan.grad_accum" not in keys and "plan" in base:
        base.plan.grad_accum = None  # derived: follow the overridden batch shape
    return build_train_config(OmegaConf.merge(base, dot))


def to_yaml(cfg: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def as_json(config: Any) -> dict[str, Any]:
    """A config dataclass as JSON values (enum members as their strings): what a JSON file holds."""
    return OmegaConf.to_container(OmegaConf.structured(config), enum_to_str=True)


def from_json(cls: type, data: dict[str, Any]) -> Any:
    """The config dataclass `cls` from what `as_json` wrote (a record read back, so not validated
    again; fields it lacks take their defaults)."""
    nested = _nested_configs(cls)
    return cls(**{k: from_json(nested[k], v) if k in nested else v
                  for k, v in data.items() if k in _field_names(cls)})


@functools.cache
def _field_names(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in fields(cls))


@functools.cache
def _nested_configs(cls: type) -> dict[str, type]:
    return {name: hint for name, hint in typing.get_type_hints(cls).items() if dataclasses.is_dataclass(hint)}


def validate_model(m: ModelConfig) -> None:
    for key in ("n_layers", "d_model", "n_heads", "d_ff", "vocab_size", "max_seq_len"):
        if getattr(m, key) < 1:
            raise ConfigError(f"model.{key}={getattr(m, key)} must be at least 1")
    if m.attn_head_dim is not None and m.attn_head_dim < 1:
        raise ConfigError(f"model.attn_head_dim={m.attn_head_dim} must be at least 1, or unset for d_model/n_heads")
    if m.attn_head_dim is None and m.d_model % m.n_heads:
        raise ConfigError(
            f"model.d_model={m.d_model} must be divisible by model.n_heads={m.n_heads}, or set model.attn_head_dim"
        )
    if m.n_heads % m.kv_heads:
        raise ConfigError(f"model.n_heads={m.n_heads} must be divisible by model.n_kv_heads={m.kv_heads}")
    if m.family == "llama" and m.head_dim % 2:
        raise ConfigError(f"rotary embeddings need an even head dim; the model's is {m.head_dim}")
    if m.family == "gpt2" and m.kv_heads != m.n_heads:
        raise ConfigError("model.n_kv_heads: gpt2 has no grouped-query attention; leave it unset")
    for key in ("norm_eps", "rope_theta", "rope_scaling_factor", "rope_low_freq_factor", "rope_original_max_seq_len"):
        if not getattr(m, key) > 0:
            raise ConfigError(f"model.{key}={getattr(m, key)} must be positive")
    if m.rope_scaling_factor != 1 and not m.rope_high_freq_factor > m.rope_low_freq_factor:
        raise ConfigError(
            f"model.rope_high_freq_factor={m.rope_high_freq_factor} must exceed "
            f"model.rope_low_freq_factor={m.rope_low_freq_factor}"
        )
    validate_moe(m)


def validate_moe(m: ModelConfig) -> None:
    """The mixture-of-experts fields, when the model has experts."""
    if m.n_experts < 0:
        raise ConfigError(f"model.n_experts={m.n_experts} must not be negative (0: a dense model)")
    if m.n_experts == 0:
        return
    if m.family != "llama":
        raise ConfigError(f"model.n_experts={m.n_experts}: experts are SwiGLU MLPs of the llama family; use family=llama")
    if not 1 <= m.experts_per_token <= m.n_experts:
        raise ConfigError(
            f"model.experts_per_token={m.experts_per_token} must be between 1 and model.n_experts={m.n_experts}"
        )
    for key in ("moe_d_ff", "shared_d_ff"):
        if getattr(m, key) is not None and getattr(m, key) < 1:
            raise ConfigError(f"model.{key}={getattr(m, key)} must be at least 1, or unset")
    if m.n_shared_experts < 0:
        raise ConfigError(f"model.n_shared_experts={m.n_shared_experts} must not be negative")
    if m.shared_expert_gate and m.n_shared_experts == 0:
        raise ConfigError("model.shared_expert_gate needs shared experts: set model.n_shared_experts >= 1")
    if not m.aux_loss_coef >= 0:
        raise ConfigError(f"model.aux_loss_coef={m.aux_loss_coef} must not be negative (0: no load-balancing loss)")
    if m.capacity_factor is not None and not m.capacity_factor > 0:
        raise ConfigError(f"model.capacity_factor={m.capacity_factor} must be positive, or unset for dropless routing")
    if m.moe_every < 1:
        raise ConfigError(f"model.moe_every={m.moe_every} must be at least 1")
    outside = [i for i in m.dense_layers if not 0 <= i < m.n_layers]
    if outside:
        raise ConfigError(f"model.dense_layers={list(m.dense_layers)}: {outside} are not layers of model.n_layers={m.n_layers}")
    if not m.moe_layers:
        raise ConfigError(
            f"model.n_experts={m.n_experts} but no layer is a MoE layer (moe_every={m.moe_every}, "
            f"dense_layers={list(m.dense_layers)}); set model.n_experts=0 for a dense model"
        )


def validate_ep(p: PlanConfig, model: ModelConfig) -> None:
    """Expert parallelism splits each MoE layer's experts over ep of the data-parallel ranks."""
    if p.ep < 1:
        raise ConfigError(f"plan.ep={p.ep} must be at least 1")
    if model.n_experts and p.tp > 1:
        raise ConfigError(
            f"plan.tp={p.tp} with a mixture-of-experts model: the engine does not split experts over "
            "tensor-parallel ranks; use plan.tp=1 and spread the experts with plan.ep"
        )
    if p.ep == 1:
        return
    if model.n_experts == 0:
        raise ConfigError(f"plan.ep={p.ep} needs a mixture-of-experts model (model.n_experts > 0); use plan.ep=1")
    if model.n_experts % p.ep:
        divisors = [d for d in range(1, model.n_experts + 1) if model.n_experts % d == 0 and p.dp % d == 0]
        raise ConfigError(
            f"plan.ep={p.ep} must divide model.n_experts={model.n_experts}; try one of {divisors}"
        )
    if p.dp % p.ep:
        raise ConfigError(
            f"plan.ep={p.ep} must divide plan.dp={p.dp}: the expert-parallel ranks are data-parallel ranks"
        )


def validate_job(j: JobConfig) -> None:
    if j.seq_len < 1 or j.global_batch < 1 or j.steps < 1:
        raise ConfigError("job.seq_len, job.global_batch and job.steps must be at least 1")
    if j.log_every < 1:
        raise ConfigError(f"job.log_every={j.log_every} must be at least 1")
    if j.checkpoint_every < 0:
        raise ConfigError(
            f"job.checkpoint_every={j.checkpoint_every} must not be negative (0: save only at the end and on SIGTERM)"
        )
    validate_optimizer(j.optimizer)


def validate_optimizer(o: OptimizerConfig) -> None:
    """What torch's AdamW would refuse with a traceback, and the schedule's own ranges."""
    if o.name != "adamw":
        raise ConfigError(f"job.optimizer.name={o.name!r}: only adamw is supported")
    for key in ("lr", "eps"):
        if not getattr(o, key) > 0:
            raise ConfigError(f"job.optimizer.{key}={getattr(o, key)} must be positive")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(o, key) < 1:
            raise ConfigError(f"job.optimizer.{key}={getattr(o, key)} must be in [0, 1)")
    for key in ("weight_decay", "grad_clip", "warmup_steps"):
        if getattr(o, key) < 0:
            raise ConfigError(f"job.optimizer.{key}={getattr(o, key)} must not be negative (0 turns it off)")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"job.optimizer.min_lr_ratio={o.min_lr_ratio} must be in [0, 1] (a fraction of lr)")


def validate_plan(p: PlanConfig, model: ModelConfig, job: JobConfig) -> None:
    """Check a plan against its model and job, and fill in the derived grad_accum."""
    from autotune.engine.plan_dims import (validate_async_tp, validate_attention, validate_cp, validate_dp_replicate,
                                           validate_fp8, validate_pipeline, validate_sequence_parallel, validate_tp)

    _validate_settings(p)
    validate_tp(p, model)
    validate_ep(p, model)
    validate_dp_replicate(p)
    validate_async_tp(p)
    validate_fp8(p)
    validate_cp(p, job)
    validate_attention(p)
    validate_sequence_parallel(p, job)
    validate_pipeline(p, model)
    if job.seq_len > model.max_seq_len:
        raise ConfigError(f"job.seq_len={job.seq_len} exceeds model.max_seq_len={model.max_seq_len}")
    p.grad_accum = _grad_accum(p, job)


def _validate_settings(p: PlanConfig) -> None:
    """The plan's own settings, each on its own: ranges, checkpointing, fp16's loss scale, the reduce
    dtype, offload."""
    if p.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"plan.zero_stage={p.zero_stage}: use 0, 1, 2 or 3")
    if p.checkpoint_every_k < 1:
        raise ConfigError(f"plan.checkpoint_every_k={p.checkpoint_every_k} must be at least 1")
    if p.activation_checkpointing == "op" and p.checkpoint_every_k not in OP_CHECKPOINT_EVERY_K:
        raise ConfigError(f"plan.checkpoint_every_k={p.checkpoint_every_k} with plan.activation_checkpointing=op: use 1 "
                          "(keep every matmul's output) or 2 (every other one, as torchtitan)")
    for key in ("micro_batch", "dp", "tp", "pp", "pp_virtual_stages"):
        if getattr(p, key) < 1:
            raise ConfigError(f"plan.{key}={getattr(p, key)} must be at least 1")
    if p.precision == "fp16":
        if p.loss_scale == "none":
            raise ConfigError("plan.precision=fp16 needs loss scaling: set plan.loss_scale=dynamic (or a number)")
        if p.loss_scale != "dynamic":
            try:
                scale = float(p.loss_scale)
            except ValueError:
                raise ConfigError(f"plan.loss_scale={p.loss_scale!r}: use dynamic, none or a positive number")
            if not scale > 0 or math.isinf(scale):
                raise ConfigError(f"plan.loss_scale={p.loss_scale!r}: use dynamic, none or a positive number")
    if p.reduce_dtype == "bf16" and p.precision == "fp32":
        raise ConfigError("plan.reduce_dtype=bf16 needs 16-bit compute: set plan.precision=bf16 (or fp16) "
                          "or plan.reduce_dtype=fp32")
    if p.offload_optimizer and p.zero_stage < 1:
        raise ConfigError("plan.offload_optimizer needs plan.zero_stage >= 1")
    if p.offload_params and p.zero_stage < 3:
        raise ConfigError("plan.offload_params needs plan.zero_stage=3")


def _grad_accum(p: PlanConfig, job: JobConfig) -> int:
    """The micro-batches a step takes (the global batch over micro_batch x dp), checked against a
    grad_accum the plan gives and the pipeline schedule's needs."""
    per_step = p.micro_batch * p.dp
    if job.global_batch % per_step:
        raise ConfigError(
            f"job.global_batch={job.global_batch} is not divisible by plan.micro_batch={p.micro_batch} "
            f"x plan.dp={p.dp} = {per_step}; pick a micro_batch that divides {job.global_batch // p.dp or 1}"
        )
    accum = job.global_batch // per_step
    if p.grad_accum is not None and p.grad_accum != accum:
        raise ConfigError(
            f"plan.grad_accum={p.grad_accum} disagrees with job.global_batch={job.global_batch} / "
            f"(micro_batch={p.micro_batch} x dp={p.dp}) = {accum}; leave grad_accum unset"
        )
    if p.pp > 1 and p.pp_schedule == "interleaved_1f1b" and accum % p.pp:
        raise ConfigError(
            f"plan.pp_schedule=interleaved_1f1b needs grad_accum={accum} (micro-batches) divisible by plan.pp={p.pp}"
        )
    if p.pp > 1 and p.pp_schedule == "1f1b" and accum < p.pp:
        raise ConfigError(
            f"plan.pp_schedule=1f1b needs at least plan.pp={p.pp} micro-batches per step, but grad_accum={accum}; "
            "use a smaller plan.micro_batch or plan.pp_schedule=gpipe"
        )
    return accum


def validate(cfg: TrainConfig) -> None:
    validate_model(cfg.model)
    validate_job(cfg.job)
    validate_plan(cfg.plan, cfg.model, cfg.job)
