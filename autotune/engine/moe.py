"""The mixture-of-experts MLP of the llama family (Mixtral, Qwen2-MoE), with expert parallelism.

Per MoE layer and micro-batch, on a rank's T tokens:

1. `Router`: logits = x W_r^T in fp32 over the E experts. router_softmax=before (Mixtral,
   Qwen2-MoE): probabilities over all experts, then the top k; =after: the top k logits, then a
   softmax over those k. router_norm_topk rescales the k weights to sum to 1.
2. Load balancing (Switch Transformer): aux = E * sum_e f_e P_e, f_e the fraction of the T tokens
   that chose expert e (sum_e f_e = k), P_e the mean router probability of e; HF's normalisation,
   so HF's router_aux_loss_coef means the same here. Each layer adds aux_loss_coef * aux / (MoE
   layers) to the loss the engine optimises: the mean over layers of per-layer losses, where HF
   pools all layers' f and P before the product (the same for a balanced router, and a sum of
   per-layer terms is what a pipeline stage can compute alone).
3. Capacity (capacity_factor set): an expert takes at most ceil(cf * T * k / E) of the rank's
   token slots, first choices before second choices, each in token order (GShard); the rest are
   dropped: the token keeps its residual and its other experts, with their weights unchanged.
   Unset: dropless, every slot is computed.
4. Dispatch: the slots sorted by expert (stable), the tokens gathered in that order. Under
   expert parallelism (plan.ep, `apply_ep` in autotune/engine/parallel.py) rank r of the ep group
   holds experts [r E/ep, (r+1) E/ep): the per-expert counts are exchanged first (one
   all_to_all_single of E integers), then the routed tokens (an autograd all-to-all with uneven
   splits); the received rows are regrouped by local expert, computed, put back in arrival order and
   returned by a second all-to-all. Backward runs the two in reverse. These are the all-to-alls a
   cost model counts: 2 forward and 2 backward per MoE layer and micro-batch, each moving the
   rank's routed slots (T * k rows less the dropped ones) of d_model values.
5. `GroupedExperts`: SwiGLU experts as three [E, ., .] parameters (gate and up [E, f, d], down
   [E, d, f], the per-expert nn.Linear layout of HF checkpoints), computed with torch's grouped
   matmul (`F.grouped_mm`) where it runs, else a loop over the local experts.
6. Combine: each slot's output times its router weight, summed into its token (index_add); plus
   the shared experts (one SwiGLU MLP of n_shared x shared_d_ff), behind a per-token sigmoid gate
   with shared_expert_gate (Qwen2-MoE).

Each forward leaves `last` = (loss term, tokens per expert before dropping, dropped slots): the
Transformer collects them outside any recomputation (autotune/engine/model.py) and `step_stats`
turns a step's into the logged aux loss and load imbalance.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from autotune import kernels
from autotune.engine.config import ModelConfig


class Routing(NamedTuple):
    weights: torch.Tensor  # [T, k] fp32, each token's weight for its chosen experts
    experts: torch.Tensor  # [T, k] int64, the chosen experts, best first
    probs: torch.Tensor  # [T, E] fp32, softmax over all experts (the load-balancing loss's P)


class LayerStats(NamedTuple):
    aux_loss: torch.Tensor  # this layer's term of the training loss (coefficient included)
    counts: torch.Tensor  # [E] int64, token slots routed to each expert, before any drop
    dropped: torch.Tensor  # int64 scalar, slots over an expert's capacity


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.k, self.softmax_after = cfg.experts_per_token, cfg.router_softmax == "after"
        self.norm_topk = cfg.router_norm_topk
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model))

    def forward(self, x: torch.Tensor) -> Routing:
        with torch.autocast(x.device.type, enabled=False):  # routing decisions in fp32
            logits = F.linear(x.float(), self.weight.float())
        probs = logits.softmax(dim=-1)
        if self.softmax_after:
            top, experts = logits.topk(self.k, dim=-1)
            weights = top.softmax(dim=-1)
        else:
            weights, experts = probs.topk(self.k, dim=-1)
            if self.norm_topk:
                weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(weights, experts, probs)


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """E * sum_e f_e P_e over the rows of probs [T, E] and their chosen experts [T, k]."""
    n_tokens, n_experts = probs.shape
    chosen = torch.bincount(experts.flatten(), minlength=n_experts).float() / n_tokens
    return n_experts * (chosen * probs.mean(dim=0)).sum()


def capacity(n_tokens: int, cfg: ModelConfig) -> int:
    return math.ceil(cfg.capacity_factor * n_tokens * cfg.experts_per_token / cfg.n_experts)


def within_capacity(experts: torch.Tensor, n_experts: int, limit: int) -> torch.Tensor:
    """[T, k] bool: whether each slot is among the first `limit` of its expert, slots ranked first
    choices before second choices, each in token order."""
    by_rank = experts.t().flatten()  # k-major: every token's first choice, then every second...
    order = torch.argsort(by_rank, stable=True)
    counts = torch.bincount(by_rank, minlength=n_experts)
    starts = counts.cumsum(0) - counts
    position = torch.empty_like(by_rank)
    position[order] = torch.arange(by_rank.numel(), device=by_rank.device) - starts[by_rank[order]]
    return (position < limit).view(experts.shape[1], -1).t()


def grouped_mm_runs(x: torch.Tensor) -> bool:
    """Whether torch's grouped matmul takes these inputs: any float dtype on the CPU (bf16 only under
    torch.compile, whose shape rules for it are CUDA's); bf16 on a CUDA GPU of compute capability
    9.0+ (Hopper), with rows 16-byte aligned."""
    if not hasattr(F, "grouped_mm"):
        return False
    if x.device.type == "cpu":
        return x.dtype == torch.bfloat16 or not torch.compiler.is_compiling()
    return (x.device.type == "cuda" and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device) >= (9, 0) and x.shape[-1] % 8 == 0)


class GroupedExperts(nn.Module):
    """E SwiGLU experts (this rank's E / ep under expert parallelism), applied to rows grouped by expert."""

    def __init__(self, n_experts: int, d_model: int, d_ff: int, triton: bool = False):
        super().__init__()
        self.triton = triton
        self.w_gate = nn.Parameter(torch.empty(n_experts, d_ff, d_model))
        self.w_up = nn.Parameter(torch.empty(n_experts, d_ff, d_model))
        self.w_down = nn.Parameter(torch.empty(n_experts, d_model, d_ff))
        self.grad_scale = 1.0  # 1 / ep under expert parallelism (see `local_weight`)

    def local_weight(self, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """This rank's experts of w as a plain tensor of the compute dtype.

        Under expert parallelism an expert's gradient sums what every rank of its ep group sent it,
        and the dp / ep ranks holding it then average theirs: times 1/ep, that is the mean over all
        dp ranks that every other parameter gets (ZeRO's own reduction divides by dp / ep only)."""
        local = w.to_local() if isinstance(w, DTensor) else w
        if self.grad_scale != 1.0 and local.requires_grad:
            local.register_hook(lambda g: g * self.grad_scale)
        return local.to(dtype)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [N, d] sorted by expert, counts [E_local] rows per expert -> [N, d]."""
        autocast = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        x = x.to(dtype)
        w_gate, w_up, w_down = (self.local_weight(w, dtype) for w in (self.w_gate, self.w_up, self.w_down))
        if grouped_mm_runs(x):
            offsets = counts.cumsum(0).to(torch.int32)

            def matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
                return F.grouped_mm(a, w.transpose(-2, -1), offs=offsets)
        else:
            sizes = counts.tolist()

            def matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
                return torch.cat([F.linear(rows, w[e]) for e, rows in enumerate(a.split(sizes))])
        gate, up = matmul(x, w_gate), matmul(x, w_up)
        hidden = kernels.swiglu(gate, up, impl="triton") if self.triton else F.silu(gate) * up
        return matmul(hidden, w_down)


def exchange(rows: torch.Tensor, counts: torch.Tensor, compute: Callable, group: dist.ProcessGroup) -> torch.Tensor:
    """Run `compute(rows grouped by local expert, counts per local expert)` on the ranks of `group`
    that hold the experts: rows [N, d] are sorted by global expert, counts [E] are this rank's.
    Returns the computed rows in the order of `rows`."""
    ep = dist.get_world_size(group)
    local = counts.numel() // ep
    arriving = torch.empty_like(counts)
    dist.all_to_all_single(arriving, counts, group=group)  # [source rank, local expert]
    arriving = arriving.view(ep, local)
    send, receive = counts.view(ep, local).sum(1).tolist(), arriving.sum(1).tolist()
    received = _all_to_all(rows, receive, send, group)
    # arrival order is (source rank, local expert); the experts want (local expert, source rank)
    expert_of_row = torch.arange(local, device=rows.device).repeat(ep).repeat_interleave(arriving.flatten())
    by_expert = torch.argsort(expert_of_row, stable=True)
    out = compute(received[by_expert], arriving.sum(0))
    return _all_to_all(out[torch.argsort(by_expert)], send, receive, group)


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    return all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group)


class MoE(nn.Module):
    """Router, routed experts and optional shared experts: a drop-in for a block's MLP."""

    def __init__(self, cfg: ModelConfig, shared: nn.Module | None = None, triton: bool = False):
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = GroupedExperts(cfg.n_experts, cfg.d_model, cfg.expert_d_ff, triton)
        self.shared = shared
        self.shared_gate = nn.Linear(cfg.d_model, 1, bias=False) if cfg.shared_expert_gate else None
        self.aux_weight = cfg.aux_loss_coef / len(cfg.moe_layers)
        self.ep_group: dist.ProcessGroup | None = None  # set by autotune.engine.parallel.apply_ep
        self.last: LayerStats | None = None  # of the latest forward
        self.records: list[LayerStats] = []  # this step's, kept by the Transformer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        routing = self.router(x)
        counts = torch.bincount(routing.experts.flatten(), minlength=self.cfg.n_experts)
        aux = (load_balancing_loss(routing.probs, routing.experts) * self.aux_weight if self.aux_weight
               else x.new_zeros((), dtype=torch.float32))
        keep = None
        if self.cfg.capacity_factor is not None:
            keep = within_capacity(routing.experts, self.cfg.n_experts, capacity(x.shape[0], self.cfg))
        y = self.routed(x, routing, keep)
        if self.shared is not None:
            shared = self.shared(x)
            y = y + (torch.sigmoid(self.shared_gate(x)) * shared if self.shared_gate is not None else shared)
        dropped = (~keep).sum() if keep is not None else torch.zeros((), dtype=torch.int64, device=x.device)
        self.last = LayerStats(aux, counts, dropped)
        return y.view(shape)

    def routed(self, x: torch.Tensor, routing: Routing, keep: torch.Tensor | None) -> torch.Tensor:
        """The routed experts' weighted outputs, summed per token: [T, d]."""
        k, n_experts = routing.experts.shape[1], self.cfg.n_experts
        slots = routing.experts.flatten()
        if keep is not None:
            slots = torch.where(keep.flatten(), slots, n_experts)  # dropped slots sort last
        order = torch.argsort(slots, stable=True)
        counts = torch.bincount(slots, minlength=n_experts + 1)[:n_experts]
        order = order[: int(counts.sum())]
        tokens = order // k
        rows = x[tokens]
        if self.ep_group is None:
            out = self.experts(rows, counts)
        else:
            out = exchange(rows, counts, self.experts, self.ep_group)
        out = out * routing.weights.flatten()[order].unsqueeze(-1).to(out.dtype)
        return torch.zeros_like(x).index_add(0, tokens, out.to(x.dtype))


class _AuxLossGradient(torch.autograd.Function):
    """x unchanged; in backward `aux` also gets the gradient `scale` (Megatron's aux-loss scaler)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale, ctx.aux_dtype = scale, aux.dtype
        return x.clone()  # a new tensor: FSDP2 would warn of a view (a stage's output, [b, s, d])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.full((), ctx.scale, dtype=ctx.aux_dtype, device=grad.device), None


def with_aux_loss(x: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
    """x, through which backward also reaches `aux` as a loss term of weight `scale`: a pipeline stage's
    load-balancing loss joins the backward that starts from the last stage's loss (scale: that loss's
    own multiplier, 1 / micro-batches times any loss scale)."""
    return _AuxLossGradient.apply(x, aux, scale)


# --- what a step's MoE layers did ---------------------------------------------------------------

def moe_layers(model: nn.Module) -> dict[int, MoE]:
    """The MoE modules of a Transformer (or of this rank's pipeline stages), by block index."""
    return {int(i): block.mlp for i, block in model.layers.items() if isinstance(block.mlp, MoE)}


def step_stats(model: nn.Module, device: torch.device, forwards: int, dp: int) -> dict[str, float] | None:
    """The MoE figures of the step just run, over every rank, and the records cleared (None for a
    dense model). Collective: every rank calls it. `forwards`: the micro-batches each rank ran (each
    layer's last `forwards` records count: a pipeline's first step also runs each stage once to
    learn its shapes); `dp`: the data-parallel degree (every other rank holds other layers).

    aux_loss: the load-balancing term of the loss (coefficient included), the mean over micro-batches
    and data-parallel ranks of its sum over layers. imbalance / imbalance_max: per MoE layer, the
    most tokens any expert received in the whole step (every micro-batch and rank) over the mean per
    expert; the mean and the max over layers. dropped: the fraction of token slots over capacity.
    """
    cfg = model.cfg
    if cfg.n_experts == 0:
        return None
    layers = cfg.moe_layers
    counts = torch.zeros(len(layers), cfg.n_experts + 2, dtype=torch.float64, device=device)
    for i, layer in moe_layers(model).items():
        records = layer.records[-forwards:]
        row = counts[layers.index(i)]
        for r in records:
            row[: cfg.n_experts] += r.counts.to(device)
            row[-2] += float(r.dropped)
            row[-1] += float(r.aux_loss)
        layer.records.clear()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts)
    routed, dropped, aux = counts[:, : cfg.n_experts], counts[:, -2], counts[:, -1]
    per_layer = routed.max(dim=1).values / routed.mean(dim=1)
    return {
        "aux_loss": float(aux.sum()) / (forwards * dp),
        "imbalance": float(per_layer.mean()),
        "imbalance_max": float(per_layer.max()),
        "dropped": float(dropped.sum() / routed.sum()),
    }
