"""Write a training config three ways: `best.yaml` for the engine, `ds_config.json` for DeepSpeed,
`launch.sh`. A search writes its pick; `autotune emit CONFIG.yaml --out DIR [key=value ...]` any config.

All three are rendered before any is written, and each is written atomically, so a bad plan or a
crash never leaves a run folder with a half-written or mismatched file.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from autotune.config import ClusterConfig
from autotune.engine.config import (
    ConfigError, ModelConfig, PlanConfig, TrainConfig, build_train_config, load_train_config, to_yaml,
)
from autotune.engine.model import param_counts
from autotune.engine.parallel import checkpointed_blocks
from autotune.engine.files import write_atomic

# fp16 dynamic loss scaling as the engine does it (torch.amp.GradScaler, default settings): start at
# 2^16, halve on every overflow (no hysteresis), double after 2000 clean steps.
FP16_INITIAL_SCALE_POWER = 16
FP16_SCALE_WINDOW = 2000
FP16_HYSTERESIS = 1
FP16_MIN_SCALE = 1
MASTER_PORT = 29500


def write_outputs(run_dir: Path, best: TrainConfig, cluster: ClusterConfig, replace: bool = True) -> None:
    """Write best.yaml, ds_config.json and launch.sh for `best` on `cluster` into `run_dir`.
    replace=False: refuse (before writing any) if one of them is there with other contents."""
    files = render(best, cluster)
    if not replace:
        for name, data in files.items():
            path = Path(run_dir) / name
            if path.exists() and (not path.is_file() or path.read_text() != data):
                raise ConfigError(f"{path} exists with other contents; give another --out or move it away")
    for name, data in files.items():
        write_atomic(Path(run_dir) / name, data, executable=name.endswith(".sh"))


def render(best: TrainConfig, cluster: ClusterConfig) -> dict[str, str]:
    """The three files' contents, by name."""
    text = to_yaml(best)
    # What we write is what `autotune train best.yaml` will read: rebuild it from the text so an
    # invalid plan is refused here, before anything is written, and grad_accum is filled in.
    checked = build_train_config(OmegaConf.to_container(OmegaConf.create(text)))
    return {
        "best.yaml": to_yaml(checked),
        "ds_config.json": json.dumps(ds_config(checked), indent=2) + "\n",
        "launch.sh": launch_script(checked, cluster),
    }


def block_params(model: ModelConfig) -> int:
    """Parameters of one transformer block, the unit the engine gathers and reduces at a time."""
    counts = param_counts(model)
    return (counts["attention"] + counts["mlp"] + counts["norms"]) // model.n_layers


def ds_config(cfg: TrainConfig) -> dict[str, Any]:
    """The plan of `cfg` in DeepSpeed's own config keys (plus one `autotune` key DeepSpeed ignores)."""
    model, job, plan, opt = cfg.model, cfg.job, cfg.plan, cfg.job.optimizer
    # Buckets of one block's parameters mirror the engine, which gathers and reduces per block.
    bucket = block_params(model)
    zero: dict[str, Any] = {"stage": plan.zero_stage}
    if plan.zero_stage >= 1:
        zero.update(overlap_comm=True, contiguous_gradients=True, reduce_bucket_size=bucket)
    if plan.zero_stage in (1, 2):
        zero.update(reduce_scatter=True, allgather_bucket_size=bucket)
    if plan.zero_stage == 3:
        # Prefetch the next block while computing this one; keep vectors (norms, biases) unsharded.
        zero.update(stage3_prefetch_bucket_size=bucket, stage3_param_persistence_threshold=10 * model.d_model)
    if plan.dp_replicate > 1 and plan.zero_stage == 3:
        # ZeRO++ hierarchical partitioning, the nearest to hybrid sharding (see hybrid_sharding_note)
        zero["zero_hpz_partition_size"] = plan.dp // plan.dp_replicate
    if plan.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if plan.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}

    fp16: dict[str, Any] = {"enabled": plan.precision == "fp16"}
    if fp16["enabled"]:
        fp16.update(
            loss_scale=0 if plan.loss_scale == "dynamic" else float(plan.loss_scale),  # 0: dynamic
            initial_scale_power=FP16_INITIAL_SCALE_POWER,
            loss_scale_window=FP16_SCALE_WINDOW,
            hysteresis=FP16_HYSTERESIS,
            min_loss_scale=FP16_MIN_SCALE,
        )

    config: dict[str, Any] = {
        "train_batch_size": job.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "zero_optimization": zero,
        "bf16": {"enabled": plan.precision == "bf16"},
        "fp16": fp16,
        "gradient_clipping": opt.grad_clip,
        # the dtype gradients are reduced in: the plan's (unset, DeepSpeed reduces in its 16-bit
        # compute dtype, where the engine's default is fp32)
        "communication_data_type": str(plan.reduce_dtype),
        # torch's AdamW (`torch_adam`), the update the engine runs and its plans were measured with;
        # without it DeepSpeed builds its FusedAdam (DeepSpeedCPUAdam when offloaded), C++ extensions
        # it compiles at first use. The parameter groups (no decay on norms and biases) and the lr
        # schedule come from the training script: the engine's warmup starts at lr / warmup_steps,
        # which none of DeepSpeed's schedulers computes (theirs start at 0), so there is no `scheduler`.
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": opt.lr,
                "betas": [opt.beta1, opt.beta2],
                "eps": opt.eps,
                "weight_decay": opt.weight_decay,
                "torch_adam": True,
            },
        },
        "steps_per_print": job.log_every,
        "wall_clock_breakdown": False,
    }
    blocks = len(checkpointed_blocks(plan, model.n_layers))
    if blocks:
        # Read by deepspeed.checkpointing.checkpoint, which the model code must call per block.
        config["activation_checkpointing"] = {
            "partition_activations": False,
            "cpu_checkpointing": False,
            "contiguous_memory_optimization": False,
            "number_checkpoints": blocks,
            "synchronize_checkpoint_boundary": False,
            "profile": False,
        }
    config["autotune"] = _not_deepspeed(cfg, blocks)
    return config


