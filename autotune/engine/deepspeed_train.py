"""Train the engine's model on the engine's data under DeepSpeed's engine instead of the engine's own
parallelism: `autotune train CONFIG.yaml --deepspeed ds_config.json [key=value ...]`, or launched by
either launcher:

    deepspeed --num_gpus N --module autotune.engine.deepspeed_train CONFIG.yaml --deepspeed ds_config.json
    torchrun --nproc_per_node N -m autotune.engine.deepspeed_train CONFIG.yaml --deepspeed ds_config.json

`deepspeed.initialize` gets the ds_config as it is: ZeRO stage, offload, precision, clipping and the
optimizer come from it; only its `communication_data_type`, where the file has none, is the plan's
reduce dtype (a file's own must agree with it). What DeepSpeed's config cannot say comes from the
training config: the model, the data (each rank's micro-batches of each step, as the engine cuts
them, so both train on the same tokens), the seed and, when the file has no `scheduler`, the lr schedule (the engine's warmup starts
at lr / warmup_steps, which none of DeepSpeed's schedulers computes: it is handed to DeepSpeed as the
client lr_scheduler, which DeepSpeed steps once per optimizer step). When the file has an
`activation_checkpointing` section, the plan's checkpointed blocks (or, for attention, their
attention cores) run through deepspeed.checkpointing with it; op runs torch's per-operator policy. metrics.jsonl is the engine's.
The plan must be data parallel only (tp = pp = ep = 1): DeepSpeed's tensor and pipeline parallelism
need other model code. No checkpoint is written.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from autotune.engine import dist
from autotune.engine.config import ConfigError, TrainConfig, load_train_config
from autotune.engine.data import micro_batches
from autotune.engine.model import build_model
from autotune.engine.moe import step_stats
from autotune.engine.parallel import apply_activation_checkpointing, checkpointed_blocks, param_groups, pin_attention
from autotune.engine.train import (MemoryMeter, StopFlag, forget_metrics_after, launch_workers, log_record,
                                   lr_factor, peak_flops, preflight, reduce_loss)
from autotune.profile import flops_per_token


# --- the ds_config and the training config together -------------------------------------------

REDUCE_DTYPE_KEY = "communication_data_type"  # DeepSpeed's dtype of the gradients' reduction

def read_ds_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--deepspeed: no such file {path}; give a DeepSpeed config (e.g. a run's ds_config.json)")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"--deepspeed: cannot read {path} as JSON ({' '.join(str(e).split())})")
    if not isinstance(ds, dict):
        raise ConfigError(f"--deepspeed: {path} is not a DeepSpeed config (a JSON object of its settings)")
    return ds


def check_together(ds: dict[str, Any], cfg: TrainConfig) -> None:
    """The training config's batch shape is how the data is cut: DeepSpeed's must be the same."""
    plan, job = cfg.plan, cfg.job
    if (plan.tp, plan.pp, plan.ep, plan.cp) != (1, 1, 1, 1):
        raise ConfigError(
            f"--deepspeed trains data parallel only, but the plan has tp={plan.tp} pp={plan.pp} ep={plan.ep} "
            f"cp={plan.cp}; set plan.tp=1 plan.pp=1 plan.ep=1 plan.cp=1 (or train it with the engine: leave out --deepspeed)"
        )
    wanted = {"train_batch_size": job.global_batch, "train_micro_batch_size_per_gpu": plan.micro_batch,
              "gradient_accumulation_steps": plan.grad_accum}
    for key, value in wanted.items():
        if key in ds and ds[key] != value:
            raise ConfigError(
                f"--deepspeed: {key}={ds[key]} but the training config has {value} (job.global_batch="
                f"{job.global_batch}, plan.micro_batch={plan.micro_batch}, plan.dp={plan.dp}); make them agree"
            )
    given = ds.get(REDUCE_DTYPE_KEY)
    if given is not None and str(given).lower() != plan.reduce_dtype:
        raise ConfigError(f"--deepspeed: {REDUCE_DTYPE_KEY}={given} but the training config has "
                          f"plan.reduce_dtype={plan.reduce_dtype}; make them agree")


def with_reduce_dtype(ds: dict[str, Any], cfg: TrainConfig) -> dict[str, Any]:
    """The ds_config reducing gradients in the plan's dtype (left unset, DeepSpeed would reduce in
    its 16-bit compute dtype)."""
    return {**ds, REDUCE_DTYPE_KEY: str(cfg.plan.reduce_dtype)}


# --- building DeepSpeed's engine ------------------------------------------------------------------

def build_model_for(cfg: TrainConfig, ds: dict[str, Any]) -> torch.nn.Module:
    """The engine's model, initialised (or loaded) as the engine's own run starts it, on the CPU
    (DeepSpeed moves it to this rank's device)."""
    model = build_model(cfg.model, "cpu", seed=cfg.job.seed, kernels=cfg.plan.kernels)
    pin_attention(model, cfg.plan)
    if cfg.model.init_from:
        from autotune.engine.hf import load_hf_weights

        load_hf_weights(model, cfg.model.init_from)
    blocks = checkpointed_blocks(cfg.plan, cfg.model.n_layers)
    if cfg.plan.activation_checkpointing == "op":  # deepspeed.checkpointing has no per-operator policy
        apply_activation_checkpointing(model, cfg.plan)
    elif blocks and "activation_checkpointing" in ds:
        import deepspeed

        deepspeed.checkpointing.configure(None, deepspeed_config=ds)
        for i in blocks:
            block = model.layers[str(i)]
            if cfg.plan.activation_checkpointing == "attention":  # Megatron-DeepSpeed's selective recompute
                block.attn.core = functools.partial(deepspeed.checkpointing.checkpoint, block.attn.core)
            else:
                block.forward = functools.partial(deepspeed.checkpointing.checkpoint, block.forward)
    if ds.get("zero_optimization", {}).get("stage") == 3:
        import deepspeed

        # The head is applied by the Transformer's own forward (F.linear on lm_head.weight, or on the
        # tied tok_emb.weight after tok_emb's forward): ZeRO-3 gathers it only for a module it is told of.
        deepspeed.zero.register_external_parameter(model, model.head_weight())
    return model


def initialize(cfg: TrainConfig, ds: dict[str, Any]):
    """deepspeed.initialize on the engine's model with the ds_config; the optimizer's parameter groups
    are the engine's (no weight decay on norms and biases)."""
    import deepspeed

    model = build_model_for(cfg, ds)
    o = cfg.job.optimizer
    groups = param_groups(model, o.weight_decay)
    optimizer = None
    if "optimizer" not in ds:  # the engine's AdamW as the client optimizer
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, foreach=True)
    schedule = None
    if "scheduler" not in ds:
        schedule = functools.partial(_engine_schedule, functools.partial(lr_factor, cfg.job))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, optimizer=optimizer,
                                      lr_scheduler=schedule, config=with_reduce_dtype(ds, cfg),
                                      dist_init_required=False)
    return engine


