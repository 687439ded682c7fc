"""A run (autotune.validate.runs) as what the engine would run: model, job, plan and hardware, with
the assumptions made for what the source left unstated, or the reason the engine cannot express it.

Texts are read by keyword (docs/runs.md lists every rule). What the engine cannot run is refused
with its reason rather than guessed: float8 on a GPU without it. Unstated fields take a stated default and the row says so.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from autotune.config import CONF_DIR
from autotune.engine.config import ConfigError, TrainConfig, build_train_config
from autotune.hardware import Hardware, catalog_gpu, check_fp8, network_bytes_per_s, port_gbps
from autotune.profile import flops_per_token
from autotune.validate.runs import Run

GiB = 2**30
# Published GPU names -> conf/gpu entry, first match wins; the entry's file says where its figures come from.
GPU_NAMES = (
    (r"H100.*(HBM2e|9[456] ?GB|500 ?W|lower TDP)", "h100-sxm-96g-500w"),
    (r"H100.*PCIe", "h100-pcie"),
    (r"H100", "h100-sxm"),
    (r"H200", "h200"),
    (r"A100.*40 ?GB", "a100-40g"),
    (r"A100", "a100-80g"),
)
# What a variant left unstated is taken as (the row says so): the SXM H100, the 80 GB A100
DEFAULT_VARIANT = {"h100-sxm": r"SXM|HBM3", "a100-80g": r"80 ?GB"}


class NotExpressible(Exception):
    """A run the engine cannot run as the source ran it; the message says why."""


@dataclass
class Mapped:
    """One run as the engine's config on the catalog hardware, and what it was measured at."""

    run: Run
    train: TrainConfig
    hw: Hardware
    assumptions: list[str] = field(default_factory=list)
    # what the source left unstated -> the plan changes the run may have made (one dict each); the
    # prediction takes the fastest plan among them that fits (the source tuned its run; so would the planner)
    free: dict[str, list[dict]] = field(default_factory=dict)
    tokens_per_s_per_gpu: float | None = None  # measured, stated or derived (tokens_source says how)
    tokens_source: str = ""
    peak_reserved_bytes: float | None = None


def _gpu(run: Run, assumed: list[str]) -> str:
    for pattern, entry in GPU_NAMES:
        if re.search(pattern, run.gpu, re.IGNORECASE):
            if entry in DEFAULT_VARIANT and not re.search(DEFAULT_VARIANT[entry], run.gpu, re.IGNORECASE):
                assumed.append(f"gpu variant unstated: {entry}")
            return entry
    raise NotExpressible(f"gpu {run.gpu!r} is not in the catalog (conf/gpu/)")


def _network_gbps(run: Run, gpus_per_node: int, one_port_gbps: float, assumed: list[str]) -> float | None:
    """The network's line rate per GPU in Gb/s: 'N x R Gbps per node' shares N ports among the node's
    GPUs; 'R Gb/s per GPU' is one GPU's; a bare 'R Gb/s' is one GPU's unless it is more than one
    port of the catalog GPU's reference server (`one_port_gbps`) carries, which only a node's ports
    together can; None (unstated): the reference server's port."""
    text = run.interconnect or ""
    per_node = re.search(r"(\d+)\s*x\s*(\d+)\s*Gb(?:ps|/s).*per node", text, re.IGNORECASE)
    if per_node:
        return int(per_node.group(1)) * float(per_node.group(2)) / gpus_per_node
    rate = re.search(r"(\d+)\s*Gb(?:ps|/s)", text, re.IGNORECASE)
    if rate:
        gbps = float(rate.group(1))
        if re.search(r"per\s+GPU", text, re.IGNORECASE):
            return gbps
        if gbps > one_port_gbps:
            assumed.append(f"network {text!r} says neither per GPU nor per node: more than one GPU's port on "
                           f"this GPU's servers ({one_port_gbps:g} Gb/s) carries, so the node's: "
                           f"{gbps / gpus_per_node:g} Gb/s per GPU")
            return gbps / gpus_per_node
        assumed.append(f"network {text!r} says neither per GPU nor per node: taken per GPU")
        return gbps
    if run.gpus > gpus_per_node:
        assumed.append("network unstated: the catalog GPU's reference server's ports")
    return None