# What each checkpointing mode asks of a DeepSpeed model, and DeepSpeed's nearest equivalent
CHECKPOINTING_NOTES = {
    "full": "activation_checkpointing=full: the model must checkpoint {blocks} of {n_layers} blocks itself.",
    "selective": "activation_checkpointing=selective: the model must checkpoint {blocks} of {n_layers} blocks "
                 "itself (every {k}-th block).",
    "op": "activation_checkpointing=op (per operator: keep every {k}-th matmul's output and SDPA's, recompute "
          "the rest, torchtitan's policy): deepspeed.checkpointing has no per-operator policy; its nearest "
          "equivalent is checkpointing all {n_layers} blocks whole (activation_checkpointing=full: less "
          "memory, more recompute), which this section configures. autotune train --deepspeed instead runs "
          "the plan's policy with torch.utils.checkpoint's selective checkpoint contexts.",
    "attention": "activation_checkpointing=attention (only the attention core recomputed): the model must "
                 "run each of its {blocks} blocks' core attention (rotary, SDPA) through "
                 "deepspeed.checkpointing.checkpoint, as Megatron-DeepSpeed's --recompute-granularity "
                 "selective does.",
}


def _not_deepspeed(cfg: TrainConfig, blocks: int) -> dict[str, Any]:
    """The parts of the plan that DeepSpeed's config cannot express, stated rather than claimed."""
    plan = cfg.plan
    notes = ["DeepSpeed ignores this key; it records the plan parts that have no DeepSpeed config key.",
             "lr_schedule: linear warmup from lr / warmup_steps at the first step to lr, then cosine to "
             "lr * min_lr_ratio at total_steps; no DeepSpeed scheduler computes it, so the training script "
             "passes it to deepspeed.initialize as lr_scheduler (autotune train --deepspeed does)."]
    if plan.tp > 1 or plan.pp > 1:
        notes.append(
            f"tensor_parallel={plan.tp} and pipeline_parallel={plan.pp} are not set by this file: they come "
            "from the model code (e.g. a Megatron-DeepSpeed mpu, deepspeed.pipe.PipelineModule). "
            f"train_batch_size counts sequences over the {plan.dp} data-parallel ranks, so DeepSpeed must be "
            f"given an mpu whose data-parallel world size is {plan.dp}."
        )
    if blocks:
        notes.append(CHECKPOINTING_NOTES[str(plan.activation_checkpointing)].format(
            blocks=blocks, n_layers=cfg.model.n_layers, k=plan.checkpoint_every_k))
    if cfg.model.n_experts:
        notes.append(expert_parallel_note(cfg))
    if plan.dp_replicate > 1:
        notes.append(hybrid_sharding_note(plan))
    if plan.cp > 1:
        notes.append(
            f"context_parallel={plan.cp}: DeepSpeed has no ring-attention context parallelism (its sequence "
            "parallelism, Ulysses, is an all-to-all over attention heads in the model code); under DeepSpeed "
            f"these {plan.world_size} ranks would each take whole sequences. The plan splits each sequence over "
            f"{plan.cp} ranks under autotune's engine: launch.sh, best.yaml."
        )
    if plan.async_tp:
        notes.append(
            f"async_tp: DeepSpeed has no tensor-parallel communication overlap of its own (tp lives in the model "
            "code; Megatron-DeepSpeed's --tp-comm-overlap is Transformer Engine's userbuffers). The plan pipelines "
            f"sequence parallel's all-gathers and reduce-scatters with the matmuls in {plan.tp} chunks under "
            "autotune's engine: launch.sh, best.yaml."
        )
    if plan.fp8 != "none":
        notes.append(
            f"fp8={plan.fp8}: DeepSpeed has no float8 training of its own for this (its fp8 path is NVIDIA "
            "Transformer Engine layers in the model code); this file trains in bf16. The plan's float8 linears "
            "(torchao, dynamic scaling" + (", float8 all-gather" if plan.fp8 == "tensorwise" and plan.zero_stage >= 1
                                          else "") + ") run under autotune's engine: launch.sh, best.yaml."
        )
    return {
        "note": " ".join(notes),
        "model": cfg.model.name,
        "lr_schedule": {"warmup_steps": cfg.job.optimizer.warmup_steps, "total_steps": cfg.job.steps,
                        "min_lr_ratio": cfg.job.optimizer.min_lr_ratio},
        "seq_len": cfg.job.seq_len,
        "data_parallel": plan.dp,
        "tensor_parallel": plan.tp,
        "sequence_parallel": plan.sequence_parallel,
        "async_tensor_parallel": plan.async_tp,
        "pipeline_parallel": plan.pp,
        "pipeline_schedule": plan.pp_schedule,
        "pipeline_virtual_stages": plan.pp_virtual_stages,
        "expert_parallel": plan.ep,
        "context_parallel": plan.cp,
        "data_parallel_replicas": plan.dp_replicate,
        "activation_checkpointing": plan.activation_checkpointing,
        "checkpoint_every_k": plan.checkpoint_every_k,
        "kernels": plan.kernels,
        "compile": plan.compile,
        "compile_loss": plan.compile_loss,
        "fp8": plan.fp8,
    }


