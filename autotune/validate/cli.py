"""`autotune validate RUNS.jsonl [--calibration PATH] [--out DIR]`: the cost model against measured runs."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from autotune.engine.config import ConfigError
from autotune.estimate import Calibration
from autotune.validate.predict import validate_runs
from autotune.validate.report import by_source, rank_agreement, write_report
from autotune.validate.runs import read_runs


def read_or_fail(path: str) -> tuple[list, list]:
    """The runs of a file and its malformed rows, each malformed row printed as one error line."""
    if not Path(path).is_file():
        raise ConfigError(f"no such runs file {path}; give a JSON-lines file in the schema of docs/runs.md")
    runs, malformed = read_runs(path)
    for e in malformed:
        print(f"error: {path}: {e}", file=sys.stderr)
    if not runs:
        raise ConfigError(f"{path} has no row in the runs schema (docs/runs.md)")
    return runs, malformed


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="autotune validate",
                                     description="the cost model's predictions against measured runs (docs/runs.md)")
    parser.add_argument("runs", help="a JSON-lines file of runs (docs/runs.md)")
    parser.add_argument("--calibration", help="a calibration JSON (autotune calibrate) to apply")
    parser.add_argument("--out", default="outputs/validate", help="folder for report.md, runs.csv and the plot")
    args = parser.parse_args(argv)
    runs, malformed = read_or_fail(args.runs)
    calib = Calibration.load(args.calibration) if args.calibration else None
    validation = validate_runs(runs, malformed, calib)
    command = "autotune validate " + shlex.join(argv)
    paths = write_report(validation, args.out, command)
    summary = by_source(validation.table)
    if not summary.empty:
        print("tokens/s per GPU, predicted / measured - 1, by source:")
        print(summary.to_string(index=False, float_format=lambda x: f"{x:+.3f}"))
        tau = rank_agreement(validation.table)
        if not tau.empty:
            print(f"Kendall's tau within {len(tau)} jobs whose plan varies: median {tau['kendall_tau'].median():+.2f}")
    unfit = int((~validation.table["fits"]).sum()) if not validation.table.empty else 0
    print(f"{len(validation.table)} rows predicted ({unfit} predicted not to fit), "
          f"{len(validation.not_expressible)} the engine cannot express, {len(malformed)} malformed")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 1 if malformed else 0
