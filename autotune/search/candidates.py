"""The candidate table: every valid plan with its estimate, and why a plan is not a candidate.

`candidate_table` enumerates the plans (autotune.plans), estimates each (autotune.estimate) and
drops what cannot fit or is dominated; `write_candidates` writes all of it to candidates.csv.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pandas as pd

from autotune.config import PlannerConfig
from autotune.engine.files import write_atomic
from autotune.estimate import estimate_frame
from autotune.hardware import Hardware, attention_kernels, fp8_modes, supported_precisions
from autotune.plans import dominated_by, enumerate_plans, plan_from_row, plan_keys, plan_label

GIB = 2**30
# Estimator internals a reader of candidates.csv does not need: `reason` repeats `why`, the rest
# are derived from (or feed) the columns kept.
NOT_IN_CANDIDATES = ("key", "objective_est", "reason", "allocated_bytes", "reserved_bytes", "step_grads_bytes", "matmul_s", "memory_bound_s",
                     "compute_matmul_s", "compute_attention_s", "compute_memory_s")


def objective_estimate(frame: pd.DataFrame, objective: str) -> pd.Series:
    """The (first) objective as estimated: tokens/s, or tokens per GPU-second for cost."""
    tps = frame["tokens_per_s"].astype(float)
    if objective == "cost":
        return tps / (frame["dp"] * frame["tp"] * frame["pp"])
    return tps


def candidate_table(pc: PlannerConfig, hw: Hardware, dominance: bool = True) -> pd.DataFrame:
    """Every plan with its estimate, `key`, `objective_est`, `dropped` and `why`. With `dominance`
    (the analytic answer, which rests on the estimate alone) a plan another beats on the estimate
    in speed and memory is dropped too; a measured search drops only what cannot fit, since an
    estimate must not veto plans no trial has tested."""
    plans = enumerate_plans(pc.train, pc.cluster, pc.search, device=hw.device, precisions=supported_precisions(hw),
                            fp8=fp8_modes(hw), attention=attention_kernels(hw))
    frame = estimate_frame(pc.model, pc.job, plans, hw)
    frame["objective_est"] = objective_estimate(frame, pc.search.objective)
    fits = frame["fits"].astype(bool)
    frame["dropped"] = np.where(fits, "", "does not fit")
    frame["why"] = np.where(fits, "", frame["reason"].astype(str))
    # over GPU memory (not host memory): only the figures that differ between plans, and the part to shrink
    over = ~fits & (frame["mem_total_bytes"] > hw.memory_bytes)
    if over.any():
        parts = memory_parts(frame)
        largest = pd.Series(np.array([c[4:-6] for c in parts])[frame.loc[over, parts].to_numpy().argmax(axis=1)],
                            index=frame.index[over])
        need = (frame.loc[over, "mem_total_bytes"] / GIB).map("{:.2f}".format)
        frame.loc[over, "why"] = need + f" GiB/GPU > {hw.memory_bytes / GIB:.2f}; largest: " + largest
    if dominance and pc.search.use_estimator and fits.any():
        by = dominated_by(frame[fits], throughput="objective_est")
        by = by[by >= 0]
        frame.loc[by.index, "dropped"] = "dominated"
        # only the part that differs from row to row (report.md says what "dominated" means)
        frame.loc[by.index, "why"] = "by plan " + by.astype(str)
    frame["key"] = plan_keys(frame)
    return frame


def memory_parts(frame: pd.DataFrame) -> list[str]:
    """The columns of the memory estimate's parts (mem_<part>_bytes), not its total."""
    return [c for c in frame.columns if c.startswith("mem_") and c.endswith("_bytes") and c != "mem_total_bytes"]


def nothing_fits_message(frame: pd.DataFrame, pc: PlannerConfig, hw: Hardware) -> str:
    in_gpu = frame[frame["mem_total_bytes"].astype(float) <= hw.memory_bytes]
    if not in_gpu.empty:  # they fit in GPU memory by offloading, but the host cannot hold what they offload
        small = in_gpu.loc[in_gpu["host_bytes"].astype(float).idxmin()]
        return (f"no plan fits on {pc.cluster.name}: the plans that fit in GPU memory "
                f"({hw.memory_bytes / GIB:.1f} GiB) offload to the host, and the one needing least, "
                f"{plan_label(plan_from_row(small))}, needs {float(small['host_bytes']) / GIB:.1f} GiB of host memory "
                f"per node, has {hw.host_memory_bytes / GIB:.1f} GiB; what would help: more GPUs than "
                f"{pc.cluster.n_gpus} (model states shard over data parallelism), or more host memory "
                "(cluster.host_memory_gb)")
    small = frame.loc[frame["mem_total_bytes"].astype(float).idxmin()]
    plan = plan_from_row(small)
    top = sorted(((c[4:-6], float(small[c])) for c in memory_parts(frame)), key=lambda kv: -kv[1])[:3]
    helps = []
    if not (plan.offload_params or plan.offload_optimizer):
        helps.append("ZeRO-3 with offload to host memory")
    helps.append(f"more GPUs than {pc.cluster.n_gpus} (model states shard over data parallelism)")
    helps.append(f"a shorter job.seq_len than {pc.job.seq_len} or a smaller global batch")
    if "bf16" not in pc.search.precisions and "bf16" in supported_precisions(hw):
        helps.append("allowing bf16 in search.precisions")
    return (
        f"no plan fits on {pc.cluster.name} ({hw.memory_bytes / GIB:.1f} GiB per device): the smallest, "
        f"{plan_label(plan)}, needs {float(small['mem_total_bytes']) / GIB:.2f} GiB "
        f"(largest parts: {', '.join(f'{k} {v / GIB:.2f} GiB' for k, v in top)}); "
        f"what would help: {'; '.join(helps)}"
    )


def significant(values: pd.Series, digits: int = 5) -> pd.Series:
    """`values` rounded to `digits` significant digits (the estimate is not more precise), so that
    they print short without a per-value float format (10^5 rows)."""
    x = values.to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = 10.0 ** (digits - 1 - np.floor(np.log10(np.abs(x))))
        out = np.where(np.isfinite(scale), np.round(x * scale) / scale, x)
    return pd.Series(out, index=values.index)


def write_candidates(path: Path, frame: pd.DataFrame) -> None:
    """Every plan, one row each, numbered by `plan_id` (what `why` = "by plan N" refers to).

    Written with the csv module from Python values (repr of the rounded floats): the same text as
    DataFrame.to_csv, in about half the time for 10^5 plans."""
    table = frame[[c for c in frame.columns if c not in NOT_IN_CANDIDATES]]
    table = table.assign(**{c: significant(table[c]) for c in table.columns if table[c].dtype.kind == "f"
                            and not c.endswith("_bytes")})
    table = table.astype({c: "int64" for c in table.columns if c.endswith("_bytes") and table[c].notna().all()})
    table.insert(0, "plan_id", frame.index)
    # missing values as empty cells, as pandas writes them (not "nan")
    columns = [table[c].astype(object).where(table[c].notna(), None) if table[c].hasnans else table[c]
               for c in table.columns]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(table.columns)
    writer.writerows(zip(*(c.tolist() for c in columns)))
    write_atomic(path, buf.getvalue())
