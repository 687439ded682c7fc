"""The widths the activation and traffic fits are linear in, and what a tensor-parallel rank holds.

    block bytes   = b·s·(c_tok + c_h·h + c_f·f + c_q·q + c_kv·g·d + c_a·a) + c_P·P_block
    outside bytes = b·s·(c_tok + c_h·h + c_V·V) + c_s·s + c_P·P_outside

(b micro-batch, s sequence, h hidden, f MLP, q query width, g·d kv width, a heads, V vocab; P the
parameters, s the learned-position indices of gpt2; [Activations] in docs/formulas.md.)

A mixture-of-experts block has its own two parts (autotune/engine/moe.py), fitted apart:

    MoE block bytes = b·s·(c_tok + c_h·h + c_q·q + c_kv·g·d + c_a·a + c_e·E + c_slot·k + c_rh·k·h
                           + c_sf·n_shared·f_s) + c_P·P_block            (router, shared experts, combine)
    experts bytes   = c_slot·slots + c_rh·slots·h + c_rf·slots·f_e + c_Pe·P_experts   (the routed experts)

with slots the routed token slots: b·s·k on the rank that routes them; on the rank whose experts
compute them, what arrives there (expert parallelism, load imbalance, capacity).
"""
from __future__ import annotations

import numpy as np

from autotune.engine.config import ModelConfig
from autotune.engine.model import param_counts

# per token: hidden (h), MLP (f), query-width (q: heads x head_dim, d_model unless the heads are
# narrower, as on a tensor-parallel rank's share) and kv widths, heads (a); per block: parameters (P)
BLOCK_FEATURES = ("tok", "h", "f", "q", "kv", "a", "P")
TRAFFIC_BLOCK_FEATURES = (*BLOCK_FEATURES, "sd")
# what a tensor-parallel rank's block holds 1/tp of: n_heads/tp heads, d_ff/tp MLP units
# (autotune/engine/tensor_parallel.py); hidden-width tensors stay whole
TP_SPLIT_FEATURES = ("f", "q", "kv", "a")
OUTSIDE_FEATURES = ("tok", "h", "V", "P", "s")
# a MoE block without its routed experts: attention, router (e: b·s·E), combine of the routed slots
# (slot: b·s·k, rh: b·s·k·h), shared experts (sf: b·s·n_shared·f_s); P its parameters
MOE_FEATURES = ("tok", "h", "q", "kv", "a", "e", "slot", "rh", "sf", "P")
TRAFFIC_MOE_FEATURES = (*MOE_FEATURES, "sd")
# the routed experts of one MoE layer, on the rank that computes them: the slots that arrive there,
# d_model (rh) and expert (rf) wide, and the experts it holds (Pe: their parameters)
EXPERT_FEATURES = ("slot", "rh", "rf", "Pe")


def _dense_block_params(model: ModelConfig) -> int:
    """The parameters of one block with a dense MLP."""
    pc = param_counts(model)
    final_norm = pc["norms"] // (2 * model.n_layers + 1)
    mlp = (3 if model.family == "llama" else 2) * model.d_model * model.d_ff + (
        0 if model.family == "llama" else model.d_ff + model.d_model)
    return (pc["attention"] + pc["norms"] - final_norm) // model.n_layers + mlp


def block_features(model: ModelConfig, b, s, tp=1) -> dict:
    """The features of BLOCK_FEATURES for micro-batch b and sequence s (numbers or numpy arrays),
    of one block as a rank of `tp` tensor-parallel ranks holds it (P stays the whole block's). A MoE
    model's dense blocks (moe_features: its MoE blocks)."""
    bs = b * s
    block_params = _dense_block_params(model)
    features = {
        "tok": bs, "h": bs * model.d_model, "f": bs * model.d_ff, "q": bs * model.n_heads * model.head_dim,
        "kv": bs * model.kv_heads * model.head_dim,
        "a": bs * model.n_heads, "P": block_params + 0 * bs,
        "sd": s * model.head_dim + 0 * bs,  # rotary tables, read once per block whatever the batch (traffic only)
    }
    return {k: v / tp if k in TP_SPLIT_FEATURES else v for k, v in features.items()}


def outside_features(model: ModelConfig, b, s) -> dict:
    bs = b * s
    head = model.vocab_size * model.d_model
    # s: learned-position indices (gpt2), one row shared by the micro-batch
    return {"tok": bs, "h": bs * model.d_model, "V": bs * model.vocab_size, "P": head + 0 * bs, "s": s + 0 * b}


def block_matmuls(model: ModelConfig) -> list[tuple[str, int]]:
    """A dense block's matmuls in the order it runs them, with their FLOPs per token over 2 (in x out)."""
    h, q, kv, f = model.d_model, model.n_heads * model.head_dim, model.kv_heads * model.head_dim, model.d_ff
    mlp = [("w_gate", h * f)] if model.family == "llama" else []
    return [("wq", h * q), ("wk", h * kv), ("wv", h * kv), ("wo", q * h), *mlp, ("w_up", h * f), ("w_down", f * h)]


