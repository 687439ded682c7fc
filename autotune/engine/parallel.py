"""Apply a plan to a model: one small function per concern (what each does: docs/design.md, section 5).

    mesh = build_mesh(plan, device.type)
    model = apply_plan(model, plan, mesh, device, seed)   # float8 -> tp -> checkpointing -> compile -> ZeRO
    optimizer = build_optimizer(model, job)

ZeRO 0 is DDP; ZeRO 1/2/3 are FSDP2 `fully_shard` per block and at the root, with sharded fp32
master parameters and AdamW states. ZeRO 1 and 2 keep the gathered parameters from forward to
backward (3 frees them after forward). ZeRO 1 is Megatron's overlapped distributed optimizer: it
turns FSDP2's gradient sync and post-backward reshard off on every micro-step but the last
(`gradient_sync`), so each step gathers every unit once (the first forward, prefetched beside
the compute) and reduce-scatters it once (during the last backward), holding the unsharded
parameters and fp32 gradients between micro-steps; ZeRO 2 reduce-scatters every micro-step. Under
pp the pipeline stages do the deferring themselves for both, so there ZeRO 1 and 2 run alike.
Offload is FSDP2's CPUOffloadPolicy: the sharded fp32 master parameters, their gradients and the
AdamW states live in host memory and the optimizer step runs on the CPU, so offload_optimizer and
offload_params are one mechanism. Compute precision is FSDP2's MixedPrecisionPolicy (ZeRO 1-3)
or autocast (ZeRO 0); the parameters the optimizer updates stay fp32 either way. Gradients cross
the dp ranks in plan.reduce_dtype (`reduce_dtype`): fp32, or bf16 as FSDP2's reduce_dtype (ZeRO 1-3,
replicate) or DDP's bf16_compress_hook (ZeRO 0); the reduced gradients are fp32 again either way.

Tensor parallelism (autotune/engine/tensor_parallel.py) is applied first, on the mesh's tp dim, so that
FSDP2 then shards the DTensor parameters over dp (a 2D mesh). Pipeline parallelism
(autotune/engine/pipeline.py) cuts the model into stages and runs `apply_plan` on each. Under tp or pp,
ZeRO 0's gradient all-reduce is FSDP2's `replicate` instead of DDP (see `apply_ddp`).

Expert parallelism (`apply_ep`, plan.ep > 1) splits the dp ranks into groups of ep consecutive
ranks (`expert_layout`: dp unflattened into edp x ep): each rank of a group holds 1/ep of every MoE
layer's experts (DTensors sharded over ep) and tokens reach them all-to-all (autotune/engine/moe.py).
The experts are then their own ZeRO unit over the edp ranks that hold the same experts, FSDP2 or
`replicate` (DDP's one process group cannot span both), everything else as without ep.

Hybrid sharding (`shard_mesh`, plan.dp_replicate > 1, ZeRO 1-3) unflattens dp into
(dp_replicate, dp_shard), dp_shard innermost (the ranks nearest each other, in one node where
they fit): FSDP2 shards over dp_shard and all-reduces the reduce-scattered gradients over
dp_replicate (HSDP), once per step (`gradient_sync`).

Context parallelism (plan.cp > 1, autotune/engine/context_parallel.py) adds a cp dim between dp and
tp: the cp ranks of one dp rank share its sequences, each holding part of every one, and attention
runs over a ring of them. Their gradients are partial sums of the same batch's, so everything that
reduces gradients over dp does it over dp x cp instead (`grad_mesh`, the dims flattened).
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.utils.checkpoint
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.nn.attention import SDPBackend
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP

from autotune.engine.config import ConfigError, JobConfig, PlanConfig
from autotune.engine.context_parallel import apply_cp
from autotune.engine.float8 import apply_float8
from autotune.engine.moe import moe_layers
from autotune.engine.tensor_parallel import apply_tp

try:  # FSDP2's replicate is private and recent: without it only ZeRO 0 under tp or pp is lost
    from torch.distributed._composable.replicate_with_fsdp import ReplicateModule, replicate
except ImportError:
    ReplicateModule = replicate = None

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_supported(plan: PlanConfig, cuda: bool | None = None) -> None:
    """Refuse what the engine cannot run yet, before anything is built. cuda: whether the target has
    CUDA (None: this machine; the cost model passes its hardware's)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if plan.kernels == "triton" and not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(
            "plan.kernels=triton needs a CUDA GPU (or TRITON_INTERPRET=1 to run Triton's interpreter on the "
            "CPU, slowly); use plan.kernels=torch here"
        )
    if plan.attention == "cudnn" and (not cuda or plan.cp > 1):
        why = ("a CUDA GPU" if not cuda
               else f"plan.cp=1 (the ring of plan.cp={plan.cp} runs flash blocks)")
        raise ConfigError(f"plan.attention=cudnn (cuDNN's fused attention) needs {why}; use plan.attention=sdpa")
    if plan.reduce_dtype == "bf16" and not cuda and uses_ddp(plan):
        raise ConfigError("plan.reduce_dtype=bf16 under DDP (plan.zero_stage=0) is torch's bf16_compress_hook, which "
                          "needs CUDA with NCCL; use plan.zero_stage=1 (FSDP2 reduces in bf16 anywhere) or "
                          "plan.reduce_dtype=fp32")
    if plan.cp > 1 and (plan.pp > 1 or plan.compile):
        # the cost model estimates such plans (published runs have them); the engine does not run them yet
        what = f"plan.pp={plan.pp}" if plan.pp > 1 else "plan.compile=true"
        raise ConfigError(f"plan.cp={plan.cp} with {what}: the engine runs context parallelism without pipeline stages "
                          "and uncompiled (the ring's exchanges inside a compiled block are untested); use plan.pp=1 "
                          "and plan.compile=false, or plan.cp=1")
    if plan.compile and plan.tp > 1:
        # Seen with torch 2.13 (4 gloo ranks): compiled tensor-parallel blocks fail in backward
        # ("'Tensor' object has no attribute '_local_tensor'") without a dp wrapper, and under
        # replicate give a gradient norm 17% off the uncompiled run's. pp and dp alone compile fine.
        raise ConfigError(
            f"plan.compile=true with plan.tp={plan.tp}: torch.compile of tensor-parallel blocks gives wrong "
            f"gradients or fails in backward with torch {torch.__version__}; use plan.compile=false under tp"
        )


