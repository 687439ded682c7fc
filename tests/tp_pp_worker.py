"""Worker of the multi-rank tests (tests/conftest.py's four_rank_run): train each config of a JSON
spec for its job.steps and write the loss trajectories (rank 0). Run under torchrun, where every
config's plan must use all the launched ranks (several plans share one launch's start-up), or alone
for single-process references (`launch` runs those in the test's own process).

    python tests/tp_pp_worker.py SPEC.json OUT.pt

SPEC: {"runs": {name: config dict} (OUT: loss, grad_norm and moe per step, the fp16 loss scale after
it, the run's wall seconds, the Triton kernels any rank launched and rank 0's groups of each mesh dim), "resume": {name: {"config": ..., "save_at": k}}, "load": {name:
{"config": ..., "checkpoint": path}}, "overflow_at": {name of a fp16 run: step}, "accumulating":
[names of pp runs], "resume_at": {name of a run: k}, "probe": {name: {"config": ..., "warmup": w,
"steps": n}}, "saved": {name: {"model": ModelConfig fields, "b", "s", "precision", "sp"}}, "calls": {name:
"module:function"}}. An overflow is made by setting one gradient of rank 0 to
inf before that step's unscale (only rank 0: every rank must skip the step with it). A resume run trains save_at steps,
checkpoints (into job.out_dir/ckpt/step-k), goes on to job.steps, then a fresh engine loads the
checkpoint and trains from save_at again: OUT holds both trajectories. A load run starts from a
checkpoint (written under any plan) and trains to job.steps. A run named in resume_at also checkpoints
before step k, and a fresh engine continues from there: OUT's "resumed" holds its trajectory (and
"start"). A probe run is the search's trial (engine.probe.run): OUT holds its JSON result. A saved
case measures the bytes the model saves for backward on a rank of tensor parallelism over every
launched rank (OUT: {"block": the mean over blocks, "outside": the rest}). A call runs a test module's
own function on every rank (importable from tests/, taking no argument; OUT: what it returns).
"""
from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as tdist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from autotune.engine import dist, probe
from autotune.engine.config import ModelConfig, PlanConfig, build_train_config
from autotune.engine.model import build_model
from autotune.engine.parallel import apply_activation_checkpointing, local_tensor
from autotune.engine.tensor_parallel import apply_tp, loss_context
from autotune.engine.train import Engine, reduce_loss
from autotune.kernels._common import LazyKernel

ROOT = Path(__file__).resolve().parents[1]


def launch(tmp_path: Path, name: str, spec: dict, nproc: int) -> dict:
    """Run this worker on `spec` in `nproc` gloo ranks and return its OUT. One rank runs in the
    calling process, in a one-rank group of its own (no interpreter and torch start-up to pay);
    spec and OUT pass through JSON and torch.save as they do to and from torchrun's ranks."""
    if nproc == 1:
        saved = io.BytesIO()
        torch.save(run_spec(json.loads(json.dumps(spec))), saved)
        return torch.load(io.BytesIO(saved.getvalue()))
    spec_path, out_path = tmp_path / f"{name}.json", tmp_path / f"{name}-out.pt"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        __file__, str(spec_path), str(out_path)], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return torch.load(out_path)


def merged(specs: list[dict]) -> dict:
    """One SPEC of several (their names apart): one launch trains them all."""
    spec: dict = {}
    for part in specs:
        for key, value in part.items():
            if isinstance(value, list):
                spec.setdefault(key, []).extend(value)
            else:
                assert not spec.get(key, {}).keys() & value.keys(), f"{key}: a name in two specs"
                spec.setdefault(key, {}).update(value)
    return spec


LAUNCHED: set[str] = set()  # names of the Triton kernels this rank launched during the current run


def count_launches() -> None:
    launch = LazyKernel.__getitem__

    def counted(kernel: LazyKernel, grid):
        LAUNCHED.add(kernel.fn.__name__)
        return launch(kernel, grid)

    LazyKernel.__getitem__ = counted


def launched_anywhere() -> list[str]:
    every: list = [None] * tdist.get_world_size()
    tdist.all_gather_object(every, sorted(LAUNCHED))
    return sorted(set().union(*every))


def losses(engine: Engine, steps: range) -> list[float]:
    return [reduce_loss(engine.step(step).loss)[0] for step in steps]


