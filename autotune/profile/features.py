"""The widths the activation and traffic fits are linear in, and what a tensor-parallel rank holds.

    block bytes   = b·s·(c_tok + c_h·h + c_f·f + c_q·q + c_kv·g·d + c_a·a) + c_P·P_block
    outside bytes = b·s·(c_tok + c_h·h + c_V·V) + c_s·s + c_P·P_outside

(b micro-batch, s sequence, h hidden, f MLP, q query width, g·d kv width, a heads, V vocab; P the
parameters, s the learned-position indices of gpt2; [Activations] in docs/formulas.md.)
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


def block_features(model: ModelConfig, b, s, tp=1) -> dict:
    """The features of BLOCK_FEATURES for micro-batch b and sequence s (numbers or numpy arrays),
    of one block as a rank of `tp` tensor-parallel ranks holds it (P stays the whole block's)."""
    bs = b * s
    pc = param_counts(model)
    final_norm = pc["norms"] // (2 * model.n_layers + 1)
    block_params = (pc["attention"] + pc["mlp"] + pc["norms"] - final_norm) / model.n_layers
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


def tp_block_bytes(plain, hidden, b, s, h: int, beta, tp, sp, checkpointed: bool = False):
    """Bytes one block saves on a tensor-parallel rank (numbers or numpy arrays).

    `plain` is the fit at the rank's features (block_features(..., tp)): exactly what the engine's
    block saves under tp. Sequence parallelism shards the hidden-width part over the sequence
    (`hidden`: the fit's tok and h terms), except the attention's and the MLP's all-gathered
    inputs, which their linears save whole: 2·b·s·h elements of `beta` bytes (none in a checkpointed
    block, which keeps only its input). Measured on the engine: tests/tp_pp_worker.py.
    (Korthikanti et al.'s 1/tp for sequence parallel assumes Megatron's re-gather in backward.)"""
    shard = np.where(sp, 1 - 1 / tp, 0.0)
    return plain - shard * (hidden - (0 if checkpointed else 2 * b * s * h * beta))


def tp_outside_bytes(per_token, hidden, b, s, h: int, beta, tp, sp):
    """The per-token part of what the final norm, head and loss save on a tensor-parallel rank
    (`per_token`: the outside fit without its V and P terms, which tp divides). Under sequence
    parallel the final norm's hidden-width tensors (`hidden`: the fit's h term) are sharded but
    the head's all-gathered input, b·s·h elements of `beta` bytes, is saved whole."""
    return per_token - np.where(sp, 1 - 1 / tp, 0.0) * (hidden - b * s * h * beta)