def _engine_schedule(factor, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --- the training loop ---------------------------------------------------------------------------

def step(engine, cfg: TrainConfig, index: int, device: torch.device) -> tuple[torch.Tensor, float, int]:
    """One optimizer step of DeepSpeed's engine over this rank's micro-batches of step `index`:
    DeepSpeed scales each backward by 1 / gradient_accumulation_steps and steps the optimizer (and
    the schedule) at the last micro-batch. Returns this rank's mean loss, the global gradient norm
    before clipping, and the number of micro-batches."""
    batches = micro_batches(cfg.job, cfg.model, cfg.plan, index, engine.global_rank % cfg.plan.dp, cfg.plan.dp)
    loss_sum = torch.zeros((), device=device)
    own_norm = None
    for i, (inputs, targets) in enumerate(batches):
        loss = engine(inputs.to(device), targets.to(device))
        engine.backward(loss)
        if i == len(batches) - 1 and _records_no_norm(engine):
            grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
            own_norm = float(torch.nn.utils.get_total_norm(grads))  # reduced over dp by backward
        engine.step()
        loss_sum += loss.detach().float()
    norm = own_norm if own_norm is not None else engine.get_global_grad_norm()
    return loss_sum / len(batches), float(norm) if norm is not None else float("nan"), len(batches)


def _records_no_norm(engine) -> bool:
    """Without ZeRO and mixed precision DeepSpeed clips torch's way and keeps no gradient norm."""
    return engine.zero_optimization_stage() == 0 and not (engine.bfloat16_enabled() or engine.fp16_enabled())


def init_deepspeed(device: torch.device) -> None:
    """deepspeed.init_distributed over the engine's process group. DeepSpeed's CPU backend would first
    JIT-compile its shared-memory all-reduce (about 30 s of C++ on every fresh machine, and a compiler),
    which only its inference all-reduce calls: marked unavailable, training runs torch.distributed's."""
    import deepspeed
    import deepspeed.ops

    if device.type == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


def train(cfg: TrainConfig, ds: dict[str, Any]) -> int:
    device = dist.init_distributed()
    try:
        init_deepspeed(device)
        with StopFlag() as stop:
            return _train(cfg, ds, device, stop)
    finally:
        dist.shutdown()


def _train(cfg: TrainConfig, ds: dict[str, Any], device: torch.device, stop: StopFlag) -> int:
    job, rank0 = cfg.job, dist.rank() == 0
    if dist.world_size() != cfg.plan.dp:
        raise ConfigError(f"the plan has dp={cfg.plan.dp} but {dist.world_size()} processes were launched; "
                          f"launch {cfg.plan.dp} (or use `autotune train`, which does)")
    torch.manual_seed(job.seed)
    engine = initialize(cfg, ds)
    out_dir = Path(job.out_dir)
    if rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
        forget_metrics_after(out_dir / "metrics.jsonl", 0)
    metrics = open(out_dir / "metrics.jsonl", "a") if rank0 else None
    meter, peak = MemoryMeter(device), peak_flops(device, "bf16" if engine.bfloat16_enabled() else
                                                  "fp16" if engine.fp16_enabled() else "fp32")
    tokens_per_step = job.global_batch * job.seq_len
    flops = flops_per_token(cfg.model, job.seq_len)["total"]
    try:
        t_last = time.perf_counter()
        for index in range(job.steps):
            lr = engine.get_lr()[0]
            loss, grad_norm, forwards = step(engine, cfg, index, device)
            moe = step_stats(engine.module, device, forwards, cfg.plan.dp)
            loss_value, stopping = reduce_loss(loss, stop.raised)
            tokens_per_s = tokens_per_step / (time.perf_counter() - t_last)
            record = {"step": index + 1, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": tokens_per_s,
                      "mfu": tokens_per_s * flops / (dist.world_size() * peak) if peak else None,
                      "peak_mem_bytes": meter.peak_bytes(), **{f"moe_{k}": v for k, v in (moe or {}).items()}}
            if rank0 and ((index + 1) % job.log_every == 0 or index + 1 == job.steps or stopping):
                log_record(record, metrics)
            t_last = time.perf_counter()
            if stopping:
                if rank0:
                    print(f"stopped by SIGTERM after step {index + 1}", flush=True)
                break
    finally:
        if metrics:
            metrics.close()
    return 0


# --- command line ----------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="autotune train --deepspeed",
                                     description="Train the engine's model and data under DeepSpeed's engine.")
    parser.add_argument("config", help="a training config (model, job, plan), e.g. outputs/<run>/best.yaml")
    parser.add_argument("--deepspeed", required=True, metavar="DS_CONFIG", help="a DeepSpeed config (ds_config.json)")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. job.steps=100")
    return parser.parse_intermixed_args(argv)


