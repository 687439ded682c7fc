"""Pipeline parallelism with `torch.distributed.pipelining`.

The model is cut into pp x pp_virtual_stages stages of consecutive blocks, as balanced as the
block count allows (the first stages take the extra blocks: the last one also runs the head and
the loss). Stage 0 holds the embeddings, the last stage the final norm and the head. A stage is a
`Transformer` with the modules it does not own deleted, so its parameters keep the full model's
names: checkpoints of any pp split hold the same keys, and per-name seeded init gives every split
the same weights. Pipeline rank r runs stages r, r + pp, r + 2 pp, ... (the looped placement that
interleaved 1F1B expects); each stage is tensor-parallel, checkpointed and sharded over dp like a
whole model (autotune/engine/parallel.py).

One optimizer step is one `schedule.step` over the rank's plan.grad_accum micro-batches (GPipe:
all forwards then all backwards; 1F1B: one forward one backward in the steady state; interleaved
1F1B: the same over virtual stages, a bubble pp_virtual_stages times smaller). Each micro-batch's
loss is divided by the number of micro-batches before its backward, as the engine does without
pipelining (the schedule's own scaling of the summed gradients is off), so the gradients are those
of the mean loss and, under fp16, as large as without pipelining while they are 16-bit.

fp16: the last stage multiplies each micro-batch's loss by the current loss scale (the schedule's
loss_fn), every stage unscales its own gradients, and the scaler's found-inf all-reduce spans all
ranks (autotune/engine/parallel.py `build_grad_scaler`), so every rank skips or takes the step together and
the scale stays the same everywhere. Reported losses are unscaled.

Tied embeddings (gpt2), the Megatron way: the first stage holds the token embedding, the last
stage a head whose weight is a copy of it (drawn from the same seed: `Transformer.init_weights`),
and after backward the two copies' gradients are summed between the first and the last pipeline
rank of each (dp, tp) coordinate, so both take the same update and stay equal. Both copies are
sharded alike (vocabulary rows over tp, then dim 0 over dp), so the local shards are summed as
they are. With the looped placement stage 0 is on pipeline rank 0 and the last stage on rank
pp - 1: never the same rank when pp > 1. Checkpoints hold the copy under the embedding's name
(`LocalStages`): one `tok_emb.weight` for every layout, pp = 1 included.

Mixture-of-experts layers: the last stage's loss is the cross-entropy alone, so each stage's
output carries its layers' load-balancing loss into backward (`moe.with_aux_loss`, with the
loss's own multiplier: 1 / micro-batches times the fp16 scale), and the reported loss adds the
stages' load-balancing terms. The schedule's first step runs every stage once more, on stand-in
inputs, to learn the shapes it sends: only each layer's last grad_accum records are this step's.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from autotune.engine.config import PlanConfig
from autotune.engine.moe import moe_layers
from autotune.engine.parallel import apply_plan, reduce_dtype, unwrap
from autotune.engine.tensor_parallel import cross_entropy



def schedule_class(name: str) -> type:
    # torch.distributed.pipelining costs about a second to import: only pipeline runs pay it
    from torch.distributed import pipelining

    return {"gpipe": pipelining.ScheduleGPipe, "1f1b": pipelining.Schedule1F1B,
            "interleaved_1f1b": pipelining.ScheduleInterleaved1F1B}[name]


def stage_layers(n_layers: int, n_stages: int) -> list[range]:
    """Block indices of each stage: consecutive, sizes differing by at most one, larger first."""
    base, extra = divmod(n_layers, n_stages)
    ranges, start = [], 0
    for s in range(n_stages):
        size = base + (s < extra)
        ranges.append(range(start, start + size))
        start += size
    return ranges


def local_stage_ids(plan: PlanConfig, pp_rank: int) -> list[int]:
    """The stages pipeline rank `pp_rank` runs (looped placement)."""
    return [pp_rank + k * plan.pp for k in range(plan.pp_virtual_stages)]


def split_stage(model: nn.Module, stage_id: int, n_stages: int) -> nn.Module:
    """A copy of `model` (a Transformer, best still on meta) holding only stage `stage_id`'s modules."""
    stage = copy.deepcopy(model)
    owned = {str(i) for i in stage_layers(len(model.layers), n_stages)[stage_id]}
    for name in [n for n in stage.layers if n not in owned]:
        del stage.layers[name]
    if stage_id == n_stages - 1 and stage_id > 0 and model.cfg.tie_embeddings:
        # the last stage's own copy of the tied weight (still on meta, or loaded: the same values)
        stage.lm_head = nn.Linear(model.cfg.d_model, model.cfg.vocab_size, bias=False, device="meta")
        stage.lm_head.weight = stage.tok_emb.weight
    if stage_id > 0:
        stage.tok_emb = None
        stage.pos_emb = None
    if stage_id < n_stages - 1:
        stage.norm = None
        stage.lm_head = None
    return stage


