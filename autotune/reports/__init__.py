"""Study results -> tables (pandas) and figures (matplotlib). Knows nothing of torch.

`build_report(run_dir)` (re)builds trials.csv, report.md and plots/*.png from what a search left
in its run folder; every file is written atomically. The study's storage is the one search.json
names (its password masked there: libpq's PGPASSWORD or ~/.pgpass supplies it), or `storage`, the
URL the search that just ran holds in memory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from autotune.reports import markdown, plots
from autotune.engine.files import write_atomic
from autotune.reports.load import load_run
from autotune.reports.tables import choose

PLOTS = {
    "throughput_vs_memory.png": "Throughput vs peak memory",
    "memory_breakdown.png": "Memory breakdown of the top plans",
    "estimate_vs_measured.png": "Estimated vs measured",
    "history.png": "Optimisation history",
}


def build_report(run_dir: str | Path, storage: Optional[str] = None) -> Path:
    """Rebuild the report of a run folder; returns the path of report.md."""
    run = load_run(run_dir, storage)
    choice = choose(run)
    figures = {
        "throughput_vs_memory.png": plots.throughput_vs_memory(run, choice),
        "memory_breakdown.png": plots.memory_breakdown(run, choice),
        "estimate_vs_measured.png": plots.estimate_vs_measured(run),
        "history.png": plots.history(run),
    }
    figures = {name: fig for name, fig in figures.items() if fig is not None}
    text = markdown.render(run, {PLOTS[name]: f"plots/{name}" for name in figures})
    drawn = {name: plots.png_bytes(fig) for name, fig in figures.items()}
    if not run.trials.empty:
        write_atomic(run.run_dir / "trials.csv", run.trials.to_csv(index=False))
    for name, data in drawn.items():
        write_atomic(run.run_dir / "plots" / name, data)
    report = run.run_dir / "report.md"
    write_atomic(report, text)
    return report
