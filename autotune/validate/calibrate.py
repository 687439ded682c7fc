"""`autotune calibrate RUNS.jsonl --out calib.json`: the hardware factors fitted to measured runs,
and how well they transfer (leave-one-source-out).

Each run's predicted step time is split into the parts each efficiency scales: dense matmuls,
SDPA, memory-bound work (with the optimizer and FSDP2's copy-out), and exposed communication (the
pipeline bubble goes with the compute it idles). The fit is one time multiplier per part, pooled
over all runs, and, for a GPU with MIN_GPU_ROWS runs or more, one per part for that GPU around the
pooled ones: least squares on the log of predicted over measured step time, each multiplier held
towards its centre by a log-normal prior (a part the runs cannot tell apart stays put). The loss is
Cauchy's, not the square: a run that is far off for a reason the hardware factors do not hold (its
engine hides what ours exposes, or ours needs a plan the run did not) counts about as the log of its
error, so a few such runs do not drag the factors every other run shares. The
calibration stores their inverses as efficiency scales (`Calibration.scales`, `gpu_scales`);
`estimate.calibration=calib.json` applies them in every command. Nothing is set per run or per
source: leave-one-source-out fits on every source but one and predicts that one.
"""
from __future__ import annotations

import argparse
import shlex

import numpy as np
import pandas as pd
from scipy.optimize import least_squares

from autotune.engine.config import ConfigError
from autotune.estimate import Calibration, factors
from autotune.validate.cli import read_or_fail
from autotune.validate.predict import Validation, validate_runs
from autotune.validate.report import by_source, source_name

PARTS = ("matmul_efficiency", "attention_efficiency", "memory_efficiency", "collective_efficiency")
ROW_SD = 0.10  # the log error one run's step time is allowed; Cauchy's loss flattens beyond it
PRIOR_SD = 0.25  # a pooled multiplier's log-normal prior around 1 (a factor moves ~25% unless the runs insist)
GPU_PRIOR_SD = 0.25  # a GPU's multiplier around the pooled one
MIN_GPU_ROWS = 3


def time_parts(est: pd.Series) -> np.ndarray:
    """[matmul, attention, memory-bound, communication, the rest] of one estimate's step time."""
    compute = est["time_forward_s"] + est["time_backward_s"] + est["time_recompute_s"]
    bubble = est["time_pp_bubble_s"] / compute if compute > 0 else 0.0
    parts = np.array([est["compute_matmul_s"] * (1 + bubble), est["compute_attention_s"] * (1 + bubble),
                      est["memory_bound_s"] + est["compute_memory_s"] * bubble,
                      est["time_dp_comm_s"] + est["time_tp_comm_s"] + est["time_cp_comm_s"] + est["time_pp_comm_s"]])
    return np.append(parts, max(est["step_time_s"] - parts.sum(), 0.0))


def fit_multipliers(parts: np.ndarray, measured_s: np.ndarray, centre: np.ndarray, prior_sd: float,
                    floor: np.ndarray) -> np.ndarray:
    """Time multipliers k of the four parts: log(k·parts + rest) ≈ log(measured), each k log-normal
    around `centre` and at least `floor` (a part runs at most at its peak: efficiency / k <= 1)."""
    def residuals(log_k: np.ndarray) -> np.ndarray:
        predicted = parts[:, :4] @ np.exp(log_k) + parts[:, 4]
        return np.concatenate([np.log(predicted / measured_s) / ROW_SD, (log_k - np.log(centre)) / prior_sd])

    low = np.log(np.maximum(floor, 0.1))
    start = np.clip(np.log(centre), low + 1e-6, np.log(10.0) - 1e-6)  # inside the bounds: a start on one stalls
    return np.exp(least_squares(residuals, start, bounds=(low, np.log(10.0)), loss="cauchy").x)


def _floors(validation: Validation, lines) -> np.ndarray:
    """The smallest multiplier of each part that keeps every run's efficiency at most 1."""
    values = [factors(validation.hardware[line]) for line in lines]
    return np.array([max(v[name] for v in values) for name in PARTS])


