"""A validation as text and files: per-row and per-group errors, Kendall's tau within the groups
that vary one job's plan, the rows the engine cannot express, and the predicted-vs-published plot.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.stats import kendalltau

from autotune.engine.files import write_atomic
from autotune.reports.plots import png_bytes
from autotune.reports.tables import markdown_table
from autotune.validate.predict import Validation

# A job: the same model on the same GPUs at the same sequence length, in one source's table
JOB_KEYS = ("source", "model", "gpu", "gpus", "seq_len")


def source_name(source: str) -> str:
    """A short name of a source for tables: the repository or the paper's first words."""
    words = source.replace("github.com/", "").split()
    return words[0].rstrip(",")[:40] if words else "?"


def error_summary(errors: pd.Series) -> dict:
    e = errors.dropna()
    if e.empty:
        return {"rows": 0, "median_error": np.nan, "median_abs_error": np.nan, "max_abs_error": np.nan}
    return {"rows": len(e), "median_error": e.median(), "median_abs_error": e.abs().median(),
            "max_abs_error": e.abs().max()}


def by_source(table: pd.DataFrame, column: str = "tokens_error") -> pd.DataFrame:
    """Error statistics per source (and over all rows, last)."""
    if table.empty:
        return pd.DataFrame()
    names = table["source"].map(source_name)
    rows = [{"source": name} | error_summary(group[column]) for name, group in table.groupby(names, sort=True)]
    rows.append({"source": "all"} | error_summary(table[column]))
    return pd.DataFrame(rows)


def rank_agreement(table: pd.DataFrame) -> pd.DataFrame:
    """Kendall's tau between predicted and measured tokens/s within each job whose plan varies
    (two or more measured rows)."""
    rows = []
    measured = table.dropna(subset=["measured_tokens_per_s_per_gpu"])
    for key, group in measured.groupby(list(JOB_KEYS), sort=False):
        if len(group) < 2:
            continue
        tau = kendalltau(group["predicted_tokens_per_s_per_gpu"], group["measured_tokens_per_s_per_gpu"]).statistic
        rows.append({"source": source_name(key[0]), "model": key[1], "gpu": key[2], "gpus": key[3], "seq_len": key[4],
                     "rows": len(group), "lines": ",".join(str(n) for n in group["line"]), "kendall_tau": tau})
    return pd.DataFrame(rows)


def plot(table: pd.DataFrame) -> Figure:
    """Predicted against published tokens/s per GPU, log-log, one colour per source."""
    fig = Figure(figsize=(7, 6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    shown = table.dropna(subset=["measured_tokens_per_s_per_gpu"])
    for name, group in shown.groupby(shown["source"].map(source_name)):
        ax.scatter(group["measured_tokens_per_s_per_gpu"], group["predicted_tokens_per_s_per_gpu"], label=name, s=28)
    if not shown.empty:
        values = pd.concat([shown["measured_tokens_per_s_per_gpu"], shown["predicted_tokens_per_s_per_gpu"]])
        low, high = values.min() / 1.5, values.max() * 1.5
        ax.plot([low, high], [low, high], color="black", lw=0.8)
        for band in (0.85, 1.15):
            ax.plot([low, high], [low * band, high * band], color="grey", lw=0.6, ls="--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("published tokens/s per GPU")
    ax.set_ylabel("predicted tokens/s per GPU")
    ax.set_title("cost model vs published runs (dashed: ±15%)")
    ax.legend(fontsize=7)
    return fig


def _cell(name: str, value) -> str:
    """A table cell: errors as signed percentages, other numbers to one decimal, blanks for none."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if "error" in name:
        return f"{value:+.1%}"
    if "tau" in name:
        return f"{value:+.2f}"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return str(value)


def _md(frame: pd.DataFrame) -> str:
    return markdown_table([[_cell(c, v) for c, v in zip(frame.columns, row)] for row in frame.itertuples(index=False)],
                          list(frame.columns))


def markdown(validation: Validation, command: str) -> str:
    """report.md: the errors, the rank agreement, every row, the rows not expressed and not read."""
    table = validation.table
    out = [f"# Cost model vs measured runs\n\n`{command}`\n"]
    if not table.empty:
        out += ["## tokens/s per GPU, by source (error = predicted / measured − 1)\n",
                _md(by_source(table)), ""]
        memory = by_source(table, "memory_error")
        if not memory.empty and memory["rows"].iloc[-1]:
            out += ["## Peak memory (reserved), by source\n", _md(memory), ""]
        tau = rank_agreement(table)
        if not tau.empty:
            out += ["## Kendall's tau within jobs whose plan varies\n", _md(tau), ""]
        rows = table.assign(source=table["source"].map(source_name))
        shown = rows[["line", "source", "model", "gpu", "gpus", "plan", "measured_tokens_per_s_per_gpu",
                      "predicted_tokens_per_s_per_gpu", "tokens_error", "measured_peak_gib", "predicted_peak_gib",
                      "fits"]].copy()
        out += ["## Every row predicted\n", _md(shown), ""]
        unfit = rows[~rows["fits"]]
        if not unfit.empty:
            out += ["## Runs that ran but are predicted not to fit, and why\n"]
            out += [f"- line {r.line} ({r.model}): {r.fit_reason}" for r in unfit.itertuples()] + [""]
        assumed = rows[rows["assumptions"] != ""]
        if not assumed.empty:
            out += ["## What was assumed where the source is silent\n"]
            out += [f"- line {r.line}: {r.assumptions}" for r in assumed.itertuples()] + [""]
    if validation.not_expressible:
        out += ["## Rows the engine cannot express\n"]
        out += [f"- line {run.line} ({run.model}, {run.gpus} x {run.gpu}): {why}" for run, why in validation.not_expressible]
        out += [""]
    if validation.malformed:
        out += ["## Rows not read\n"] + [f"- {e}" for e in validation.malformed] + [""]
    return "\n".join(out)


def write_report(validation: Validation, out_dir: str | Path, command: str) -> list[Path]:
    """report.md, runs.csv and predicted_vs_published.png in out_dir (each written whole)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.md", out / "runs.csv", out / "predicted_vs_published.png"]
    write_atomic(paths[0], markdown(validation, command))
    write_atomic(paths[1], validation.table.to_csv(index=False))
    write_atomic(paths[2], png_bytes(plot(validation.table)))
    return paths