def load(argv: list[str]) -> tuple[argparse.Namespace, TrainConfig, dict[str, Any]]:
    """The arguments, the training config and the ds_config, checked before anything runs."""
    args = parse_args(argv)
    cfg = load_train_config(args.config, args.overrides)
    ds = read_ds_config(args.deepspeed)
    check_together(ds, cfg)
    _need_deepspeed()
    check_device_support(ds, args.deepspeed)
    preflight(cfg)
    return args, cfg, ds


def _need_deepspeed() -> None:
    try:
        import deepspeed  # noqa: F401  (half a minute's import is paid once, here)
    except ImportError:
        raise ConfigError("--deepspeed needs DeepSpeed: pip install deepspeed (or `pip install -e '.[deepspeed]'`)")


def check_device_support(ds: dict[str, Any], path: str) -> None:
    """DeepSpeed refuses a precision its accelerator lacks (fp16 on a CPU) only once every rank runs."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    for key, supported in (("fp16", accelerator.is_fp16_supported()), ("bf16", accelerator.is_bf16_supported())):
        if (ds.get(key) or {}).get("enabled") and not supported:
            raise ConfigError(f"--deepspeed: DeepSpeed does not train {key} on this machine's "
                              f"{accelerator.device_name()}; set {key}.enabled=false in {path} (or train on a GPU)")


def cli(argv: list[str]) -> int:
    """`autotune train CONFIG --deepspeed DS_CONFIG`: under torchrun, dp processes (one too: DeepSpeed
    wants a launcher's environment)."""
    args, cfg, ds = load(argv)
    if "WORLD_SIZE" in os.environ:
        return train(cfg, ds)
    return launch_workers("autotune.engine.deepspeed_train", cfg.plan.dp,
                          [args.config, "--deepspeed", args.deepspeed, *args.overrides])


def main() -> int:
    try:
        _, cfg, ds = load(sys.argv[1:])
        return train(cfg, ds)
    except ConfigError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