def _measured(validation: Validation) -> pd.DataFrame:
    """The predicted rows with a measured speed: their parts, measured step time and GPU."""
    table = validation.table.dropna(subset=["measured_tokens_per_s_per_gpu"])
    rows = []
    for row in table.itertuples():
        est = validation.frames[row.line]
        measured = est["step_time_s"] * row.predicted_tokens_per_s_per_gpu / row.measured_tokens_per_s_per_gpu
        rows.append({"line": row.line, "source": row.source, "gpu": row.gpu, "measured_s": measured,
                     "parts": time_parts(est)})
    return pd.DataFrame(rows)


def calibrate(validation: Validation) -> Calibration:
    """The efficiency scales fitted to a validation's measured runs (pooled, and per GPU)."""
    rows = _measured(validation)
    if rows.empty:
        raise ConfigError("no run with a measured speed to calibrate on; give tokens_per_s_per_gpu, "
                          "step_time_s, tflops_per_gpu or mfu (docs/runs.md)")
    parts, measured = np.stack(rows["parts"].to_list()), rows["measured_s"].to_numpy()
    pooled = fit_multipliers(parts, measured, np.ones(4), PRIOR_SD, _floors(validation, rows["line"]))
    gpu_scales = {}
    for gpu, group in rows.groupby("gpu"):
        if len(group) >= MIN_GPU_ROWS:
            k = fit_multipliers(np.stack(group["parts"].to_list()), group["measured_s"].to_numpy(), pooled, GPU_PRIOR_SD,
                                _floors(validation, group["line"]))
            gpu_scales[gpu] = {name: float(1 / v) for name, v in zip(PARTS, k)}
    return Calibration(scales={name: float(1 / v) for name, v in zip(PARTS, pooled)}, gpu_scales=gpu_scales,
                       source="autotune calibrate", records=len(rows))


def _subset(validation: Validation, keep) -> Validation:
    table = validation.table[keep(validation.table)]
    return Validation(table=table, not_expressible=[], malformed=[],
                      frames={line: validation.frames[line] for line in table["line"]},
                      hardware={line: validation.hardware[line] for line in table["line"]})


def leave_one_source_out(runs: list, validation: Validation) -> pd.DataFrame:
    """Each source's rows predicted with the factors fitted on every other source's."""
    names = validation.table["source"].map(source_name)
    tables = []
    for name in sorted(names.unique()):
        others = _subset(validation, lambda t: t["source"].map(source_name) != name)
        if _measured(others).empty:
            continue
        calib = calibrate(others)
        lines = set(validation.table.loc[names == name, "line"])
        tables.append(validate_runs([r for r in runs if r.line in lines], calib=calib).table)
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def _table(before: pd.DataFrame, loso: pd.DataFrame) -> pd.DataFrame:
    """Per source: median |error| and max |error| with the catalog's factors and left out of the fit."""
    columns = ["source", "median_abs_error", "max_abs_error"]
    a = by_source(before)
    b = by_source(loso) if not loso.empty else pd.DataFrame(columns=columns)
    return a[["source", "rows", *columns[1:]]].merge(b[columns], on="source", how="left", suffixes=("_catalog", "_loso"))


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="autotune calibrate",
                                     description="fit the hardware factors to measured runs (docs/runs.md)")
    parser.add_argument("runs", help="a JSON-lines file of runs (docs/runs.md)")
    parser.add_argument("--out", required=True, help="the calibration JSON to write (estimate.calibration=PATH)")
    args = parser.parse_args(argv)
    runs, malformed = read_or_fail(args.runs)
    validation = validate_runs(runs, malformed)
    calib = calibrate(validation)
    calib.source = "autotune calibrate " + shlex.join(argv)
    calib.save(args.out)
    print("efficiency scales (pooled): " + ", ".join(f"{k} x{v:.3f}" for k, v in calib.scales.items()))
    for gpu, scales in calib.gpu_scales.items():
        print(f"  {gpu}: " + ", ".join(f"{k} x{v:.3f}" for k, v in scales.items()))
    loso = leave_one_source_out(runs, validation)
    print("tokens/s per GPU |predicted / measured - 1|: catalog factors, and fitted on the other sources:")
    print(_table(validation.table, loso).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"wrote {args.out} ({calib.records} runs); use it with estimate.calibration={args.out}")
    return 1 if malformed else 0