def expert_parallel_note(cfg: TrainConfig) -> str:
    """Where a DeepSpeed user sets the plan's expert parallelism: in the model code, not in ds_config."""
    model, plan = cfg.model, cfg.plan
    drop = (f"capacity_factor={model.capacity_factor}, drop_tokens=True" if model.capacity_factor is not None
            else "drop_tokens=False")
    note = (f"expert_parallel={plan.ep}: DeepSpeed sets expert parallelism in the model code, not in this file: each of "
            f"the {len(model.moe_layers)} MoE layers is deepspeed.moe.layer.MoE(hidden_size={model.d_model}, expert=<a "
            f"SwiGLU MLP of width {model.expert_d_ff}>, num_experts={model.n_experts}, ep_size={plan.ep}, "
            f"k={model.experts_per_token}, {drop}, use_rts=False, noisy_gate_policy=None, "
            "top2_2nd_expert_sampling=False), and the optimizer's param groups are split with "
            "deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer.")
    if model.n_shared_experts:
        note += (f" DeepSpeed's MoE has no gated shared expert (use_residual mixes an MLP otherwise): the model adds "
                 f"its {model.n_shared_experts} shared expert(s) of width {model.shared_expert_d_ff} beside the layer.")
    if plan.zero_stage == 3:
        note += (" DeepSpeed refuses MoE layers under ZeRO stage 3 (\"MoE not supported with Stage 3\"): "
                 "with DeepSpeed this plan needs zero_optimization.stage 2 or less.")
    return note


def hybrid_sharding_note(plan: PlanConfig) -> str:
    """Where DeepSpeed's nearest equivalent of the plan's hybrid sharding differs from the engine's."""
    shard = plan.dp // plan.dp_replicate
    note = (f"dp_replicate={plan.dp_replicate}: the engine shards ZeRO-{plan.zero_stage}'s parameters, gradients and "
            f"optimizer states within groups of {shard} ranks, replicated {plan.dp_replicate} times, and all-reduces the "
            "gradient shards across the replicas once per step (FSDP2 HSDP).")
    if plan.zero_stage == 3:
        return note + (
            f" DeepSpeed's nearest, ZeRO++ hierarchical partitioning (zero_hpz_partition_size={shard}), differs: only "
            f"a second copy of the 16-bit parameters is sharded within groups of {shard} ranks (backward's all-gathers "
            f"stay there); the forward all-gather, the gradients' reduce-scatter and the optimizer states span all "
            f"{plan.dp} ranks: less memory per GPU and more traffic across nodes than the engine's plan.")
    return note + (f" DeepSpeed has no hierarchical partitioning under ZeRO stage {plan.zero_stage} (hpZ needs stage 3): "
                   f"with this file it shards over all {plan.dp} data-parallel ranks.")


