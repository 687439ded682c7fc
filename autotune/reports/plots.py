"""Figures of a run, drawn with matplotlib's Agg canvas (no display, no global pyplot state).

Each function returns a Figure, or None when the run has nothing to draw (an analytic run has no
measured trials and no optimisation history).
"""
from __future__ import annotations

import io
from typing import Optional

import matplotlib
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from autotune.reports.load import FAILED, Run
from autotune.reports.tables import (
    Choice,
    component_columns,
    component_name,
    memory_unit,
    pareto_front,
    row_label,
    top_plans,
)

THOUSANDS = FuncFormatter(lambda v, _: f"{v:,.0f}")
CHOSEN = dict(marker="*", s=320, c="gold", edgecolors="black", linewidths=0.8, zorder=6)


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130)
    return buf.getvalue()


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _title(run: Run) -> str:
    model, cluster = run.setting("model", "name"), run.setting("cluster", "name")
    return " on ".join(str(x) for x in (model, cluster) if x)


def _memory_limit_line(ax: Axes, run: Run, unit: tuple[float, str], largest: float) -> None:
    """The per-GPU memory limit; when it is far off the scale (a CPU run), named in the legend only."""
    if not run.memory_limit_bytes:
        return
    div, name = unit
    limit = run.memory_limit_bytes / div
    text = f"memory limit ({limit:,.0f} {name})"
    if limit <= 3 * largest:
        ax.axvline(limit, color="tab:red", ls="--", lw=1.2, label=text, zorder=1)
    else:
        ax.plot([], [], color="tab:red", ls="--", lw=1.2, label=text + ", off the scale")


