"""The cost model held against measured training runs (docs/runs.md).

- runs: the runs schema, one JSON line per run, read into a typed `Run` (a malformed row is one
  error naming its line and field);
- mapping: a run as the engine's model, job and plan on a catalog GPU, with the assumptions made
  where the source is silent, or the reason the engine cannot express it;
- predict: each run's estimate and its errors (`validate_runs`);
- report: errors per row and per source, Kendall's tau within a job's plans, the plot, report.md;
- calibrate: the hardware factors fitted to runs, and their leave-one-source-out errors;
- cli: `autotune validate`; calibrate's own `cli` is `autotune calibrate`.
"""
from autotune.validate.mapping import Mapped, NotExpressible, map_run
from autotune.validate.predict import Validation, validate_runs
from autotune.validate.runs import Run, RunError, parse_run, read_runs

__all__ = ["Mapped", "NotExpressible", "Run", "RunError", "Validation", "map_run", "parse_run", "read_runs",
           "validate_runs"]
