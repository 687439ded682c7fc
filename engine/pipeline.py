"""Pipeline parallelism with `torch.distributed.pipelining`.

The model is cut into pp x pp_virtual_stages stages of consecutive blocks, as balanced as the
block count allows (the first stages take the extra blocks: the last one also runs the head and
the loss). Stage 0 holds the embeddings, the last stage the final norm and the head. A stage is a
`Transformer` with the modules it does not own deleted, so its parameters keep the full model's
names: checkpoints of any pp split hold the same keys, and per-name seeded init gives every split
the same weights. Pipeline rank r runs stages r, r + pp, r + 2 pp, ... (the looped placement that
interleaved 1F1B expects); each stage is tensor-parallel, checkpointed and sharded over dp like a
whole model (engine/parallel.py).

One optimizer step is one `schedule.step` over the rank's plan.grad_accum micro-batches (GPipe:
all forwards then all backwards; 1F1B: one forward one backward in the steady state; interleaved
1F1B: the same over virtual stages, a bubble pp_virtual_stages times smaller). The schedule scales
gradients by 1/micro-batches, so they equal those of the mean loss, as without pipelining.

Tied embeddings (gpt2) would need the head on the last stage to share the first stage's
embedding across ranks; that is not implemented, and engine/config.py refuses pp > 1 for them.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from engine.config import PlanConfig
from engine.parallel import apply_plan, unwrap
from engine.tensor_parallel import cross_entropy

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}


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
    shares the stages' modules and is never called: the schedule runs the stages."""

    def __init__(self, stages: list[nn.Module]):
        super().__init__()
        self.cfg = stages[0].cfg
        self.layers = nn.ModuleDict()
        for stage in stages:
            for name in ("tok_emb", "pos_emb", "norm", "lm_head"):
                if getattr(stage, name) is not None:
                    setattr(self, name, getattr(stage, name))
            self.layers.update(stage.layers)


class Pipeline:
    """This rank's stages and the schedule that runs one optimizer step's micro-batches through them."""

    def __init__(
        self, stages: list[tuple[int, nn.Module]], plan: PlanConfig, pp_mesh: DeviceMesh, device: torch.device
    ):
        n_stages = plan.pp * plan.pp_virtual_stages
        group = pp_mesh.get_group()
        self.model = LocalStages([unwrap(module) for _, module in stages])
        self.stages = [PipelineStage(module, s, n_stages, device, group=group) for s, module in stages]
        self.has_first = any(s == 0 for s, _ in stages)
        self.has_last = any(s == n_stages - 1 for s, _ in stages)
        self.group = group
        self.device = device
        cls = SCHEDULES[plan.pp_schedule]
        stage_arg = self.stages if plan.pp_schedule == "interleaved_1f1b" else self.stages[0]
        self.schedule = cls(stage_arg, n_microbatches=plan.grad_accum, loss_fn=cross_entropy)

    def step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Forward and backward of one step's micro-batches (run inside loss_context); returns their
        mean loss on every pipeline rank."""
        inputs = torch.cat([x for x, _ in micro_batches]).to(self.device)
        targets = torch.cat([y for _, y in micro_batches]).to(self.device)
        losses: list[torch.Tensor] = []
        if self.has_first:  # with pp > 1 the first and the last stage are on different ranks
            self.schedule.step(inputs, return_outputs=False)
        elif self.has_last:
            self.schedule.step(target=targets, losses=losses, return_outputs=False)
        else:
            self.schedule.step(return_outputs=False)
        loss = torch.stack(losses).mean().detach() if losses else torch.zeros((), device=self.device)
        dist.all_reduce(loss, group=self.group)  # only the last stage holds it
        return loss


def build_pipeline(
    model: nn.Module, plan: PlanConfig, mesh: DeviceMesh, device: torch.device, seed: int
) -> Pipeline:
    """Cut a Transformer (built on meta, or loaded) into this rank's stages, apply the plan to each
    (tensor parallel, checkpointing, ZeRO over dp; materialised after sharding) and schedule them."""
    stages = [(s, apply_plan(module, plan, mesh, device, seed)) for s, module in build_stages(model, plan, mesh["pp"])]
    return Pipeline(stages, plan, mesh["pp"], device)