def throughput_vs_memory(run: Run, choice: Optional[Choice]) -> Optional[Figure]:
    """Every plan's throughput against its peak memory, the Pareto front and the memory limit."""
    fig = _figure(10, 5.5)
    ax = fig.add_subplot()
    cand, measured, drew = run.candidates, run.measured, False
    have_estimates = cand is not None and {"mem_total_bytes", "tokens_per_s"} <= set(cand.columns)
    right = _right_edge(run)
    div, unit_name = unit = memory_unit(pd.Series([right]))
    if have_estimates and measured.empty:
        fits = cand[cand.fits] if "fits" in cand else cand
        over = cand[~cand.index.isin(fits.index)]
        kept = fits[fits.dropped == ""] if "dropped" in fits else fits
        dominated = fits[~fits.index.isin(kept.index)]
        ax.scatter(over.mem_total_bytes / div, over.tokens_per_s, s=9, c="silver",
                   label=f"does not fit ({len(over)})", zorder=2)
        ax.scatter(dominated.mem_total_bytes / div, dominated.tokens_per_s, s=12, c="tab:blue", alpha=0.3,
                   label=f"fits, dominated ({len(dominated)})", zorder=3)
        ax.scatter(kept.mem_total_bytes / div, kept.tokens_per_s, s=22, c="tab:blue",
                   label=f"fits, kept ({len(kept)})", zorder=4)
        front = fits.loc[pareto_front(fits.mem_total_bytes, fits.tokens_per_s)]
        ax.plot(front.mem_total_bytes / div, front.tokens_per_s, color="tab:orange", lw=1.5,
                drawstyle="steps-post", label="Pareto front (estimated)", zorder=5)
        drew = not cand.empty
    elif have_estimates:
        ax.scatter(cand.mem_total_bytes / div, cand.tokens_per_s, s=8, c="silver", alpha=0.6,
                   label=f"all candidates, estimated ({len(cand)})", zorder=2)
    if not measured.empty:
        short, final = measured[~measured.final], measured[measured.final]
        ax.scatter(short.meas_peak_mem_bytes / div, short.meas_tokens_per_s, s=40, c="tab:blue",
                   edgecolors="black", linewidths=0.5, label=f"measured, short runs ({len(short)})", zorder=4)
        if not final.empty:
            ax.scatter(final.meas_peak_mem_bytes / div, final.meas_tokens_per_s, marker="D", s=40, c="tab:green",
                       edgecolors="black", linewidths=0.5, label=f"finalists, long runs ({len(final)})", zorder=4)
        like = short if not short.empty else final  # a front of runs of one length
        front = like.loc[pareto_front(like.meas_peak_mem_bytes, like.meas_tokens_per_s)]
        # ringed points: a front of one plan is still seen
        ax.plot(front.meas_peak_mem_bytes / div, front.meas_tokens_per_s, color="tab:orange", lw=1.5,
                marker="o", ms=11, mfc="none", mew=1.5, drawstyle="steps-post",
                label=f"Pareto front ({'short' if like is short else 'long'} runs)", zorder=5)
        failed = run.trials[run.trials.status.isin(FAILED)]
        if not failed.empty:
            ax.scatter(failed.est_mem_total_bytes / div, [0] * len(failed), marker="x", s=60, c="tab:red",
                       clip_on=False, zorder=5,
                       label=f"failed: {', '.join(sorted(set(failed.status)))} (at estimated memory)")
        # The measurements set the scale: uncalibrated estimates far above them would flatten them.
        top = 1.15 * measured.meas_tokens_per_s.max()
        if have_estimates and cand.tokens_per_s.max() <= 3 * top:
            top = max(top, 1.05 * cand.tokens_per_s.max())
        above = int((cand.tokens_per_s > top).sum()) if have_estimates else 0
        if above:
            ax.plot([], [], " ", label=f"{above} estimate{'s' * (above != 1)} above the top edge, not shown")
        ax.set_ylim(0, top)
        drew = True
    if not drew:
        return None
    _memory_limit_line(ax, run, unit, right / div)
    beyond = int((cand.mem_total_bytes > right).sum()) if have_estimates else 0
    if beyond:
        ax.plot([], [], " ", label=f"{beyond} plan{'s' * (beyond != 1)} beyond {right / div:,.0f} {unit_name}, not shown")
    if choice is not None:
        x, y = _chosen_point(choice)
        run_kind = " (long run)" if choice.source == "measured" and choice.row.get("final") else ""
        ax.scatter([x / div], [y], label=f"chosen: {row_label(choice.row)}{run_kind}", **CHOSEN)
    ax.set_xlabel(f"peak memory per GPU ({unit_name})")
    ax.set_ylabel("throughput (tokens/s, whole job)")
    ax.yaxis.set_major_formatter(THOUSANDS)
    ax.set_xlim(0, right / div)
    if measured.empty:
        ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.set_title(f"Throughput vs memory: {_title(run)}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def _right_edge(run: Run) -> float:
    """Bytes at the plot's right edge: room past the memory limit, not plans needing 100x of it."""
    columns = []
    cand = run.candidates
    if cand is not None and "mem_total_bytes" in cand:
        fits = cand["fits"] if "fits" in cand and run.memory_limit_bytes else pd.Series(True, index=cand.index)
        columns.append(cand.mem_total_bytes.where(fits))
    if not run.trials.empty:
        columns += [run.trials.meas_peak_mem_bytes, run.trials.est_mem_total_bytes.where(run.trials.status != "skipped")]
    largest = max((float(c.max()) for c in columns if c.notna().any()), default=0.0)
    limit = run.memory_limit_bytes
    if limit and limit / 3 <= largest <= 3 * limit:
        return max(1.25 * limit, 1.05 * largest)
    return 1.05 * largest or 1.0  # no limit, or one far from every plan (shown in the legend only)


def _chosen_point(choice: Choice) -> tuple[float, float]:
    row = choice.row
    if choice.source == "measured":
        return row.meas_peak_mem_bytes, row.meas_tokens_per_s
    return row.mem_total_bytes, row.tokens_per_s


def memory_breakdown(run: Run, choice: Optional[Choice], n: int = 8) -> Optional[Figure]:
    """Estimated memory per component of the top plans, stacked, with measured peaks where known."""
    top, ranked_by = top_plans(run, n)
    prefix = "est_" if ranked_by == "measured" else ""
    columns = component_columns(top, prefix, "mem") if not top.empty else []
    if not columns:
        return None
    totals = top[columns].fillna(0).sum(axis=1)
    peaks = top.meas_peak_mem_bytes if ranked_by == "measured" else None
    div, unit_name = unit = memory_unit(totals, peaks)
    chosen = choice.row.name if choice is not None else None
    labels = [
        (f"trial {int(r.number)}: " if ranked_by == "measured" else f"#{i + 1} ") + row_label(r)
        + (" (chosen)" if idx == chosen else "")
        for i, (idx, r) in enumerate(top.iterrows())
    ]
    fig = _figure(7 + 0.07 * max(len(label) for label in labels), 1.4 + 0.55 * len(top))
    ax = fig.add_subplot()
    left = pd.Series(0.0, index=top.index)
    pairs = matplotlib.colormaps["tab20"].colors  # tab10's colors, then their light shades: up to 11 components
    colors = [*pairs[0::2], *pairs[1::2]]
    for i, col in enumerate(columns):
        width = top[col].fillna(0) / div
        ax.barh(labels, width, left=left, color=colors[i % len(colors)], label=component_name(col), edgecolor="white")
        left += width
    if ranked_by == "measured":
        ax.scatter(top.meas_peak_mem_bytes / div, labels, marker="D", s=40, c="black", zorder=5,
                   label="measured peak (resident-set growth)" if (top.device.astype(str) == "cpu").all()
                   else "measured peak (allocated)")
    largest = max(totals.max(), peaks.max() if peaks is not None and peaks.notna().any() else 0) / div
    _memory_limit_line(ax, run, unit, largest)
    ax.invert_yaxis()  # best plan on top
    ax.set_xlabel(f"memory per GPU ({unit_name})")
    ax.grid(axis="x", alpha=0.3)
    order = "finalists first, by measured throughput" if ranked_by == "measured" and top.final.any() else \
        f"ranked by {ranked_by} throughput"
    fig.suptitle(f"Estimated memory of the top plans ({order})")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def estimate_vs_measured(run: Run) -> Optional[Figure]:
    """Estimated against measured peak memory and step time of each measured trial, with y = x."""
    df = run.measured
    if df.empty:
        return None
    div, unit_name = memory_unit(df.meas_peak_mem_bytes, df.est_mem_total_bytes)
    pairs = [
        (f"peak memory per GPU ({unit_name})", df.meas_peak_mem_bytes / div, df.est_mem_total_bytes / div,
         df.mem_error_pct),
        ("step time (s)", df.meas_step_time_s, df.est_step_time_s, df.time_error_pct),
    ]
    if all(est.isna().all() or meas.isna().all() for _, meas, est, _ in pairs):
        return None
    fig = _figure(10, 4.8)
    for ax, (what, meas, est, err) in zip(fig.subplots(1, 2), pairs):
        ok = meas.notna() & est.notna()
        if not ok.any():
            ax.text(0.5, 0.5, "nothing measured", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        lo, hi = 0.0, 1.1 * max(meas[ok].max(), est[ok].max())
        ax.fill_between([lo, hi], [lo * 0.8, hi * 0.8], [lo * 1.2, hi * 1.2], color="grey", alpha=0.12,
                        label="±20%")
        ax.plot([lo, hi], [lo, hi], color="grey", ls="--", lw=1, label="estimate = measured")
        ax.scatter(meas[ok], est[ok], s=36, c="tab:blue", edgecolors="black", linewidths=0.5, zorder=3)
        # Trials within 2% of the axis of each other (a finalist and its short run) share one label.
        groups: list[tuple[float, float, list[str]]] = []
        for number, x, y in sorted(zip(df.number[ok], meas[ok], est[ok]), key=lambda p: p[1]):
            near = next((g for g in groups if abs(g[0] - x) < 0.02 * hi and abs(g[1] - y) < 0.02 * hi), None)
            if near is None:
                groups.append((x, y, [str(int(number))]))
            else:
                near[2].append(str(int(number)))
        for x, y, numbers in groups:
            ax.annotate(",".join(numbers), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
        ax.set_xlabel(f"measured {what}")
        ax.set_ylabel(f"estimated {what}")
        ax.set_title(f"{what.split(' (')[0]}: mean |error| {err[ok].abs().mean():.1f}%")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle("Estimate vs measured (labels: trial numbers)")
    return fig


def history(run: Run) -> Optional[Figure]:
    """Measured throughput of each trial in order, failures at zero, and the best so far."""
    df = run.trials
    if df.empty:
        return None
    fig = _figure(8.5, 4.8)
    ax = fig.add_subplot()
    ok = df[df.status == "ok"]
    short, final = ok[~ok.final], ok[ok.final]
    ax.scatter(short.number, short.meas_tokens_per_s, s=36, c="tab:blue", edgecolors="black", linewidths=0.5,
               label="measured (short run)", zorder=3)
    if not final.empty:
        ax.scatter(final.number, final.meas_tokens_per_s, marker="D", s=40, c="tab:green", edgecolors="black",
                   linewidths=0.5, label="finalist (long run)", zorder=3)
    pruned = df[df.status == "pruned"]
    if not pruned.empty:
        at = pruned.last_report_tokens_per_s if "last_report_tokens_per_s" in pruned else pruned.meas_tokens_per_s
        ax.scatter(pruned.number, at.fillna(0), s=36, facecolors="none",
                   edgecolors="grey", label="pruned (at its last report)", zorder=3)
    failed = df[df.status.isin(FAILED)]
    if not failed.empty:
        ax.scatter(failed.number, [0] * len(failed), marker="x", s=60, c="tab:red", clip_on=False,
                   label=f"failed: {', '.join(sorted(set(failed.status)))} (at 0)", zorder=3)
    best = df.meas_tokens_per_s.where(df.status == "ok").cummax().ffill()
    ax.plot(df.number, best, color="tab:orange", drawstyle="steps-post", lw=1.5, label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("measured throughput (tokens/s)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_formatter(THOUSANDS)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.set_title(f"Optimisation history: {_title(run)}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over a point
    return fig
