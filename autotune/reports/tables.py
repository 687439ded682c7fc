"""Derived tables: the chosen plan, top plans, the Pareto front, short plan labels, number formats."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import pandas as pd

from autotune.plans import plan_from_row, plan_label
from autotune.reports.load import PLAN_KEY, Run

GIB = 2**30
MIB = 2**20


@dataclass
class Choice:
    """The plan the run settles on, where that came from, and its row (a trial or a candidate)."""

    row: pd.Series
    source: str  # "measured" (a trial) or "estimated" (a candidate)
    trial: Optional[int] = None


def row_label(row: pd.Series | dict[str, Any]) -> str:
    """The plan label (autotune.plans.plan_label) of a trial's or a candidate's row."""
    if norm(row.get("zero_stage")) == "None":
        return "(no plan recorded)"
    return plan_label(plan_from_row(row))


def norm(value: Any) -> str:
    """One spelling per value, whether it came from JSON, a CSV column or a float column with gaps."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "None"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value.item() if hasattr(value, "item") else value)


def match_plan(df: pd.DataFrame, plan: dict[str, Any]) -> pd.DataFrame:
    """The rows of `df` that are `plan` (grad_accum aside, which is derived)."""
    mask = pd.Series(True, index=df.index)
    for key in PLAN_KEY:
        if key in plan and key in df:
            mask &= df[key].map(norm) == norm(plan[key])
    return df[mask]


def choose(run: Run) -> Optional[Choice]:
    """The search's own choice (search.json's result, else best.yaml's plan); without either, the
    fastest measured plan (finalists first), else the best estimate."""
    measured = run.measured
    chosen = run.result.get("best") or {}
    trial = chosen.get("trial")
    if isinstance(trial, int) and not measured.empty and (measured.number == trial).any():
        return Choice(row=measured[measured.number == trial].iloc[0], source="measured", trial=trial)
    plan = run.best_plan or chosen.get("plan")
    if plan and not measured.empty:
        match = match_plan(measured, plan)
        if not match.empty:
            measured = match
    if not measured.empty:
        finals = measured[measured.final]
        pool = finals if not finals.empty else measured
        row = pool.loc[pool.meas_tokens_per_s.idxmax()]
        return Choice(row=row, source="measured", trial=int(row.number))
    ranked = ranked_candidates(run)
    if ranked is None or ranked.empty:
        return None
    if plan:
        match = match_plan(ranked, plan)
        if not match.empty:
            return Choice(row=match.iloc[0], source="estimated")
    return Choice(row=ranked.iloc[0], source="estimated")


def ranked_candidates(run: Run) -> Optional[pd.DataFrame]:
    """Candidates that fit and were not dropped, fastest estimate first."""
    df = run.candidates
    if df is None or "tokens_per_s" not in df:
        return None
    keep = df["fits"] if "fits" in df else pd.Series(True, index=df.index)
    if "dropped" in df:
        keep &= df["dropped"] == ""
    # Equal throughput: the plan that needs less memory is the better one.
    return df[keep].sort_values(["tokens_per_s", "mem_total_bytes"], ascending=[False, True])


def top_plans(run: Run, n: int = 5) -> tuple[pd.DataFrame, str]:
    """The n best plans, one per plan, by measured throughput if any were measured, else by estimate."""
    measured = run.measured
    if not measured.empty:
        # One row per plan: its finalist (long) run where it has one, else its fastest short run;
        # finalists first (the choice is among their long runs), then the other plans' short runs.
        best = measured.sort_values(["final", "meas_tokens_per_s"], ascending=False)
        best = best.drop_duplicates(subset=[k for k in PLAN_KEY if k in best], keep="first")
        return best.head(n), "measured"
    ranked = ranked_candidates(run)
    return (ranked.head(n) if ranked is not None else pd.DataFrame()), "estimated"


def pareto_front(memory: pd.Series, throughput: pd.Series) -> pd.Index:
    """Points no other point beats on both less memory and more throughput, by increasing memory."""
    order = pd.DataFrame({"m": memory, "t": throughput}).dropna().sort_values(["m", "t"], ascending=[True, False])
    front, best = [], -math.inf
    for idx, t in order.t.items():
        if t > best:
            front.append(idx)
            best = t
    return pd.Index(front)


def component_columns(df: pd.DataFrame, prefix: str, kind: str) -> list[str]:
    """Memory (`mem_*_bytes`) or time (`time_*_s`) component columns that are not zero for every row."""
    suffix = "_bytes" if kind == "mem" else "_s"
    start = f"{prefix}{kind}_"
    return [c for c in df.columns if c.startswith(start) and c.endswith(suffix) and c != f"{prefix}mem_total_bytes"
            and pd.to_numeric(df[c], errors="coerce").abs().fillna(0).max() > 1e-9 * (2**30 if kind == "mem" else 1)]


def component_name(column: str) -> str:
    name = column.split("mem_", 1)[-1] if "mem_" in column else column.split("time_", 1)[-1]
    return name.removesuffix("_bytes").removesuffix("_s").replace("_", " ")


# --- formatting for report.md ---------------------------------------------------------------

def gib(value: Any) -> str:
    """Bytes in GiB, or MiB below one GiB (a tiny model on a CPU)."""
    if _missing(value):
        return "–"
    value = float(value)
    if abs(value) < 0.5:
        return "0"
    return f"{value / GIB:.2f} GiB" if abs(value) >= 0.1 * GIB else f"{value / MIB:.1f} MiB"


def memory_unit(*columns: pd.Series) -> tuple[float, str]:
    """GiB for plots of real models, MiB when every value is below one GiB."""
    largest = max((c.max() for c in columns if c is not None and c.notna().any()), default=0.0)
    return (GIB, "GiB") if largest >= 0.5 * GIB else (MIB, "MiB")


def seconds(value: Any) -> str:
    if _missing(value):
        return "–"
    value = float(value)
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


def rate(value: Any) -> str:
    return "–" if _missing(value) else f"{float(value):,.0f}"


def pct(value: Any) -> str:
    return "–" if _missing(value) else f"{float(value):+.1f}%"


def share(value: Any) -> str:
    return "–" if _missing(value) else f"{100 * float(value):.1f}%"


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def markdown_table(rows: list[list[Any]], header: list[str]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