def trajectory(engine: Engine, steps: range, save_at: int | None = None) -> dict:
    """Loss and global gradient norm (before clipping) of each step, the loss scale after it and a
    MoE model's step figures (engine.moe.step_stats); with save_at, the path of a checkpoint written
    before that step."""
    out: dict = {"loss": [], "grad_norm": [], "scale": [], "moe": []}
    for step in steps:
        if step == save_at:
            out["checkpoint"] = str(engine.save(Path(engine.cfg.job.out_dir) / "ckpt", step))
        r = engine.step(step)
        out["loss"].append(reduce_loss(r.loss)[0])
        out["grad_norm"].append(float(r.grad_norm))
        out["scale"].append(engine.scaler.get_scale() if engine.scaler else 1.0)
        out["moe"].append(r.moe)
    return out


def overflow_on_rank0(engine: Engine, at: int) -> None:
    """Before the unscale of step `at`, rank 0 sets one of its gradients to inf."""
    unscale, calls = engine.scaler.unscale_, iter(range(engine.cfg.job.steps))

    def unscale_(optimizer):
        if next(calls) == at and dist.rank() == 0:
            grad = next(p.grad for p in engine.model.parameters() if p.grad is not None)
            (grad.to_local() if isinstance(grad, DTensor) else grad).fill_(torch.inf)
        unscale(optimizer)

    engine.scaler.unscale_ = unscale_


def optimizer_bytes(engine: Engine) -> int:
    """The most bytes of optimizer states (a DTensor's local shard) that any rank holds."""
    held = sum(local_tensor(v).numel() * v.element_size()
               for state in engine.optimizer.state.values() for v in state.values() if torch.is_tensor(v))
    return most_over_ranks(held, engine.device)


def param_bytes(engine: Engine) -> int:
    """The most bytes of parameters (a DTensor's local shard) that any rank holds."""
    held = sum(local_tensor(p).numel() * p.element_size() for p in engine.model.parameters())
    return most_over_ranks(held, engine.device)


def gradient_bytes(model: torch.nn.Module) -> int:
    """The bytes of gradients this rank holds: for FSDP2's parameters, the sharded gradient and the
    unsharded one (accumulated between a pipeline stage's micro-batches; while a unit is gathered
    the module's parameter is the unsharded one, so each tensor is counted once); others' own."""
    def nbytes(grad):
        return local_tensor(grad).numel() * grad.element_size() if grad is not None else 0

    held, seen = 0, set()
    for module in model.modules():
        group = module._get_fsdp_state()._fsdp_param_group if isinstance(module, FSDPModule) else None
        for fp in group.fsdp_params if group else ():
            unsharded = getattr(fp, "_unsharded_param", None)
            seen.update({id(fp.sharded_param), id(unsharded)})
            held += nbytes(fp.sharded_param.grad) + nbytes(
                fp.unsharded_accumulated_grad if fp.unsharded_accumulated_grad is not None
                else unsharded.grad if unsharded is not None else None)
    return held + sum(nbytes(p.grad) for p in model.parameters() if id(p) not in seen)


def record_backward_starts(engine: Engine) -> list[int]:
    """The gradient bytes held at the start of each micro-batch's backward on this rank's stages."""
    seen: list[int] = []
    for stage in engine.pipeline.stages:
        def backward(*args, _backward=stage.backward_maybe_with_nosync, **kwargs):
            seen.append(gradient_bytes(engine.model))
            return _backward(*args, **kwargs)

        stage.backward_maybe_with_nosync = backward
    return seen


def saved_bytes(model: dict, b: int, s: int, precision: str, sp: bool, ckpt: str = "none", k: int = 2) -> dict[str, float]:
    """Bytes one block (the mean) and the rest of the model save for backward on a tp rank: the
    local shards of what autograd (and a per-operator checkpoint's cache) keeps, counted as
    autotune.profile.measure_saved_bytes counts them, with 16-bit parameters as FSDP2 casts them."""
    cfg = ModelConfig(**model)
    net = build_model(cfg, "cpu")
    if precision != "fp32":
        net = net.to({"bf16": torch.bfloat16, "fp16": torch.float16}[precision])
    tp = tdist.get_world_size()
    net = apply_tp(net, init_device_mesh("cpu", (tp,), mesh_dim_names=("tp",)), sp)
    held = {local_tensor(t).untyped_storage().data_ptr() for t in [*net.parameters(), *net.buffers()]}
    owner, seen = ["outside"], {}
    for name, block in net.layers.items():
        block.register_forward_pre_hook(lambda mod, args, name=name: owner.__setitem__(0, name))
        block.register_forward_hook(lambda mod, args, out: owner.__setitem__(0, "outside"))

    def pack(t: torch.Tensor) -> torch.Tensor:
        local = local_tensor(t)
        try:
            key, nbytes = local.untyped_storage().data_ptr(), local.untyped_storage().nbytes()
        except RuntimeError:  # a tensor subclass without a storage of its own (DTensor's rms_norm)
            key, nbytes = ("id", id(local)), local.numel() * local.element_size()
        if key not in held and key not in seen and nbytes > 0:
            seen[key] = (owner[0], nbytes)
        return t

    plan = PlanConfig(activation_checkpointing=ckpt, checkpoint_every_k=k)
    apply_activation_checkpointing(net, plan, on_keep=lambda out: [pack(t) for t in (out if isinstance(out, tuple) else (out,))
                                                                   if isinstance(t, torch.Tensor)])
    tokens = torch.randint(0, cfg.vocab_size, (b, s))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), loss_context(PlanConfig(tp=tp, sequence_parallel=sp)):
        net(tokens, tokens)
    return {"block": sum(n for who, n in seen.values() if who != "outside") / cfg.n_layers,
            "outside": sum(n for who, n in seen.values() if who == "outside")}