def kept_matmuls(model: ModelConfig, every_k: int) -> list[str]:
    """The matmuls whose outputs plan.activation_checkpointing=op keeps (engine.parallel.op_policy)."""
    return [name for i, (name, _) in enumerate(block_matmuls(model)) if i % every_k == 0]


def checkpoint_variant(checkpointing: str, every_k: int) -> str:
    """What one checkpointed block of a plan saves, as fitted (autotune.profile.MEASURED_CHECKPOINTING):
    full (full, selective), op1, op2 or attention."""
    if checkpointing == "op":
        return f"op{every_k}"
    return "attention" if checkpointing == "attention" else "full"


def sp_hidden_layout(model: ModelConfig, variant: str) -> tuple[int, int]:
    """Under sequence parallel, a block's b·s·h tensors that a rank keeps whole rather than 1/tp, and
    the reduce-scatter outputs (1/tp each) it keeps beyond what the tp=1 fit saw. Without
    checkpointing (and with only the attention core recomputed) the attention's and the MLP's
    all-gathered inputs, which their linears save; a checkpointed block keeps only its input; op
    keeps wo's and w_down's partial sums if their outputs are kept, and both reduce-scatters."""
    if variant in ("none", "attention"):
        return 2, 0
    if variant == "full":
        return 0, 0
    kept = kept_matmuls(model, int(variant.removeprefix("op")))
    return sum(name in kept for name in ("wo", "w_down")), 2


def tp_block_bytes(plain, hidden, b, s, h: int, beta, tp, sp, layout: tuple[int, int] = (2, 0)):
    """Bytes one block saves on a tensor-parallel rank (numbers or numpy arrays).

    `plain` is the fit at the rank's features (block_features(..., tp)): exactly what the engine's
    block saves under tp. Sequence parallelism shards the hidden-width part over the sequence
    (`hidden`: the fit's tok and h terms), except `layout` (sp_hidden_layout: the b·s·h tensors of
    `beta` bytes kept whole, the reduce-scatter outputs kept). Measured on the engine:
    tests/tp_pp_worker.py. (Korthikanti et al.'s 1/tp for sequence parallel assumes Megatron's
    re-gather in backward.)"""
    whole, scattered = layout
    shard = np.where(sp, 1 - 1 / tp, 0.0)
    return plain - shard * (hidden - whole * b * s * h * beta) + np.where(sp, scattered * b * s * h * beta / tp, 0.0)


def tp_outside_bytes(per_token, hidden, b, s, h: int, beta, tp, sp):
    """The per-token part of what the final norm, head and loss save on a tensor-parallel rank
    (`per_token`: the outside fit without its V and P terms, which tp divides). Under sequence
    parallel the final norm's hidden-width tensors (`hidden`: the fit's h term) are sharded but
    the head's all-gathered input, b·s·h elements of `beta` bytes, is saved whole."""
    return per_token - np.where(sp, 1 - 1 / tp, 0.0) * (hidden - b * s * h * beta)


def moe_features(model: ModelConfig, b, s, sent=1.0) -> dict:
    """The features of TRAFFIC_MOE_FEATURES of one MoE block without its routed experts, for
    micro-batch b and sequence s; `sent`: the share of the b·s·k slots the block routes (under a
    capacity factor below 1, fewer)."""
    bs = b * s
    pc = param_counts(model)
    final_norm = pc["norms"] // (2 * model.n_layers + 1)
    moe_mlp = (pc["mlp"] - (model.n_layers - len(model.moe_layers)) * 3 * model.d_model * model.d_ff) // len(model.moe_layers)
    experts = model.n_experts * 3 * model.d_model * model.expert_d_ff
    slots = bs * model.experts_per_token * sent
    return {
        "tok": bs, "h": bs * model.d_model, "q": bs * model.n_heads * model.head_dim,
        "kv": bs * model.kv_heads * model.head_dim, "a": bs * model.n_heads, "e": bs * model.n_experts,
        "slot": slots, "rh": slots * model.d_model, "sf": bs * model.n_shared_experts * model.shared_expert_d_ff,
        "P": (pc["attention"] + pc["norms"] - final_norm) / model.n_layers + moe_mlp - experts + 0 * slots,
        "sd": s * model.head_dim + 0 * slots,
    }


def expert_features(model: ModelConfig, b, s, arrived=1.0, ep=1) -> dict:
    """The features of EXPERT_FEATURES of one MoE layer's routed experts on a rank holding
    n_experts/ep of them, to which `arrived` x b·s·k slots are routed."""
    slots = b * s * model.experts_per_token * arrived
    return {"slot": slots, "rh": slots * model.d_model, "rf": slots * model.expert_d_ff,
            "Pe": model.n_experts // ep * 3 * model.d_model * model.expert_d_ff + 0 * slots}