def build_stages(
    model: nn.Module, plan: PlanConfig, pp_mesh: DeviceMesh
) -> list[tuple[int, nn.Module]]:
    """(stage id, module) for each stage this rank runs, cut from a meta-built Transformer."""
    n_stages = plan.pp * plan.pp_virtual_stages
    return [(s, split_stage(model, s, n_stages)) for s in local_stage_ids(plan, pp_mesh.get_local_rank())]


class LocalStages(nn.Module):
    """This rank's stages seen as one module whose parameters carry the full model's names, for the
    optimizer, gradient clipping and checkpoints (DCP merges the stages' partial state dicts). It
    shares the stages' modules and is never called: the schedule runs the stages.

    A tied head's copy on the last stage is held as `tok_emb`: its weight is named tok_emb.weight,
    the one name the tied weight has in every layout, so checkpoints (and the optimizer states in
    them) load into any pp degree; the two equal copies are written once (DCP deduplicates)."""

    def __init__(self, stages: list[nn.Module]):
        super().__init__()
        self.cfg = stages[0].cfg
        self.layers = nn.ModuleDict()
        for stage in stages:
            for name in ("tok_emb", "pos_emb", "norm", "lm_head"):
                if getattr(stage, name) is not None:
                    held_as = "tok_emb" if name == "lm_head" and self.cfg.tie_embeddings else name
                    setattr(self, held_as, getattr(stage, name))
            self.layers.update(stage.layers)


