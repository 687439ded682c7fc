"""The model profile in one JSON-able dict: parameters per module (all, and active per token),
FLOPs per token, and the measured activation and traffic models at one micro-batch and sequence
length (profile.json); a MoE model's measured MoE-block tables too."""
from __future__ import annotations

import dataclasses

from autotune.engine.config import ModelConfig
from autotune.engine.model import param_counts
from autotune.profile.activations import activation_coefficients
from autotune.profile.features import BLOCK_FEATURES, OUTSIDE_FEATURES, block_features, outside_features
from autotune.profile.flops import flops_per_token
from autotune.profile.moe import moe_activation_coefficients, moe_traffic_coefficients
from autotune.profile.traffic import predict_traffic, traffic_coefficients


def model_profile(model: ModelConfig, seq_len: int | None = None, micro_batch: int = 1) -> dict:
    """Parameters per module, FLOPs per token at `seq_len`, and the measured activation model."""
    s = seq_len or model.max_seq_len
    coefs = activation_coefficients(model)
    per_choice = {}
    for key, fit in coefs.items():
        fb, fo = block_features(model, micro_batch, s), outside_features(model, micro_batch, s)
        per_choice[key] = {
            "block_bytes": sum(fit["block"][k] * fb[k] for k in BLOCK_FEATURES),
            "outside_bytes": sum(fit["outside"][k] * fo[k] for k in OUTSIDE_FEATURES),
        }
    traffic = {key: {k: v for k, v in predict_traffic(model, micro_batch, s, *key.split("/")).items()}
               for key in traffic_coefficients(model)}
    out = {
        "model": dataclasses.asdict(model),
        "params": param_counts(model),
        "active_params": param_counts(model, active=True),
        "traffic": {
            "formula": "bytes moved by memory-bound ops (not matmuls, not SDPA), per block and outside, forward and "
                       "backward: the activation fit's features; ops: ops dispatched (host overhead)",
            "coefficients": traffic_coefficients(model),
            "at": {"micro_batch": micro_batch, "seq_len": s, "bytes": traffic},
        },
        "flops_per_token": flops_per_token(model, s) | {"seq_len": s, "convention": "6N + 12·L·a·d·s, N = active matmul weights"},
        "activations": {
            "formula": "block = b·s·(tok + h·h + f·f + kv·g·d + a·a) + P·P_block; outside = b·s·(tok + h·h + V·V) + s·s + P·P_head",
            "coefficients": coefs,
            "at": {"micro_batch": micro_batch, "seq_len": s, "bytes": per_choice},
            "kernels_triton": "measured with the Triton kernels' launches skipped (what they save does not depend on their arithmetic)",
        },
    }
    if model.n_experts:  # a MoE block's two measured parts (autotune.profile.moe)
        out["moe"] = {
            "formula": "MoE block without its routed experts = b·s·(tok + h·h + q·q + kv·g·d + a·a + e·E + slot·k + rh·k·h "
                       "+ sf·n_shared·f_s) + P·P; experts = slot·S + rh·S·h + rf·S·f_e + Pe·P_experts, S the slots "
                       "that reach the rank",
            "activations": moe_activation_coefficients(model), "traffic": moe_traffic_coefficients(model),
        }
    return out