def launch_script(cfg: TrainConfig, cluster: ClusterConfig) -> str:
    """A bash script that runs `torchrun -m autotune.engine.train best.yaml` with the plan's process count."""
    world, per_node = cfg.plan.world_size, cluster.gpus_per_node
    if world > cluster.n_gpus:
        raise ConfigError(
            f"the plan needs dp x cp x tp x pp = {world} GPUs but cluster {cluster.name!r} has {cluster.n_gpus}; "
            "pick a plan with fewer ranks or a larger cluster"
        )
    if world > per_node and world % per_node:
        raise ConfigError(
            f"the plan's {world} ranks do not fill whole nodes of {per_node} GPUs; "
            f"use a dp x cp x tp x pp that is a multiple of {per_node}"
        )
    nodes, nproc = (1, world) if world <= per_node else (world // per_node, per_node)
    head = [
        "#!/usr/bin/env bash",
        f"# Generated by autotune: trains {_one_line(cfg.model.name)} with the plan in best.yaml",
        f"# (dp={cfg.plan.dp}" + (f" cp={cfg.plan.cp}" if cfg.plan.cp > 1 else "") + f" tp={cfg.plan.tp} pp={cfg.plan.pp}) on {nodes} node(s) x {nproc} GPU(s) "
        f"of cluster {_one_line(cluster.name)}.",
        "# Extra arguments are config overrides for the engine, e.g. ./launch.sh job.steps=1000",
    ]
    if cfg.model.n_experts:
        head.append(f"# Expert parallelism: ep={cfg.plan.ep} (each group of {cfg.plan.ep} data-parallel ranks splits every MoE "
                    f"layer's {cfg.model.n_experts} experts); under DeepSpeed that is ep_size={cfg.plan.ep} of "
                    "deepspeed.moe.layer.MoE in the model code (ds_config.json, autotune.note).")
    if cfg.plan.dp_replicate > 1:
        head.append(f"# Hybrid sharding: {cfg.plan.dp_replicate} replicas, each sharding ZeRO-{cfg.plan.zero_stage} "
                    f"over {cfg.plan.dp // cfg.plan.dp_replicate} data-parallel ranks (plan.dp_replicate in best.yaml).")
    if cfg.plan.cp > 1:
        head.append(f"# Context parallelism: cp={cfg.plan.cp} (each sequence split over {cfg.plan.cp} ranks, attention over "
                    "a ring of their keys and values; DeepSpeed has none: ds_config.json, autotune.note).")
    if cfg.plan.fp8 != "none":
        head.append(f"# Float8 linears: fp8={cfg.plan.fp8} (torchao's float8 training; pip install 'autotune[fp8]').")
    if nodes == 1:
        body = [
            "set -euo pipefail",
            'HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"',
            f'exec torchrun --standalone --nproc_per_node={nproc} -m autotune.engine.train "$HERE/best.yaml" "$@"',
        ]
    else:
        head += [
            f"# Run it once on each of the {nodes} nodes, from a folder every node sees (shared filesystem).",
            f"#   NODE_RANK    this node's index, 0..{nodes - 1} (default: $SLURM_NODEID, else 0)",
            "#   MASTER_ADDR  address of node 0, reachable from every node (required)",
            f"#   MASTER_PORT  rendezvous port on node 0 (default {MASTER_PORT})",
        ]
        body = [
            "set -euo pipefail",
            'HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"',
            'NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"',
            'MASTER_ADDR="${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}"',
            f'MASTER_PORT="${{MASTER_PORT:-{MASTER_PORT}}}"',
            f"exec torchrun --nnodes={nodes} --nproc_per_node={nproc} --node_rank=\"$NODE_RANK\" \\",
            '    --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="${RDZV_ID:-autotune}" \\',
            '    -m autotune.engine.train "$HERE/best.yaml" "$@"',
        ]
    return "\n".join(head + body) + "\n"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def cli(argv: list[str]) -> int:
    """`autotune emit CONFIG.yaml --out DIR [key=value ...]`."""
    parser = argparse.ArgumentParser(prog="autotune emit",
                                     description="best.yaml, ds_config.json and launch.sh for a training config.")
    parser.add_argument("config", help="a training config (model, job, plan), e.g. outputs/<run>/best.yaml")
    parser.add_argument("--out", required=True, help="the folder to write the three files into")
    parser.add_argument("--gpus-per-node", type=int, default=None,
                        help="GPUs per node for launch.sh (default: all the plan's ranks on one node)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. plan.zero_stage=3")
    args = parser.parse_intermixed_args(argv)
    cfg = load_train_config(args.config, args.overrides)
    world = cfg.plan.world_size
    per_node = world if args.gpus_per_node is None else args.gpus_per_node
    if per_node < 1:
        raise ConfigError(f"--gpus-per-node={per_node} must be at least 1")
    nodes = -(-world // per_node)
    cluster = ClusterConfig(name=f"{nodes}x{per_node}", gpus_per_node=per_node, nodes=nodes)
    write_outputs(Path(args.out), cfg, cluster, replace=False)
    print(f"wrote best.yaml, ds_config.json and launch.sh to {args.out}")
    return 0