class Pipeline:
    """This rank's stages and the schedule that runs one optimizer step's micro-batches through them."""

    def __init__(
        self, stages: list[tuple[int, nn.Module]], plan: PlanConfig, mesh: DeviceMesh, device: torch.device
    ):
        n_stages = plan.pp * plan.pp_virtual_stages
        group = mesh["pp"].get_group()
        self.stage_modules = [unwrap(module) for _, module in stages]
        self.model = LocalStages(self.stage_modules)
        from torch.distributed.pipelining import PipelineStage  # see schedule_class

        self.stages = [PipelineStage(module, s, n_stages, device, group=group) for s, module in stages]
        self.has_first = any(s == 0 for s, _ in stages)
        self.has_last = any(s == n_stages - 1 for s, _ in stages)
        self.group = group
        self.device = device
        # the tied weight's copy on this rank (the embedding, or the last stage's head) and the group
        # of the first and last pipeline ranks that sum its gradients
        tied = self.model.cfg.tie_embeddings
        self.tied_group = tied_weight_group(mesh) if tied else None
        self.tied_weight = self.model.tok_emb.weight if tied and (self.has_first or self.has_last) else None
        self.tied_dtype = reduce_dtype(plan)  # a gradient reduction like dp's: in the plan's reduce dtype
        # the head's copy duplicates the embedding's summed gradient: the global norm counts it once
        self.duplicate_grads = (self.tied_weight,) if self.tied_weight is not None and self.has_last else ()
        self.loss_scale: torch.Tensor | None = None
        cls = schedule_class(plan.pp_schedule)
        stage_arg = self.stages if plan.pp_schedule == "interleaved_1f1b" else self.stages[0]
        self.n_microbatches = plan.grad_accum
        self.schedule = cls(stage_arg, n_microbatches=plan.grad_accum, loss_fn=self._loss, scale_grads=False)

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """A micro-batch's share of the mean loss on the last stage, as backward starts from it
        (times the loss scale under fp16)."""
        loss = cross_entropy(logits, targets) / self.n_microbatches
        return loss if self.loss_scale is None else loss * self.loss_scale

    def step(
        self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], loss_scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Forward and backward of one step's micro-batches (run inside loss_context), the loss
        multiplied by `loss_scale` (fp16) before backward; returns their mean unscaled loss on every
        pipeline rank."""
        inputs = torch.cat([x for x, _ in micro_batches]).to(self.device)
        targets = torch.cat([y for _, y in micro_batches]).to(self.device)
        losses: list[torch.Tensor] = []
        self.loss_scale = loss_scale
        for module in self.stage_modules:
            module.aux_grad_scale = (1.0 if loss_scale is None else float(loss_scale)) / self.n_microbatches
        if self.has_first:  # with pp > 1 the first and the last stage are on different ranks
            self.schedule.step(inputs, return_outputs=False)
        elif self.has_last:
            self.schedule.step(target=targets, losses=losses, return_outputs=False)
        else:
            self.schedule.step(return_outputs=False)
        if self.tied_weight is not None:
            self._sum_tied_grads()
        loss = torch.stack(losses).sum().detach() if losses else torch.zeros((), device=self.device)
        if losses and loss_scale is not None:
            loss = loss / loss_scale
        loss = loss + self._aux_loss()
        dist.all_reduce(loss, group=self.group)  # only the last stage holds the cross-entropy
        return loss

    def _aux_loss(self) -> torch.Tensor:
        """This rank's MoE layers' load-balancing terms of the step's mean loss."""
        terms = [r.aux_loss for layer in moe_layers(self.model).values() for r in layer.records[-self.n_microbatches:]]
        return sum(terms, torch.zeros((), device=self.device)) / self.n_microbatches

    @torch.no_grad()
    def _sum_tied_grads(self) -> None:
        """Embedding gradient + head gradient on both copies, summed shard by shard (the copies are
        sharded alike; tp's embedding backward leaves its gradient replicated: this rank's rows), in
        the plan's reduce dtype."""
        weight = self.tied_weight
        if isinstance(weight.grad, DTensor) and weight.grad.placements != weight.placements:
            weight.grad = weight.grad.redistribute(weight.device_mesh, weight.placements)
        grad = weight.grad
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        on_device = local.to(self.device, self.tied_dtype)  # offloaded (host) gradients travel through the device
        dist.all_reduce(on_device, group=self.tied_group)
        if on_device is not local:
            local.copy_(on_device)


def tied_weight_group(mesh: DeviceMesh) -> dist.ProcessGroup | None:
    """The group of the first and the last pipeline rank of this rank's (dp, tp) coordinate (None on
    a middle rank). Collective: every rank creates every pair's group."""
    ranks = mesh.mesh  # global ranks, [pp, dp, tp]
    pairs = [[int(ranks[0, d, t]), int(ranks[-1, d, t])] for d in range(ranks.shape[1]) for t in range(ranks.shape[2])]
    mine, _ = dist.new_subgroups_by_enumeration(pairs)
    return mine


def build_pipeline(
    model: nn.Module, plan: PlanConfig, mesh: DeviceMesh, device: torch.device, seed: int
) -> Pipeline:
    """Cut a Transformer (built on meta, or loaded) into this rank's stages, apply the plan to each
    (tensor parallel, checkpointing, ZeRO over dp; materialised after sharding) and schedule them."""
    stages = [(s, apply_plan(module, plan, mesh, device, seed)) for s, module in build_stages(model, plan, mesh["pp"])]
    return Pipeline(stages, plan, mesh, device)