def _model(run: Run, seq_len: int, assumed: list[str]) -> dict:
    """The model's fields: from `arch`, or a conf/model entry named like the model."""
    family = "gpt2" if re.search(r"\bGPT", run.model) else "llama"
    arch = run.arch or {}
    if arch.get("n_layers") and arch.get("d_model") and arch.get("vocab"):
        d = int(arch["d_model"])
        heads = arch.get("n_heads")
        if not heads:
            heads = max(d // 128, 1)
            assumed.append(f"heads unstated: {heads} of width 128")
        ffn = arch.get("ffn")
        if not ffn:
            if family == "llama":
                raise NotExpressible("arch.ffn unstated for a llama model")
            ffn = 4 * d
            assumed.append("ffn unstated: 4 x d_model")
        return {"name": run.model, "family": family, "n_layers": int(arch["n_layers"]), "d_model": d,
                "n_heads": int(heads), "n_kv_heads": int(arch.get("kv_heads") or heads), "d_ff": int(ffn),
                "vocab_size": int(arch["vocab"]), "max_seq_len": seq_len, "tie_embeddings": family == "gpt2"}
    name = re.sub(r"\s*\(.*?\)", "", run.model).strip().lower()
    name = re.sub(r"[\s.]+", "-", name).replace("-3-1-", "-3-")
    path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.is_file():
        raise NotExpressible(f"model {run.model!r}: no arch and no conf/model/{name}.yaml")
    from omegaconf import OmegaConf

    model = OmegaConf.to_container(OmegaConf.load(path))
    return model | {"max_seq_len": max(seq_len, model.get("max_seq_len", 0))}


def _fp8(run: Run, assumed: list[str]) -> str:
    """The float8 recipe of a row's linears: rowwise where it says so, else tensorwise (torchao's and
    torchtitan's default: dynamic tensorwise scaling, float8 all-gather under FSDP)."""
    text = f"{run.precision} {run.other}".lower()
    if not re.search(r"fp8|float8", text):
        return "none"
    if re.search(r"row.?wise", text):
        return "rowwise"
    if not re.search(r"tensor.?wise", text):
        assumed.append("float8 recipe unstated: tensorwise with float8 all-gather (torchao's default)")
    return "tensorwise"


def _precision(run: Run, assumed: list[str]) -> str:
    text = re.sub(r"\+?\s*(fp8|float8)[^,;]*", "", run.precision.lower()).strip()  # the float8 linears: _fp8
    if not text or text == "unstated":
        assumed.append("precision unstated: bf16")
        return "bf16"
    if "bf16" in text or "16-bit" in text or "mixed" in text:
        return "bf16"  # fp16 has the same tensor-core peak: the cost model treats the two alike
    return "fp16" if "fp16" in text else "fp32"


# Sources whose FSDP is documented to keep parameters gathered from forward to backward (FSDP2's
# reshard_after_forward=False: the engine's ZeRO-2), with where they say so
KEEPS_GATHERED = ((r"2407\.21783", "the Llama 3 paper, Sec. 3.3.2: its FSDP does not reshard after forward"),)


# Where a framework's torch.compile takes the loss along (the engine's plan.compile_loss), with where
# it says so: (the source, since what month, YYYY-MM, or None: never)
COMPILES_LOSS = (
    (r"pytorch/torchtitan", "2025-04", "torchtitan's since 2025-04: components/loss.py, commit bbb1b616e"),
    (r"foundation-model-stack/fms-fsdp", None, "fms-fsdp compiles the model, its loss runs outside it"),
)


def _compiles_loss(run: Run, assumed: list[str]) -> bool:
    """Whether the run's framework compiled its loss with its model: by the latest month the source
    names (a benchmark file's or a document's date), where the framework's default changed."""
    for source, since, says in COMPILES_LOSS:
        if re.search(source, run.source):
            months = [f"{y}-{m}" for y, m in re.findall(r"(20\d\d)-?(0[1-9]|1[0-2])(?!\d)", run.source)]
            compiled = since is not None and bool(months) and max(months) >= since
            assumed.append(f"loss {'compiled' if compiled else 'not compiled'} with the model ({says})")
            return compiled
    return True  # another framework's torch.compile: taken to compile what the engine's does


def _zero(run: Run, assumed: list[str]) -> int:
    text = run.zero.lower()
    if re.search(r"hsdp|hybrid", text):  # FSDP's HYBRID_SHARD is ZeRO-3 within groups; _HYBRID_SHARD_ZERO2 ZeRO-2
        return 2 if re.search(r"zero.?2|shard.?grad", text) else 3
    if re.search(r"fsdp|full.?shard|zero.?3", text):
        if re.search(r"no.?reshard|reshard_after_forward\W*false", text):
            return 2
        for source, says in KEEPS_GATHERED:
            if re.search(source, run.source):
                assumed.append(f"FSDP as ZeRO-2 ({says})")
                return 2
        return 3
    if re.search(r"zero.?2|shard.?grad", text):
        return 2
    unstated = text in ("", "unstated")
    if re.search(r"zero.?1|distributed optimizer", text) or (
            unstated and re.search(r"param.?gather|distributed.optimizer", run.other, re.IGNORECASE)):
        # the engine's ZeRO-1 is Megatron's overlapped distributed optimizer: each block's gradients
        # reduce-scattered during the last backward, its parameters gathered once per step beside the compute
        if unstated:
            assumed.append("sharding unstated: a distributed optimizer (ZeRO-1), as its param-gather overlap implies")
        return 1
    if unstated:
        assumed.append("sharding unstated: none (ZeRO-0)")
    return 0


def _replicas(run: Run, gpus_per_node: int, tp: int, assumed: list[str]) -> int:
    """Hybrid sharding's replicas (plan.dp_replicate): as stated ('N replicas', 'shard group of N'),
    else shard within a node, replicate across (FSDP's HYBRID_SHARD; said if unstated)."""
    text = run.zero.lower()
    if not re.search(r"hsdp|hybrid", text):
        return 1
    replicas, group = re.search(r"(\d+)\s*replicas", text), re.search(r"shard(?:ing)? group of (\d+)", text)
    if replicas:
        count = int(replicas.group(1))
    else:
        shard = int(group.group(1)) if group else max(min(gpus_per_node // tp, run.dp), 1)  # a node's dp ranks
        if not group and not re.search(r"within (?:a |one |the )?node", text):
            assumed.append(f"hybrid sharding layout unstated: shard within a node ({shard} ranks), replicate across")
        count = run.dp // shard if run.dp % shard == 0 else 0
    if count < 1 or run.dp % count:
        raise NotExpressible(f"hybrid sharding of dp={run.dp} into {count or 'uneven'} replicas: the replicas must divide dp")
    return count


def activation_mode(ac: str, source: str = "") -> tuple[str, int] | None:
    """A row's `ac` text as the engine's (activation_checkpointing, checkpoint_every_k); None: a mode
    the engine does not have. Per-operator selective checkpointing (torchtitan's `op`, its default
    selective mode, every other matmul's output kept) maps to the engine's `op` with k = 2, Megatron's
    attention-core recompute (Korthikanti et al.'s "selective") to `attention`."""
    text = ac.lower()
    if text in ("", "unstated", "none") or text.startswith("none"):
        return ("none", 2)
    if text.startswith("full"):
        return ("full", 2)
    if "layer" in text:  # torchtitan's selective layer: every second block
        return ("selective", 2)
    if "fraction of blocks" in text:  # fms-fsdp's selective_checkpointing, default 1: every block
        return ("full", 2)
    if "attention" in text or (text.startswith("selective") and re.search(r"megatron|korthikanti", source.lower())):
        return ("attention", 2)
    if re.search(r"\bop\b|per-op", text) or (text.startswith("selective") and "torchtitan" in source.lower()):
        return ("op", 2)
    return None


def _checkpointing(run: Run, assumed: list[str], free: dict) -> tuple[str, int]:
    mode = activation_mode(run.ac, run.source)
    if mode is None:
        raise NotExpressible(f"activation checkpointing {run.ac!r}: the engine has no such mode")
    if not run.ac or run.ac.lower() == "unstated":
        free["activation checkpointing"] = [{"activation_checkpointing": m} for m in ("none", "selective", "full")]
    elif "fraction of blocks" in run.ac.lower():
        assumed.append("fraction of checkpointed blocks unstated: every block (fms-fsdp's default 1)")
    return mode


def _parallel(run: Run, gpus_per_node: int, free: dict) -> tuple[int, int]:
    """(tp, pp): as stated, or, with only their product known (GPUs / (dp x cp)), each split with tp
    inside a node free (first: tp filling a node, Megatron's practice)."""
    model_parallel, rest = divmod(run.gpus, run.dp * (run.cp or 1))
    if rest:
        raise NotExpressible(f"gpus={run.gpus} is not a multiple of dp x cp = {run.dp * (run.cp or 1)}")
    tp, pp = run.tp, run.pp
    if tp is None and pp is None:
        splits = [t for t in range(min(model_parallel, gpus_per_node), 0, -1) if model_parallel % t == 0]
        tp, pp = splits[0], model_parallel // splits[0]
        if len(splits) > 1:
            free["tp x pp"] = [{"tp": t, "pp": model_parallel // t} for t in splits]
    elif tp is None or pp is None:
        known = tp or pp
        other = model_parallel // known
        tp, pp = (known, other) if run.tp else (other, known)
    if run.dp * tp * pp * (run.cp or 1) != run.gpus:
        raise NotExpressible(f"dp x tp x pp x cp = {run.dp * tp * pp * (run.cp or 1)}, not the run's {run.gpus} GPUs")
    return tp, pp


def _schedule(run: Run, free: dict) -> dict:
    """An interleaved pipeline with its stages per rank ('m=3' or 'v=3'; unstated: free), else 1F1B
    (the pipeline's schedule is free when tp x pp is)."""
    interleaved = re.search(r"interleaved(?:[^;,]*?\b(?:m|v)\s*=\s*(\d+))?", run.other, re.IGNORECASE)
    if interleaved and "not stated" not in run.other.lower():
        if not interleaved.group(1):
            free["interleaved stages per rank"] = [{"pp_virtual_stages": v} for v in (2, 3, 4)]
        return {"pp_schedule": "interleaved_1f1b", "pp_virtual_stages": int(interleaved.group(1) or 2)}
    return {"pp_schedule": "1f1b"}


def _async_tp(run: Run) -> bool:
    """torchtitan's async TP and Megatron's --tp-comm-overlap: tp collectives pipelined with the matmuls
    (both need sequence parallel)."""
    return bool(re.search(r"async.?tp|tp-comm-overlap", run.other, re.IGNORECASE))


# Sources whose tensor parallelism is documented as sequence-parallel, with where they say so
SEQUENCE_PARALLEL = ((r"2407\.21783", "the Llama 3 paper, Sec. 3.3.2: its tensor parallelism cites Korthikanti et al., "
                                      "sequence parallelism's paper"),)


def _sequence_parallel(run: Run, tp: int, free: dict, assumed: list[str]) -> bool:
    """Stated ('sequence parallel', 'no sequence parallelism'); torchtitan's tensor parallelism always
    shards its norms over the sequence (its SequenceParallel plan), and async tp needs it; a source
    that documents it elsewhere (SEQUENCE_PARALLEL); else free when tp > 1."""
    text = f"{run.ac} {run.other}".lower()
    if re.search(r"no sequence parallel", text):
        return False
    if "sequence parallel" in text or "torchtitan" in run.source.lower() or _async_tp(run):
        return True
    for source, says in SEQUENCE_PARALLEL:
        if re.search(source, run.source) and tp > 1:
            assumed.append(f"sequence parallel ({says})")
            return True
    if tp > 1 or "tp x pp" in free:
        free["sequence parallel"] = [{"sequence_parallel": False}, {"sequence_parallel": True}]
    return False


# The attention kernel (plan.attention) of frameworks whose source names them, on Hopper: cuDNN's fused
# attention or SDPA's own (FlashAttention-2), with where it is documented
ATTENTION_KERNELS = (
    (r"NVIDIA/Megatron-LM", "cudnn", "Megatron-Core runs Transformer Engine, whose get_attention_backend "
                                     "prefers its cuDNN FusedAttention to FlashAttention on sm90+"),
    (r"pytorch/torchtitan|foundation-model-stack/fms-fsdp", "sdpa", ""),  # F.scaled_dot_product_attention
)
HOPPER = ("h100", "h200")  # the GPUs whose catalog entries have cuDNN's attention figure


def _attention(run: Run, gpu: str, precision: str, assumed: list[str]) -> str:
    """Stated ('cudnn', 'flash attention'); else SDPA's own kernel off Hopper and in fp32 (cuDNN's runs
    16-bit only); else the framework's (ATTENTION_KERNELS); else, an unnamed framework on Hopper:
    cuDNN's, the fastest kernel the engine has there (1.6x FlashAttention-2 from 4k, FlashAttention-3
    paper), as the row says."""
    text = run.other.lower()
    if "cudnn" in text:
        return "cudnn"
    if re.search(r"flash.?attention|sdpa", text) or not gpu.startswith(HOPPER) or precision == "fp32":
        return "sdpa"
    for source, kernel, says in ATTENTION_KERNELS:
        if re.search(source, run.source):
            if says:
                assumed.append(f"attention: {kernel} ({says})")
            return kernel
    assumed.append("attention kernel unstated: cuDNN's fused attention, the engine's fastest on Hopper")
    return "cudnn"


# Frameworks whose gradients cross the data-parallel ranks in bf16 by default (plan.reduce_dtype),
# with where it is set; the others reduce in fp32 (torchtitan's mixed_precision_reduce, Megatron's
# fp32 main grads under bf16)
BF16_REDUCTION = (
    (r"foundation-model-stack/fms-fsdp", "fms-fsdp's bfSixteen policy: FSDP MixedPrecision(reduce_dtype="
                                         "torch.bfloat16), fms_fsdp/policies/mixed_precision.py"),
)


def _reduce_dtype(run: Run, precision: str, assumed: list[str]) -> str:
    """bf16 for a 16-bit run of a framework in BF16_REDUCTION (said in the row's assumptions), else fp32."""
    for source, says in BF16_REDUCTION:
        if precision != "fp32" and re.search(source, run.source):
            assumed.append(f"gradients reduced in bf16 ({says})")
            return "bf16"
    return "fp32"


def _plan(run: Run, gpu: str, gpus_per_node: int, assumed: list[str], free: dict) -> dict:
    tp, pp = _parallel(run, gpus_per_node, free)
    micro_batch = run.micro_batch
    if micro_batch is None:
        micro_batch = 1
        if run.global_batch:
            per_rank = run.global_batch // run.dp
            free["micro_batch"] = [{"micro_batch": b} for b in (1, 2, 4) if per_rank % b == 0]
    mode, every_k = _checkpointing(run, assumed, free)
    text = f"{run.ac} {run.other}".lower()
    compiled = "compile" in text and "no compile" not in text
    precision = _precision(run, assumed)
    return {
        "zero_stage": _zero(run, assumed), "precision": precision, "fp8": _fp8(run, assumed),
        "attention": _attention(run, gpu, precision, assumed),
        "reduce_dtype": _reduce_dtype(run, precision, assumed),
        "micro_batch": micro_batch,
        "dp": run.dp, "cp": run.cp or 1, "dp_replicate": _replicas(run, gpus_per_node, tp, assumed), "tp": tp, "pp": pp,
        "activation_checkpointing": mode, "checkpoint_every_k": every_k,
        "sequence_parallel": _sequence_parallel(run, tp, free, assumed) and tp > 1,
        "async_tp": _async_tp(run) and tp > 1,
        "compile": compiled, "compile_loss": compiled and _compiles_loss(run, assumed),
    } | (_schedule(run, free) if pp > 1 or "tp x pp" in free else {})


def _measured_tokens(run: Run, train: TrainConfig, hw: Hardware) -> tuple[float | None, str]:
    """Tokens/s per GPU as stated, from the step time, or from TFLOP/s or MFU with 6N + 12·L·a·d·s
    per token (Megatron's and torchtitan's model-FLOPs count, docs/formulas.md [FLOPs and MFU])."""
    if run.tokens_per_s_per_gpu:
        return run.tokens_per_s_per_gpu, "stated"
    tokens = train.job.global_batch * train.job.seq_len
    if run.step_time_s:
        return tokens / run.step_time_s / run.gpus, "from step_time_s"
    per_token = flops_per_token(train.model, train.job.seq_len)["total"]
    if run.tflops_per_gpu:
        return run.tflops_per_gpu * 1e12 / per_token, "from tflops_per_gpu"
    if run.mfu:
        return run.mfu * hw.peak_flops[str(train.plan.precision)] / per_token, "from mfu"
    return None, ""


def map_run(run: Run) -> Mapped:
    """The engine's config and the catalog hardware of `run`, or NotExpressible."""
    if run.config:
        raise NotExpressible("config: exact engine configs are read by the probe's records (not yet)")
    assumed: list[str] = []
    free: dict[str, list] = {}
    gpu = _gpu(run, assumed)
    nodes = run.nodes or max(run.gpus // 8, 1)
    gpus_per_node = run.gpus // nodes if run.gpus % nodes == 0 else 8
    base = catalog_gpu(gpu)
    network = _network_gbps(run, gpus_per_node, port_gbps(base), assumed)
    hw = replace(base, gpus_per_node=gpus_per_node, nodes=nodes)
    if network is not None:
        hw.inter_node_bytes_per_s = network_bytes_per_s(network)
    plan = _plan(run, gpu, gpus_per_node, assumed, free)
    global_batch = run.global_batch
    if global_batch is None:
        global_batch = plan["micro_batch"] * run.dp
        assumed.append(f"global_batch unstated: {global_batch} (one micro-batch per rank)")
    try:
        train = build_train_config({"model": _model(run, run.seq_len, assumed),
                                    "job": {"seq_len": run.seq_len, "global_batch": global_batch},
                                    "plan": plan})
        check_fp8(hw, [train.plan.fp8])
    except ConfigError as e:
        raise NotExpressible(f"not a valid engine config: {e}")
    tokens, how = _measured_tokens(run, train, hw)
    return Mapped(run=run, train=train, hw=hw, assumptions=assumed, free=free, tokens_per_s_per_gpu=tokens, tokens_source=how,
                  peak_reserved_bytes=run.peak_mem_gib * GiB if run.peak_mem_gib else None)