def build_mesh(plan: PlanConfig, device_type: str) -> DeviceMesh:
    """The (pp, dp, tp) device mesh of the job, (pp, dp, cp, tp) under context parallelism with dp
    and cp also flattened into dp_cp; tp innermost so that it stays within a node, cp next to it."""
    if plan.cp == 1:
        return init_device_mesh(device_type, (plan.pp, plan.dp, plan.tp), mesh_dim_names=("pp", "dp", "tp"))
    mesh = init_device_mesh(device_type, (plan.pp, plan.dp, plan.cp, plan.tp), mesh_dim_names=("pp", "dp", "cp", "tp"))
    mesh["dp", "cp"]._flatten("dp_cp")
    return mesh


def grad_mesh(plan: PlanConfig, mesh: DeviceMesh) -> DeviceMesh:
    """The ranks whose gradients are summed (averaged): dp, times cp under context parallelism."""
    return mesh["dp_cp"] if plan.cp > 1 else mesh["dp"]


def grad_ranks(plan: PlanConfig) -> int:
    return plan.dp * plan.cp


@functools.cache
def expert_layout(mesh: DeviceMesh, ep: int) -> DeviceMesh:
    """The job mesh with dp split into (edp, ep): an ep group is ep consecutive dp ranks (the closest
    after tp's), an edp group the dp / ep ranks holding the same experts. Made once per job mesh:
    making it creates process groups, a collective."""
    return mesh._unflatten("dp", (mesh["dp"].size() // ep, ep), ("edp", "ep"))


def shard_mesh(plan: PlanConfig, mesh: DeviceMesh) -> DeviceMesh:
    """The mesh FSDP2 shards over: dp, or under hybrid sharding the 2D (dp_replicate, dp_shard) mesh
    (FSDP2 replicates over the first dim and shards over the second). Made once per job mesh."""
    if plan.dp_replicate == 1:
        return grad_mesh(plan, mesh)
    return _hybrid_layout(mesh, plan.dp_replicate)["dp_replicate", "dp_shard"]


@functools.cache
def _hybrid_layout(mesh: DeviceMesh, replicas: int) -> DeviceMesh:
    return mesh._unflatten("dp", (replicas, mesh["dp"].size() // replicas), ("dp_replicate", "dp_shard"))


def expert_mesh(plan: PlanConfig, mesh: DeviceMesh) -> DeviceMesh | None:
    """The ranks over which the experts are data-parallel: those holding the same experts (edp)."""
    return expert_layout(mesh, plan.ep)["edp"] if plan.ep > 1 else None


def compute_dtype(plan: PlanConfig) -> torch.dtype:
    return DTYPES[plan.precision]


def reduce_dtype(plan: PlanConfig) -> torch.dtype:
    """The dtype gradients cross the data-parallel ranks in (FSDP2 also accumulates the unsharded
    gradients of deferred micro-steps in it)."""
    return DTYPES[plan.reduce_dtype]


def uses_fsdp(plan: PlanConfig) -> bool:
    return plan.zero_stage >= 1


def uses_ddp(plan: PlanConfig) -> bool:
    """Whether ZeRO 0 all-reduces gradients with DDP (see `apply_ddp`)."""
    return not uses_fsdp(plan) and grad_ranks(plan) > 1 and not uses_replicate(plan)


def uses_replicate(plan: PlanConfig) -> bool:
    """Whether ZeRO 0 all-reduces gradients with FSDP2's `replicate` rather than DDP (see `apply_ddp`)."""
    return not uses_fsdp(plan) and grad_ranks(plan) > 1 and (plan.tp > 1 or plan.pp > 1 or plan.ep > 1)


# --- expert parallelism ------------------------------------------------------------------------

def apply_ep(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Shard each MoE layer's experts over ep_mesh (dim 0, the expert index: rank r holds experts
    [r E/ep, (r+1) E/ep)) and send its tokens there. Built on meta, or loaded: every rank holds
    the same full weights, so each keeps its slice without communication."""
    for moe in moe_layers(model).values():
        experts = moe.experts
        for name, param in list(experts.named_parameters(recurse=False)):
            sharded = distribute_tensor(param.data, ep_mesh, [Shard(0)], src_data_rank=None)
            setattr(experts, name, nn.Parameter(sharded, requires_grad=param.requires_grad))
        experts.grad_scale = 1.0 / ep_mesh.size()
        moe.ep_group = ep_mesh.get_group()


def expert_modules(model: nn.Module) -> list[nn.Module]:
    return [moe.experts for moe in moe_layers(model).values()]


# --- activation checkpointing -----------------------------------------------------------------

def checkpointed_blocks(plan: PlanConfig, n_layers: int) -> list[int]:
    """Indices of the blocks whose activations are (wholly or in part) recomputed in backward."""
    if plan.activation_checkpointing in ("full", "op", "attention"):
        return list(range(n_layers))
    if plan.activation_checkpointing == "selective":
        return list(range(0, n_layers, plan.checkpoint_every_k))
    return []


# What the per-operator policy keeps: matmul outputs (every k-th of a block's, a MoE block's grouped
# expert matmuls among them) and SDPA's outputs (the costly ops; everything else is cheap to
# recompute), and the outputs of a sequence-parallel reduce-scatter and of expert parallelism's
# all-to-alls (recomputing them would repeat the collective in backward).
MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten._grouped_mm.default}
KEPT_OPS = {
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
    torch.ops._c10d_functional.all_to_all_single.default,
}


def op_policy(every_k: int, on_keep: Callable[[object], None] | None = None):
    """A fresh policy for one checkpointed forward (torch.utils.checkpoint's selective checkpointing):
    keep the outputs of KEPT_OPS and of the 1st, (1+k)th, ... matmul, recompute the rest. Matmuls are
    counted apart in forward and recompute, so both make the same choices. on_keep(output): told of
    each output kept in forward (autotune.profile counts them)."""
    matmuls = {False: 0, True: 0}

    def policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
        if func in MATMULS:
            keep = matmuls[ctx.is_recompute] % every_k == 0
            matmuls[ctx.is_recompute] += 1
        else:
            keep = func in KEPT_OPS
        if keep and on_keep is not None and not ctx.is_recompute:
            on_keep(ctx.op_output)
        return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def apply_activation_checkpointing(model: nn.Module, plan: PlanConfig,
                                   on_keep: Callable[[object], None] | None = None) -> None:
    """Recompute in backward, per plan.activation_checkpointing: the chosen blocks whole (full,
    selective), every block under op_policy (op), or each block's attention core (attention).
    Forwards are wrapped in place rather than the modules replaced by wrappers, so parameter names
    (checkpoints, init seeds) stay as they are. on_keep: see op_policy."""
    chosen = set(checkpointed_blocks(plan, model.cfg.n_layers))
    mode = plan.activation_checkpointing
    for name, block in model.layers.items():  # a pipeline stage holds some of the blocks
        if int(name) not in chosen:
            continue
        if mode == "attention":
            block.attn.core = _checkpointed(block.attn.core)
        elif mode == "op":
            contexts = lambda: create_selective_checkpoint_contexts(op_policy(plan.checkpoint_every_k, on_keep))
            block.forward = _checkpointed(block.forward, contexts)
        else:
            block.forward = _checkpointed(block.forward)


def _checkpointed(forward, context_fn=None):
    contexts = {} if context_fn is None else {"context_fn": context_fn}

    def run(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **contexts, **kwargs)

    return run


def apply_compile(model: nn.Module, plan: PlanConfig) -> None:
    """torch.compile each block in place (its names unchanged; blocks share one compiled graph) and,
    under plan.compile_loss, the loss where the model computes it on whole-vocabulary logits (a
    vocabulary-sharded head's loss runs DTensor's loss_parallel; a pipeline's, the schedule's)."""
    if plan.compile:
        for block in model.layers.values():
            block.compile()
        if plan.compile_loss and plan.tp == 1 and plan.pp == 1:
            model.loss_fn = torch.compile(model.loss_fn)


# --- data parallel: DDP (ZeRO 0) or FSDP2 (ZeRO 1-3) ---------------------------------------------

def apply_fsdp(model: nn.Module, plan: PlanConfig, dp_mesh: DeviceMesh, device: torch.device,
               experts_mesh: DeviceMesh | None = None) -> None:
    """FSDP2 per block and at the root (embeddings, final norm, head); given experts_mesh (expert
    parallelism), each MoE layer's experts first, over those ranks."""
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype(plan), reduce_dtype=reduce_dtype(plan))
    offload = plan.offload_optimizer or plan.offload_params
    policy = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else None
    kwargs = dict(mesh=dp_mesh, mp_policy=mp, **({"offload_policy": policy} if policy else {}))
    reshard = plan.zero_stage == 3
    # Blocks get their hidden states already in the compute dtype from the root; casting their
    # inputs would also round the fp32 rotary tables passed to each block.
    block_kwargs = dict(kwargs, mp_policy=MixedPrecisionPolicy(
        param_dtype=compute_dtype(plan), reduce_dtype=reduce_dtype(plan), cast_forward_inputs=False))
    for experts in expert_modules(model) if experts_mesh is not None else ():
        fully_shard(experts, reshard_after_forward=reshard, **dict(block_kwargs, mesh=experts_mesh))
    for block in model.layers.values():
        fully_shard(block, reshard_after_forward=reshard, **block_kwargs)
    # The root's parameters are used last in forward and first in backward: never worth freeing.
    fully_shard(model, reshard_after_forward=False, **kwargs)


def apply_ddp(model: nn.Module, plan: PlanConfig, dp_mesh: DeviceMesh, device: torch.device,
              experts_mesh: DeviceMesh | None = None) -> nn.Module:
    """DDP over the dp ranks; a lone rank needs no wrapper (and pays no bucket copies).

    DDP cannot hold tensor-parallel (DTensor) parameters, and its bucket rebuild fails when a
    pipeline schedule runs several forwards before a backward (GPipe); under tp or pp the same
    all-reduce of gradients is FSDP2's `replicate`, per block (so each block's reduction overlaps
    the rest of backward). Under ep too: the experts are replicated over experts_mesh alone."""
    if grad_ranks(plan) == 1:
        return model
    if uses_replicate(plan):
        if replicate is None:
            raise ConfigError(
                f"plan.zero_stage=0 with plan.tp={plan.tp}, plan.pp={plan.pp}, plan.ep={plan.ep} needs FSDP2's "
                f"replicate, which torch {torch.__version__} lacks; use plan.zero_stage=1 or a newer torch"
            )
        # fp32 weights under autocast: only the reduction is cast (its gradients arrive in fp32)
        mp = MixedPrecisionPolicy(reduce_dtype=reduce_dtype(plan))
        for experts in expert_modules(model) if experts_mesh is not None else ():
            replicate(experts, mesh=experts_mesh, mp_policy=mp)
        for block in model.layers.values():
            replicate(block, mesh=dp_mesh, mp_policy=mp)
        return replicate(model, mesh=dp_mesh, mp_policy=mp)
    ddp = DDP(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        process_group=dp_mesh.get_group(),
        gradient_as_bucket_view=True,  # no second copy of the gradients in the buckets
    )
    if plan.reduce_dtype == "bf16":  # each bucket all-reduced as a bf16 copy, decompressed back into it
        ddp.register_comm_hook(dp_mesh.get_group(), bf16_compress_hook)
    return ddp


def pin_attention(model: nn.Module, plan: PlanConfig) -> None:
    """plan.attention=cudnn: every attention layer runs cuDNN's fused attention (SDPA would pick
    FlashAttention-2 on its own)."""
    if plan.attention == "cudnn":
        for block in model.layers.values():
            block.attn.sdpa_backend = SDPBackend.CUDNN_ATTENTION


def materialize(model: nn.Module, plan: PlanConfig, device: torch.device, seed: int) -> None:
    """Allocate a meta-built model (sharded or not) and initialise it; a loaded model is left alone."""
    if not any(p.is_meta for p in model.parameters()):
        return
    offload = plan.offload_optimizer or plan.offload_params  # ZeRO 1-3 only (config.validate_plan)
    model.to_empty(device="cpu" if offload else device)
    model.init_weights(seed)
    # Buffers (rotary tables) are not sharded or offloaded: they live where the compute runs.
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None:
                module._buffers[name] = buf.to(device)


def apply_plan(model: nn.Module, plan: PlanConfig, mesh: DeviceMesh, device: torch.device, seed: int) -> nn.Module:
    """The model as the plan runs it. `model` is a Transformer built on meta (initialised here,
    after sharding, so no rank ever holds the full model) or already materialised (loaded weights)."""
    check_supported(plan)
    apply_float8(model, plan)  # before tp, which takes torchao's float8 styles for float8 linears
    if plan.tp > 1:
        apply_tp(model, mesh["tp"], plan.sequence_parallel, plan.async_tp, float8=plan.fp8 == "tensorwise")
    if plan.ep > 1:
        apply_ep(model, expert_layout(mesh, plan.ep)["ep"])
    if plan.cp > 1:
        apply_cp(model, mesh["cp"].get_group())
    pin_attention(model, plan)
    apply_activation_checkpointing(model, plan)
    apply_compile(model, plan)
    dp_mesh, experts_mesh = grad_mesh(plan, mesh), expert_mesh(plan, mesh)
    if uses_fsdp(plan):
        apply_fsdp(model, plan, shard_mesh(plan, mesh), device, experts_mesh)
        materialize(model, plan, device, seed)
        return model
    materialize(model, plan, device, seed)
    return apply_ddp(model, plan, dp_mesh, device, experts_mesh)


def unwrap(model: nn.Module) -> nn.Module:
    """The Transformer inside a DDP wrapper (FSDP2 shards in place: nothing to unwrap)."""
    return model.module if isinstance(model, DDP) else model


# --- optimizer, precision, accumulation, clipping -------------------------------------------------

def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (linears, embeddings), none on norms and biases (as nanoGPT).

    A foreach/fused AdamW group cannot mix DTensors and plain tensors, which a tensor-parallel model
    without a dp wrapper has (plain norms, gpt2's positions): such a group is split in two."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = []
    for members, decay in (([p for p in params if p.dim() >= 2], weight_decay), ([p for p in params if p.dim() < 2], 0.0)):
        kinds = [[p for p in members if not isinstance(p, DTensor)], [p for p in members if isinstance(p, DTensor)]]
        groups += [{"params": part, "weight_decay": decay} for part in (kinds if all(kinds) else [members])]
    return groups


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """What this rank holds of `t`: a DTensor's local shard (sharing its storage), else `t` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def build_optimizer(model: nn.Module, job: JobConfig) -> torch.optim.Optimizer:
    """AdamW: fused on CUDA parameters, foreach elsewhere. Under FSDP2 (ZeRO 1-3) the parameters
    are this rank's shards, so it holds the AdamW states of those only (on the host with offload)."""
    o = job.optimizer
    on_cuda = next(model.parameters()).device.type == "cuda"
    kwargs = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    kwargs.update({"fused": True} if on_cuda else {"foreach": True})
    return torch.optim.AdamW(param_groups(model, o.weight_decay), **kwargs)


def build_grad_scaler(plan: PlanConfig, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 needs its loss scaled: dynamic (grows and backs off) or fixed (`plan.loss_scale`)."""
    if plan.precision != "fp16":
        return None
    init = 2.0**16 if plan.loss_scale == "dynamic" else float(plan.loss_scale)
    if uses_fsdp(plan) or plan.tp > 1 or plan.pp > 1:
        # Gradients that differ between ranks (dp shards, tp shards, pipeline stages): whether any
        # overflowed is all-reduced over every rank (the process_group's default, WORLD), so all
        # skip or take the step together and the scale stays the same everywhere.
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type, init_scale=init, process_group=dist.group.WORLD)
    return torch.amp.GradScaler(device.type, init_scale=init)


def fixed_loss_scale(plan: PlanConfig) -> float | None:
    """The scale to pin after every update when plan.loss_scale is a number (None: dynamic)."""
    if plan.precision == "fp16" and plan.loss_scale != "dynamic":
        return float(plan.loss_scale)
    return None


def autocast(plan: PlanConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """Low-precision compute for replicated models (ZeRO 0); FSDP2 casts through its MixedPrecisionPolicy."""
    if plan.precision == "fp32" or uses_fsdp(plan):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=compute_dtype(plan))


@contextlib.contextmanager
def gradient_sync(model: nn.Module, plan: PlanConfig, enabled: bool) -> Iterator[None]:
    """Whether this micro-step reduces gradients across dp (enabled: the step's last micro-step).

    DDP or `replicate` (ZeRO 0) skips the all-reduce until the last micro-step: its gradients are
    whole on every rank anyway (a pipeline schedule does the same for its stages itself). ZeRO 1
    (FSDP2) skips the reduce-scatter and the post-backward reshard until then: the units stay
    gathered and their unsharded gradients accumulate in the reduce dtype (fp32: FSDP2 upcasts
    them after the first backward; bf16: they stay 16-bit), so the step gathers and
    reduce-scatters each unit once, as Megatron's distributed optimizer does. ZeRO 2/3
    reduce-scatter every micro-step, as DeepSpeed's do, keeping only sharded fp32 gradients between micro-steps. Under hybrid sharding
    the replicas' all-reduce of the summed shards comes on the last micro-step only (ZeRO 2/3: the
    earlier ones wait in FSDP2's partial sum, a shard's size).
    """
    if isinstance(model, DDP) and not enabled:
        with model.no_sync():
            yield
    elif ReplicateModule is not None and isinstance(model, ReplicateModule):
        model.set_requires_gradient_sync(enabled)
        yield
    elif isinstance(model, FSDPModule) and plan.zero_stage == 1:
        model.set_requires_gradient_sync(enabled)
        model.set_reshard_after_backward(enabled)
        yield
    elif isinstance(model, FSDPModule):
        model.set_requires_all_reduce(enabled)  # HSDP's replicas; nothing without them
        yield
    else:
        yield


def clip_grad_norm(
    model: nn.Module, max_norm: float, pp_group: dist.ProcessGroup | None = None,
    duplicates: tuple[torch.Tensor, ...] = (),
) -> torch.Tensor:
    """The global gradient norm (over all shards and, given pp_group, all pipeline stages), clipping
    to max_norm when it is > 0. `duplicates`: parameters whose gradient another pipeline rank also
    holds and counts (a tied head's copy, autotune/engine/pipeline.py); clipped but not counted.

    Gradients can live on different meshes (tp-sharded, dp-sharded, both, or plain tensors that
    every rank holds whole), so each kind's norm is reduced over its own mesh and the squares summed.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    kinds: dict = {}  # (mesh, placements) -> (its parameters, the gradients counted in the norm)
    for p in params:
        g = p.grad
        members, counted = kinds.setdefault((g.device_mesh, g.placements) if isinstance(g, DTensor) else None, ([], []))
        members.append(p)  # clip_grads_with_norm_ takes parameters (and scales their .grad)
        if not any(p is d for d in duplicates):
            counted.append(g)
    squares = torch.zeros((), device=params[0].device if params else "cpu")
    for _, counted in kinds.values():
        if counted:  # a mesh's ranks are all on one stage: they hold the same duplicates
            norm = torch.nn.utils.get_total_norm(counted, 2.0, foreach=True)
            squares = squares + (norm.full_tensor() if isinstance(norm, DTensor) else norm).float() ** 2
    if pp_group is not None:
        dist.all_reduce(squares, group=pp_group)
    total = squares.sqrt()
    if max_norm > 0:
        for members, _ in kinds.values():  # one foreach multiply per mesh
            torch.nn.utils.clip_grads_with_norm_(members, max_norm, total, foreach=True)
    return total
