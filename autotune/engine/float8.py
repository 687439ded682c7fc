"""Float8 training of the blocks' linears (plan.fp8), through torchao's float8 training.

Each nn.Linear inside a block becomes torchao's Float8Linear: its input, weight and output gradient
are cast to float8 with dynamic scales (the tensor's amax, each step) and its three matmuls run in
`torch._scaled_mm` (forward in e4m3; tensorwise takes the gradients in e5m2, rowwise in e4m3 with one
scale per row and power-of-2 scales). Master weights, the optimizer, norms, attention, the head and
the loss stay as the plan's precision (bf16) has them.

Float8 all-gather: under ZeRO 1-3 (FSDP2), tensorwise casts each weight's shard to float8 before FSDP2
gathers it, so the gathered units are a byte per weight, half of bf16's (torchao's
enable_fsdp_float8_all_gather); the scales of all weights are then computed once per step, after
the optimizer (`after_optimizer_step`). Rowwise gathers bf16 (torchao casts a row-scaled weight
after the gather: its rows span the shards).

A linear whose widths are not multiples of 16 (what float8 GEMMs take) stays in bf16, as the
output head always does (torchtitan leaves it out too: its float8 error reaches the loss directly).

Under tensor parallelism the linears become float8 before tp shards them (each rank's shard of
either width must stay a multiple of 16), and a sublayer whose linears all became tensorwise float8
takes torchao's float8 tp styles (`tp_styles`): its input is cast to float8 once, before sequence
parallel's all-gather (a byte an element on the wire), and the amax of each tensorwise scale is
all-reduced over tp, so every rank casts with the scale of the whole tensor. Rowwise takes the plain
tp styles (torchao has no rowwise float8 all-gather): the input is gathered in bf16 and each rank
casts its shard, whose rows are whole rows of the weight.
"""
from __future__ import annotations

import dataclasses
import functools
import logging

import torch.nn as nn

from autotune.engine.config import ConfigError, PlanConfig

FLOAT8_ALIGNMENT = 16


def _torchao():
    """torchao.float8, imported only for a float8 plan (its import logs the CUDA extensions it
    cannot load on a CPU build, which are not the float8 training path)."""
    quiet = logging.getLogger("torchao")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import torchao.float8 as float8
    except ImportError:
        raise ConfigError("plan.fp8 needs torchao (pip install 'autotune[fp8]'), or set plan.fp8=none") from None
    finally:
        quiet.setLevel(level)
    return float8


def fp8_all_gather(plan: PlanConfig) -> bool:
    """Whether FSDP2 gathers this plan's float8 linears' weights in float8."""
    return plan.fp8 == "tensorwise" and plan.zero_stage >= 1


def linear_config(plan: PlanConfig):
    """torchao's Float8LinearConfig of the plan's recipe."""
    float8 = _torchao()
    config = float8.Float8LinearConfig.from_recipe_name(str(plan.fp8))
    if fp8_all_gather(plan):
        config = dataclasses.replace(config, enable_fsdp_float8_all_gather=True)
    return config


def converts(module: nn.Module, name: str, tp: int = 1) -> bool:
    """A linear layer of a block whose widths float8 GEMMs take, on each of tp ranks' shards."""
    align = FLOAT8_ALIGNMENT * tp
    return (isinstance(module, nn.Linear) and name.startswith("layers.")
            and module.in_features % align == 0 and module.out_features % align == 0)


def apply_float8(model: nn.Module, plan: PlanConfig) -> None:
    """Swap the blocks' linears for float8 ones in place (before tp shards and FSDP wraps them; meta or not)."""
    if plan.fp8 == "none":
        return
    _torchao().convert_to_float8_training(model, module_filter_fn=functools.partial(converts, tp=plan.tp),
                                          config=linear_config(plan))


def tp_styles(sublayer: nn.Module, gloo_gather: bool) -> tuple[type, type, type] | None:
    """torchao's (column-parallel, row-parallel, input-preparing) float8 tp styles where every linear
    of `sublayer` is a tensorwise float8 linear; None where one stays bf16 (plain styles then).
    gloo_gather: sequence parallel over gloo, which has no float8 dtype: the input is gathered and
    the output's gradient all-gathered in bf16, each cast after (on NCCL both go in float8)."""
    from torch.distributed.tensor.parallel import PrepareModuleInput, RowwiseParallel

    float8 = _torchao()
    from torchao.float8.float8_linear import Float8Linear
    from torchao.float8 import float8_tensor_parallel as styles

    linears = [m for m in sublayer.modules() if isinstance(m, nn.Linear)]
    tensorwise = float8.ScalingGranularity.TENSORWISE
    if not all(isinstance(m, Float8Linear) and m.config.cast_config_input.scaling_granularity == tensorwise
               for m in linears):
        return None
    if gloo_gather:
        return styles.Float8ColwiseParallel, RowwiseParallel, PrepareModuleInput
    return styles.Float8ColwiseParallel, styles.Float8RowwiseParallel, styles.PrepareFloat8ModuleInput


def after_optimizer_step(model: nn.Module, plan: PlanConfig) -> None:
    """With float8 all-gather: the new weights' scales, all at once (one all-reduce of their amaxes)
    rather than one per unit in the next forward."""
    if fp8_all_gather(plan):
        _torchao().precompute_float8_dynamic_scale_for_fsdp(model)
