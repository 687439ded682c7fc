"""The model profile: exact parameters, FLOPs per token, and activation bytes and memory traffic
measured on the engine (sections of docs/formulas.md in brackets).

- flops: the weights that do matmul work and the training FLOPs per token [FLOPs and MFU];
- features: the widths the measured tables are linear in, and what a tensor-parallel rank holds;
- activations: the bytes every block saves for backward, measured on the engine's own model
  (`torch.autograd.graph.saved_tensors_hooks` on small real forwards) and fitted as per-element
  coefficients of the model's widths [Activations];
- traffic: the bytes the memory-bound ops move, counted with a TorchDispatchMode on the same
  forwards and backwards and fitted on the same features (the step time's memory-bound part);
- moe: the same two tables for a mixture-of-experts block, in two parts (the block without its
  routed experts; the experts, whose work follows the token slots that reach them);
- fits: the small models the tables are fitted on and the coefficient cache ($AUTOTUNE_CACHE,
  else ~/.cache/autotune; one file per engine version);
- summary and cli: profile.json and `autotune profile`.

The fit is made on a few shrunk models of the same family and attention kind (grouped-query or
not) with different widths, so the coefficients are bytes per element and scale to any width: a
llama-3-70b block is predicted from tiny llama blocks, and the tests hold predictions to fresh
measurements at shapes larger than the fit. SDPA keeps no s x s matrix (flash/efficient/CPU-flash
kernels save out + logsumexp), so there is no s² term. One fit per (family, gqa) group is cached in
memory and on disk.
"""
from autotune.profile.activations import (
    COMPILED_SAVING, MEASURED_CHECKPOINTING, activation_coefficients, activation_fit, activation_key, compiled_saving,
    cuda_norm_saving, measure_compiled_saving, measure_saved_bytes, predict_saved_bytes,
)
from autotune.profile.cli import cli
from autotune.profile.features import (
    BLOCK_FEATURES, EXPERT_FEATURES, MOE_FEATURES, OUTSIDE_FEATURES, TP_SPLIT_FEATURES, TRAFFIC_BLOCK_FEATURES,
    TRAFFIC_MOE_FEATURES, block_features, block_matmuls, checkpoint_variant, expert_features, kept_matmuls,
    moe_features, outside_features, sp_hidden_layout, tp_block_bytes, tp_outside_bytes,
)
from autotune.profile.fits import FIT_BATCHES, cache_dir, fit_shapes
from autotune.profile.flops import expert_matmul_params, flops_per_token, matmul_params
from autotune.profile.measure import CASTS, DTYPE, temporary_env
from autotune.profile.moe import (
    moe_activation_coefficients, moe_traffic_coefficients, predict_moe_saved_bytes, predict_moe_traffic,
)
from autotune.profile.summary import model_profile
from autotune.profile.traffic import (
    TrafficCounter, measure_traffic, predict_traffic, traffic_coefficients, traffic_fit, traffic_key,
)

__all__ = [
    "BLOCK_FEATURES", "CASTS", "DTYPE", "EXPERT_FEATURES", "FIT_BATCHES", "MEASURED_CHECKPOINTING", "MOE_FEATURES",
    "OUTSIDE_FEATURES", "TP_SPLIT_FEATURES", "TRAFFIC_BLOCK_FEATURES", "TRAFFIC_MOE_FEATURES", "TrafficCounter",
    "activation_coefficients", "activation_fit", "activation_key", "block_features", "block_matmuls", "cache_dir",
    "checkpoint_variant", "cli", "kept_matmuls", "sp_hidden_layout",
    "expert_features", "expert_matmul_params", "fit_shapes", "flops_per_token", "matmul_params", "measure_saved_bytes",
    "measure_traffic", "model_profile", "moe_activation_coefficients", "moe_features", "moe_traffic_coefficients",
    "outside_features", "predict_moe_saved_bytes", "predict_moe_traffic", "predict_saved_bytes", "predict_traffic",
    "temporary_env", "tp_block_bytes", "tp_outside_bytes", "traffic_coefficients", "traffic_fit", "traffic_key",
]
