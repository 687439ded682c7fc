"""report.md's section on a mixture-of-experts model: its total and active parameters, the expert
parallelism (ep) chosen and why, against the best plan of every other ep, and the router's load
imbalance, measured by the probe or assumed by the estimate."""
from __future__ import annotations

from typing import Optional

import pandas as pd

from autotune.reports.load import Run
from autotune.reports.tables import Choice, component_columns, component_name, gib, markdown_table, match_plan, rate, \
    row_label, seconds


def experts_section(run: Run, choice: Optional[Choice]) -> str:
    """The section, or "" for a dense model."""
    experts = int(run.setting("model", "n_experts") or 0)
    if not experts:
        return ""
    lines = ["## Mixture of experts", "", _sizes(run, experts)]
    chosen = _chosen_estimate(run, choice)
    if chosen is None:
        return "\n".join(lines)
    ep = int(chosen["ep"])
    best = _best_per_ep(run)
    best.loc[ep] = chosen  # the chosen plan stands for its ep (ties and the analytic rule may pick another than the fastest)
    if ep > 1:
        how = (f"each group of {ep} of the {int(chosen['dp'])} data-parallel ranks splits every MoE layer's {experts} "
               f"experts, {experts // ep} per rank, and exchanges the routed tokens all-to-all.")
    else:
        how = f"no expert parallelism: every rank holds all {experts} experts of each MoE layer and computes its own tokens."
    lines += ["", f"Expert parallelism chosen: **ep={ep}**: {how}", ""]
    routed = (run.search.get("params") or {}).get("routed_experts")
    measured = _measured_per_ep(run)
    rows = [[f"ep={int(e)}" + (" (chosen)" if int(e) == ep else ""), row_label(r), rate(r["tokens_per_s"]),
             gib(r["mem_total_bytes"]), _count(routed / (int(e) * int(r["pp"]))) if routed else "–",
             seconds(r.get("time_ep_comm_s")), seconds(r.get("time_dp_comm_s")), f"{float(r.get('expert_load', 1.0)):.2f}",
             rate(measured.get(int(e)))] for e, r in best.iterrows()]
    lines.append(markdown_table(rows, ["ep", "best plan that fits", "est. tokens/s", "est. memory",
                                       "routed-expert params per rank", "all-to-all", "dp comm", "busiest rank's load",
                                       "best measured tokens/s"]))
    lines += ["", "### Why this ep", ""] + [f"- {reason}" for reason in _why_ep(run, chosen, best)]
    lines += ["", "### Load imbalance", "", _imbalance(run, chosen)]
    return "\n".join(lines)


def _sizes(run: Run, experts: int) -> str:
    params, k = run.search.get("params") or {}, run.setting("model", "experts_per_token")
    name = run.setting("model", "name") or "the model"
    if not params:
        return f"{name}: {experts} routed experts per MoE layer, {k} per token."
    return (f"{name}: {_count(params['total'])} parameters, {_count(params['active'])} active per token "
            f"({k} of {experts} routed experts in each MoE layer); the routed experts hold "
            f"{_count(params['routed_experts'])}, which expert parallelism splits over the ranks of a group.")


def _count(n: float) -> str:
    """A parameter count as people write it: 46.7B, 2.5M, 9,216."""
    for scale, unit in ((1e9, "B"), (1e6, "M")):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:,.0f}"


def _chosen_estimate(run: Run, choice: Optional[Choice]) -> Optional[pd.Series]:
    """The chosen plan's row of candidates.csv (its estimate)."""
    if choice is None or run.candidates is None or "ep" not in run.candidates:
        return None
    match = match_plan(run.candidates, choice.row)
    return match.iloc[0] if not match.empty else None


def _best_per_ep(run: Run) -> pd.DataFrame:
    """The fastest estimated plan that fits for each ep, indexed by ep."""
    cand = run.candidates
    fits = cand[cand["fits"]] if "fits" in cand else cand
    best = fits.sort_values(["tokens_per_s", "mem_total_bytes"], ascending=[False, True]).drop_duplicates("ep")
    return best.set_index(best["ep"].astype(int)).sort_index()


def _measured_per_ep(run: Run) -> dict[int, float]:
    """The best measured throughput of each ep that a trial ran."""
    measured = run.measured
    if measured.empty:
        return {}
    return {int(ep): float(group.meas_tokens_per_s.max()) for ep, group in measured.groupby(measured.ep.astype(int))}


def _why_ep(run: Run, chosen: pd.Series, best: pd.DataFrame) -> list[str]:
    """The chosen plan against the best plan of each other ep: throughput, and the parts that differ most."""
    reasons = []
    ep = int(chosen["ep"])
    every = sorted({int(e) for e in run.candidates["ep"].unique()})
    for other in every:
        if other == ep:
            continue
        if other not in best.index:
            reasons.append(f"ep={other}: no plan fits")
            continue
        row = best.loc[other]
        lead = 100 * (chosen["tokens_per_s"] / row["tokens_per_s"] - 1)
        verdict = ("as fast" if abs(lead) < 0.05 else f"{lead:.1f}% faster" if lead > 0 else
                   f"{-lead:.1f}% slower: a tie within the estimate's error, settled as the Chosen plan says")
        reasons.append(f"against ep={other} ({row_label(row)}): {verdict}; {_differences(chosen, row)}")
    if not reasons:
        reasons.append("every plan has this ep (the experts' count and dp allow no other)")
    return reasons


def _differences(chosen: pd.Series, other: pd.Series) -> str:
    """The two time parts that differ most between two plans, and their memory."""
    frame = pd.DataFrame([chosen, other])
    parts = sorted(component_columns(frame, "", "time"), key=lambda c: -abs(float(chosen[c]) - float(other[c])))[:2]
    times = ", ".join(f"{component_name(c)} {seconds(chosen[c])} vs {seconds(other[c])}" for c in parts)
    return f"{times}; memory {gib(chosen['mem_total_bytes'])} vs {gib(other['mem_total_bytes'])}"


def _imbalance(run: Run, chosen: pd.Series) -> str:
    """What the router's imbalance was: measured by the probe, or the estimate's prior."""
    measured = run.measured
    if not measured.empty and "meas_moe_imbalance" in measured and measured.meas_moe_imbalance.notna().any():
        values = measured.meas_moe_imbalance.dropna()
        worst = measured.get("meas_moe_imbalance_max", pd.Series(dtype=float)).dropna()
        learned = (run.result.get("learned") or {}).get("moe_imbalance")
        return (f"Measured by the probe over {len(values)} trial(s): the most tokens any expert got in a step over the "
                f"mean, per MoE layer, {values.median():.2f} (median over trials of the mean over layers)"
                + (f", {worst.max():.2f} in the worst layer" if not worst.empty else "") + ". "
                + (f"The search estimated every plan again with an imbalance of {learned:.2f}." if learned else
                   "A calibration fitted to these trials takes their median as the router's imbalance."))
    imbalance, load = float(chosen.get("expert_imbalance", 1.0)), float(chosen.get("expert_load", 1.0))
    return (f"No trial measured the router here: the estimate assumes a router that spreads tokens evenly at random, "
            f"whose busiest expert gets {imbalance:.2f}x the mean of a micro-batch's slots in an ep group; the "
            f"busiest rank then computes {load:.2f}x its share. A trained router is less even: a measured search "
            "(search.mode=measure) calibrates it from the probe's figures.")
