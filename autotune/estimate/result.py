"""The estimate of one plan, `Estimate`, and its forms: a frame row (`Estimate.from_row`, the one
conversion from `estimate_frame`'s columns), JSON (`to_dict` / `from_dict`, which round-trip) and
the flat columns of a table (`flat`, and `flat_estimate` for a JSON dict as a trial stored it)."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

import pandas as pd

from autotune.engine.config import PlanConfig, TrainConfig
from autotune.estimate.attention import attention_efficiency
from autotune.estimate.calibration import Calibration, factors
from autotune.estimate.columns import COMPUTE, MEMORY, TIME, flat_estimate
from autotune.estimate.frame import estimate_frame
from autotune.hardware import Hardware
from autotune.plans import plans_frame
from autotune.profile import flops_per_token


@dataclass
class Estimate:
    params: int
    memory: dict[str, int]  # <part>_bytes for the parts of columns.MEMORY, and total_bytes
    time: dict[str, float]  # <part>_s for the parts of columns.TIME
    step_time_s: float
    tokens_per_s: float
    mfu: float
    fits: bool
    reason: str
    peak_stage: str = "first"  # the pipeline rank that peaks: first | last
    peak_phase: str = "backward"  # when it peaks: backward (start of a backward) | optimizer (the step)
    model_states: dict[str, int] = field(default_factory=dict)  # params, grads, master, optimizer at the step
    allocated_bytes: int = 0  # what torch.cuda.max_memory_allocated would show (no context)
    host_bytes: int = 0  # host memory per node that offload needs (params, grads, AdamW states)
    flops_per_token: float = 0.0
    compute: dict[str, float] = field(default_factory=dict)  # forward + backward + recompute by kind: matmul, attention, memory
    factors: dict[str, float] = field(default_factory=dict)  # the efficiency factors the time model used
    calibration: dict[str, dict[str, float]] = field(default_factory=dict)
    to_fit: str = ""  # for a plan that does not fit: the changes that would make it fit

    @classmethod
    def from_row(cls, row: pd.Series, train: TrainConfig, hw: Hardware, calib: Calibration | None = None) -> "Estimate":
        """The estimate of `train`'s plan from its row of estimate_frame(train.model, train.job, ..., hw, calib)."""
        from autotune.engine.model import count_params

        memory = {f"{k}_bytes": int(row[f"mem_{k}_bytes"]) for k in MEMORY}
        memory["total_bytes"] = int(row["mem_total_bytes"])
        return cls(
            params=count_params(train.model), memory=memory, time={f"{k}_s": float(row[f"time_{k}_s"]) for k in TIME},
            step_time_s=float(row["step_time_s"]), tokens_per_s=float(row["tokens_per_s"]), mfu=float(row["mfu"]),
            fits=bool(row["fits"]), reason=str(row["reason"]), peak_stage=str(row["peak_stage"]),
            peak_phase=str(row["peak_phase"]), host_bytes=int(row["host_bytes"]),
            model_states={"params_bytes": memory["params_bytes"], "grads_bytes": int(row["step_grads_bytes"]),
                          "master_bytes": memory["master_bytes"], "optimizer_bytes": memory["optimizer_bytes"]},
            allocated_bytes=int(row["allocated_bytes"]),
            flops_per_token=flops_per_token(train.model, train.job.seq_len)["total"],
            compute={f"{k}_s": float(row[f"compute_{k}_s"]) for k in COMPUTE}, factors=plan_factors(train, hw, calib),
            calibration=(calib or Calibration()).changes(hw),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (plain values; `from_dict` reads it back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Estimate":
        """An Estimate from its JSON form; keys that are not fields (the CLI's "note") are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: copy.deepcopy(v) for k, v in data.items() if k in names})

    def flat(self) -> dict[str, Any]:
        """The columns of a table: see flat_estimate."""
        return flat_estimate(self.to_dict())


def plan_frame(plans: list[PlanConfig]) -> pd.DataFrame:
    """One row per plan, one column per plan field: autotune.plans.plans_frame (plain values)."""
    return plans_frame(plans)


def estimate(train: TrainConfig, hw: Hardware, calib: Calibration | None = None) -> Estimate:
    """The estimate of one plan: `estimate_frame` on a one-row frame, so the two agree exactly."""
    row = estimate_frame(train.model, train.job, plan_frame([train.plan]), hw, calib).iloc[0]
    return Estimate.from_row(row, train, hw, calib)


def plan_factors(train: TrainConfig, hw: Hardware, calib: Calibration | None) -> dict[str, float]:
    """The efficiency factors the time model used for this plan: attention's is cuDNN's under
    plan.attention=cudnn."""
    out = factors(hw, calib)
    cudnn = train.plan.attention == "cudnn"
    return out | {"attention_efficiency": float(attention_efficiency(cudnn, out["attention_efficiency"], hw))}