def most_over_ranks(value: int, device: torch.device) -> int:
    most = torch.tensor(value, device=device)
    tdist.all_reduce(most, op=tdist.ReduceOp.MAX)
    return int(most)


def run_spec(spec: dict) -> dict:
    """Every part of `spec` in the launched process group (a one-rank group of its own when none
    is launched); its OUT (the same on every rank)."""
    device = dist.init_distributed()
    out: dict = {}
    try:
        for name, config in spec.get("runs", {}).items():
            started = time.perf_counter()
            LAUNCHED.clear()
            cfg = build_train_config(config)
            engine = Engine(cfg, device)
            if name in spec.get("overflow_at", {}):
                overflow_on_rank0(engine, spec["overflow_at"][name])
            starts = record_backward_starts(engine) if name in spec.get("accumulating", ()) else []
            save_at = spec.get("resume_at", {}).get(name)
            out[name] = trajectory(engine, range(cfg.job.steps), save_at)
            out[name]["optimizer_bytes"] = optimizer_bytes(engine)
            out[name]["param_bytes"] = param_bytes(engine)
            out[name]["accumulating_grad_bytes"] = most_over_ranks(max(starts, default=0), device)
            if save_at is not None:
                resumed = Engine(cfg, device)
                start = resumed.load(Path(out[name].pop("checkpoint")))
                out[name]["resumed"] = trajectory(resumed, range(start, cfg.job.steps)) | {"start": start}
            out[name]["kernels"] = launched_anywhere()
            out[name]["mesh"] = {dim: engine.mesh[dim].mesh.tolist() for dim in engine.mesh.mesh_dim_names}
            out[name]["seconds"] = time.perf_counter() - started
        for name, run in spec.get("probe", {}).items():
            started = time.perf_counter()
            args = argparse.Namespace(warmup=run["warmup"], steps=run["steps"], progress=None, timeout=None)
            out[name] = probe.run(build_train_config(run["config"]), args, device)
            out[name]["seconds"] = time.perf_counter() - started
        for name, run in spec.get("resume", {}).items():
            cfg, save_at = build_train_config(run["config"]), run["save_at"]
            root = Path(cfg.job.out_dir) / "ckpt"
            engine = Engine(cfg, device)
            first = losses(engine, range(save_at))
            path = engine.save(root, save_at)
            first += losses(engine, range(save_at, cfg.job.steps))
            resumed = Engine(cfg, device)
            start = resumed.load(path)
            out[name] = {"straight": first, "resumed": losses(resumed, range(start, cfg.job.steps)), "start": start}
        for name, case in spec.get("saved", {}).items():
            out[name] = saved_bytes(case["model"], case["b"], case["s"], case["precision"], case["sp"],
                                    case.get("ckpt", "none"), case.get("k", 2))
        for name, run in spec.get("load", {}).items():
            cfg = build_train_config(run["config"])
            engine = Engine(cfg, device)
            start = engine.load(Path(run["checkpoint"]))
            out[name] = {"start": start, "losses": losses(engine, range(start, cfg.job.steps))}
        for name, call in spec.get("calls", {}).items():
            module, function = call.split(":")
            out[name] = getattr(importlib.import_module(module), function)()
    finally:
        dist.shutdown()
    return out


def main(spec_path: str, out_path: str) -> None:
    count_launches()
    out = run_spec(json.loads(Path(spec_path).read_text()))
    if os.environ.get("RANK", "0") == "0":  # the losses are all-reduced: every rank holds the same
        torch.save(out, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:3])
