"""Why a run that ran is predicted not to fit: what this engine holds that the run's engine did not.

One difference is known and counted: under sequence parallelism the attention's and the MLP's
column-parallel linears save their all-gathered input (b·s·h elements, DTensor's linears), where
Megatron-LM saves the rank's 1/t shard and gathers it again in backward (Korthikanti et al. 2022,
Sec. 4.2.2; docs/formulas.md [Activations]). Blocks that save them: every block without
checkpointing or with only the attention core recomputed, the blocks selective checkpointing
leaves whole, none under full checkpointing (a checkpointed block keeps only its sharded input)
or op (its policy decides per op); on the first pipeline rank, for every micro-batch in flight.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from autotune.engine.config import TrainConfig
from autotune.estimate import plan_frame
from autotune.estimate.arrays import PlanArrays
from autotune.estimate.columns import GiB
from autotune.estimate.layout import stage_layouts
from autotune.estimate.memory import in_flight
from autotune.profile import sp_hidden_layout


def gathered_input_excess(train: TrainConfig) -> float:
    """Bytes the peaking rank holds beyond Megatron-LM's re-gathering sequence parallelism."""
    plan, model = train.plan, train.model
    if not (plan.sequence_parallel and plan.tp > 1):
        return 0.0
    arrays = PlanArrays.of(plan_frame([plan]), train.job)
    layers = float(stage_layouts(model, arrays)["first"].layers[0])
    whole = {"none": layers, "attention": layers, "selective": layers - np.ceil(layers / plan.checkpoint_every_k)}
    gathered, _ = sp_hidden_layout(model, "none")  # the b·s·h inputs a whole block saves unsharded
    per_block = gathered * plan.micro_batch * train.job.seq_len * model.d_model * float(arrays.compute_bytes[0])
    return per_block * (1 - 1 / plan.tp) * whole.get(str(plan.activation_checkpointing), 0) * float(in_flight(arrays)[0])


def why_unfit(train: TrainConfig, est: pd.Series, capacity_bytes: float) -> str:
    """The estimate's verdict, and for a plan that does not fit, the known excess over the run's
    engine when there is one, with whether the plan fits without it."""
    excess = gathered_input_excess(train) if not est["fits"] else 0.0
    if excess <= 0:
        return str(est["reason"])
    without = (est["mem_total_bytes"] - excess) / GiB
    return (f"{est['reason']}; of it {excess / GiB:.1f} GiB are the sequence-parallel linears' gathered inputs, "
            f"which this engine saves whole (DTensor) and Megatron-LM saves as the 1/{train.plan.tp} shard, gathering "
            f"again in backward: {without:.1f} GiB without them ("
            + ("fits" if without * GiB <= capacity_bytes else "still does not fit") + ")")
