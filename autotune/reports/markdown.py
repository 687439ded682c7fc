"""report.md: the chosen plan and why, the top plans side by side, failures, estimate vs measured."""
from __future__ import annotations

from typing import Any, Optional

import pandas as pd

from autotune.reports.experts import experts_section
from autotune.reports.load import FAILED, PLAN_KEY, Run
from autotune.reports.tables import (
    Choice,
    choose,
    component_columns,
    component_name,
    gib,
    markdown_table,
    match_plan,
    norm,
    pct,
    pareto_front,
    row_label,
    rate,
    ranked_candidates,
    seconds,
    share,
    top_plans,
)

PLAN_ROWS = [
    ("ZeRO stage", "zero_stage"), ("offload optimizer", "offload_optimizer"), ("offload params", "offload_params"),
    ("precision", "precision"), ("gradient reduce dtype", "reduce_dtype"), ("micro-batch", "micro_batch"), ("grad accumulation", "grad_accum"),
    ("activation checkpointing", "activation_checkpointing"), ("dp", "dp"),
    ("hybrid sharding replicas", "dp_replicate"), ("context parallel (cp)", "cp"), ("tp", "tp"),
    ("sequence parallel", "sequence_parallel"), ("async tp", "async_tp"), ("pp", "pp"), ("pipeline schedule", "pp_schedule"),
    ("virtual stages", "pp_virtual_stages"), ("ep", "ep"), ("loss scale", "loss_scale"), ("kernels", "kernels"),
    ("compile", "compile"),
]
# fields that mean something only beside another: shown when some plan of the table has that
MEANINGFUL_WHEN = {
    "sequence_parallel": lambda r: int(r.get("tp") or 1) > 1,
    "async_tp": lambda r: bool(r.get("sequence_parallel")),
    "pp_schedule": lambda r: int(r.get("pp") or 1) > 1,
    "pp_virtual_stages": lambda r: int(r.get("pp") or 1) > 1,
    "ep": lambda r: int(r.get("ep") or 1) > 1,
    "dp_replicate": lambda r: int(r.get("dp_replicate") or 1) > 1,
    "cp": lambda r: int(r.get("cp") or 1) > 1,
    "loss_scale": lambda r: r.get("precision") == "fp16",
    "reduce_dtype": lambda r: r.get("reduce_dtype") not in (None, "fp32"),  # only a user's plan reduces in bf16
}


def render(run: Run, plots: dict[str, str]) -> str:
    """The whole report; `plots` maps a plot's title to its path relative to the run folder."""
    choice = choose(run)
    parts = [_header(run), _chosen(run, choice), _top(run, choice)]
    if not run.trials.empty:
        parts += [_failures(run), _estimate_vs_measured(run), _learned(run), _short_vs_long(run)]
    else:
        parts.append(_analytic(run, choice))
    parts += [experts_section(run, choice), _measured_and_modelled(run), _candidates(run), _plots(plots)]
    return "\n\n".join(p for p in parts if p) + "\n"


def _header(run: Run) -> str:
    mode = run.search.get("mode") or run.setting("search", "mode")
    if mode in (None, "auto"):
        mode = "measure" if not run.measured.empty else "analytic"
    model, cluster = run.setting("model", "name") or "?", run.setting("cluster", "name") or "?"
    lines = [f"# autotune report: {model} on {cluster}", ""]
    lines.append(f"- run folder: `{run.run_dir}`; search mode: **{mode}**"
                 + (f"; objective: {run.search['objective']}" if run.search.get("objective") else ""))
    job = [f"{k} {run.setting('job', k)}" for k in ("global_batch", "seq_len") if run.setting("job", k)]
    if job:
        lines.append("- job: " + ", ".join(job))
    if run.study_name:
        lines.append(f"- study `{run.study_name}` in `{run.storage}`")
    if not run.trials.empty:
        counts = run.trials.status.value_counts()
        lines.append(f"- {len(run.trials)} trials: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    if run.result.get("stopped"):
        lines.append(f"- the search stopped: {run.result['stopped']}")
    if run.memory_limit_bytes:
        lines.append(f"- memory limit per GPU: {gib(run.memory_limit_bytes)}")
    return "\n".join(lines)


OBJECTIVES = {
    "throughput": "fastest measured plan that ran without error",
    "cost": "most tokens per GPU-second of the measured plans",
    "pareto": "on the measured throughput / peak-memory Pareto front",
}
FINALIST_OBJECTIVES = {
    "throughput": "fastest finalist in the long runs",
    "cost": "most tokens per GPU-second of the finalists' long runs",
}
KEY_ROWS = ("zero_stage", "precision", "micro_batch", "grad_accum", "activation_checkpointing", "dp")


def _plan_rows(rows: list[pd.Series]) -> list[tuple[str, str]]:
    """The plan fields worth a row: the key ones, and any on which these plans differ."""
    def shown(key: str) -> bool:
        if key in MEANINGFUL_WHEN:
            return any(MEANINGFUL_WHEN[key](r) for r in rows)
        if len(rows) > 1 and key not in KEY_ROWS:
            return len({norm(r.get(key)) for r in rows}) > 1
        return True
    return [(label, key) for label, key in PLAN_ROWS if key in rows[0] and shown(key)]


def _plan_value(row: pd.Series, key: str) -> Any:
    value = row.get(key)
    if key == "activation_checkpointing" and value == "selective":
        return f"selective (every {row.get('checkpoint_every_k')})"
    return "–" if value is None or (isinstance(value, float) and pd.isna(value)) else value


def _chosen(run: Run, choice: Optional[Choice]) -> str:
    lines = ["## Chosen plan", ""]
    if choice is None:
        lines.append("No plan fits and none was measured: see the candidates below for why each was dropped.")
        return "\n".join(lines)
    row = choice.row
    if choice.trial is None:
        where = "the estimator (no trial measured it)"
    else:
        where = f"trial {choice.trial}" + (" (finalist, long run)" if row.get("final") else "")
    written = " Written to `best.yaml`, `ds_config.json`, `launch.sh`." if (run.run_dir / "best.yaml").is_file() else ""
    lines.append(f"**{row_label(row)}**, from {where}.{written}")
    lines.append("")
    rows = [[label, _plan_value(row, key)] for label, key in _plan_rows([row])]
    lines.append(markdown_table(rows, ["plan", "value"]))
    lines += ["", "### Why", ""]
    lines += [f"- {reason}" for reason in _why(run, choice)]
    return "\n".join(lines)


def _why(run: Run, choice: Choice) -> list[str]:
    row, limit = choice.row, run.memory_limit_bytes
    objective = run.search.get("objective") or "throughput"
    if choice.source == "measured":
        lead = OBJECTIVES.get(objective, "chosen by the search")
        if row.get("final"):
            lead = (f"{FINALIST_OBJECTIVES.get(objective, lead)} (the finalists are the best short runs, rerun "
                    "with search.final_steps: a long run is the better measurement)")
        reasons = [
            f"{lead}: {rate(row.meas_tokens_per_s)} tokens/s, "
            f"MFU {share(row.get('meas_mfu'))}, step {seconds(row.meas_step_time_s)}"
        ]
        others = run.measured[~run.measured.index.isin(match_plan(run.measured, row).index)]
        alike = others[others.final == row.final]  # a long run is compared with long runs
        others = alike if not alike.empty else others
        if not others.empty and objective == "throughput":
            second = others.loc[others.meas_tokens_per_s.idxmax()]
            reasons.append(_lead(row.meas_tokens_per_s, second.meas_tokens_per_s) +
                           f" the next {'finalist' if row.final and second.final else 'measured plan'}, trial {int(second.number)} ({row_label(second)}, "
                           f"{rate(second.meas_tokens_per_s)} tokens/s){_differences(row, second)}")
        if objective == "pareto":
            like = run.measured[run.measured.final == row.final]
            front = like.loc[pareto_front(like.meas_peak_mem_bytes, like.meas_tokens_per_s)]
            reasons.append("the front, by memory: " + "; ".join(
                f"trial {int(r.number)} ({rate(r.meas_tokens_per_s)} tokens/s in {gib(r.meas_peak_mem_bytes)})"
                for _, r in front.iterrows()) + ". The fastest on it is written out; pick another from trials.csv "
                "to trade throughput for memory")
        runner_up = run.result.get("runner_up") or {}
        if runner_up.get("within_noise"):
            reasons.append(f"within noise of the runner-up, {runner_up['describe']} ({rate(runner_up['value'])}): their "
                           "measurement intervals overlap, so either is as good on this evidence")
        memory = row.meas_peak_mem_bytes
    else:
        ranked = ranked_candidates(run)
        fastest = ranked.tokens_per_s.max() if ranked is not None and not ranked.empty else row.tokens_per_s
        lead = ("highest estimated throughput of the plans that fit" if row.tokens_per_s >= fastest else
                f"estimated {100 * (1 - row.tokens_per_s / fastest):.1f}% behind the fastest plan that fits "
                f"({rate(fastest)} tokens/s), a tie within the estimate's error, and simpler or smaller")
        reasons = [f"{lead}: {rate(row.tokens_per_s)} tokens/s, MFU {share(row.get('mfu'))}, "
                   f"step {seconds(row.step_time_s)}"]
        memory = row.get("mem_total_bytes")
    if limit and pd.notna(memory):
        reasons.append(f"peak memory {gib(memory)} of the {gib(limit)} limit ({100 * (1 - memory / limit):.0f}% headroom)")
    return reasons


def _lead(ours: float, theirs: float) -> str:
    lead = 100 * (ours / theirs - 1)
    if abs(lead) < 0.05:
        return "as fast as"
    return f"{lead:.1f}% ahead of" if lead > 0 else f"{-lead:.1f}% behind"


def _differences(a: pd.Series, b: pd.Series) -> str:
    diff = [f"{key} {norm(a.get(key))} vs {norm(b.get(key))}" for key in PLAN_KEY
            if norm(a.get(key)) != norm(b.get(key))]
    return f"; it differs in {', '.join(diff)}" if diff else ""


def _column_names(top: pd.DataFrame, choice: Optional[Choice], measured: bool) -> list[str]:
    names = [f"trial {int(r.number)}" if measured else f"#{i + 1}" for i, (_, r) in enumerate(top.iterrows())]
    chosen = choice.row.name if choice is not None else None
    return [name + (" (chosen)" if idx == chosen else "") for name, idx in zip(names, top.index)]


def _top(run: Run, choice: Optional[Choice]) -> str:
    top, ranked_by = top_plans(run, 5)
    if top.empty:
        return ""
    measured = ranked_by == "measured"
    pre = "est_" if measured else ""
    names = _column_names(top, choice, measured)
    rows = [["plan"] + [row_label(r) for _, r in top.iterrows()]]
    plans = [r for _, r in top.iterrows()]
    rows += [[label] + [_plan_value(r, key) for r in plans] for label, key in _plan_rows(plans)]
    metrics = [("estimated tokens/s", pre + "tokens_per_s", rate), ("estimated memory", pre + "mem_total_bytes", gib),
               ("estimated step", pre + "step_time_s", seconds), ("estimated MFU", pre + "mfu", share)]
    if measured:
        metrics += [("measured tokens/s", "meas_tokens_per_s", rate), ("measured peak memory", "meas_peak_mem_bytes", gib),
                    ("measured step", "meas_step_time_s", seconds), ("measured MFU", "meas_mfu", share)]
    rows += [[label] + [fmt(r.get(col)) for _, r in top.iterrows()] for label, col, fmt in metrics]
    intro = []
    if measured and top.final.any():
        rows.insert(1, ["measured in"] + ["long run (finalist)" if r.final else "short run" for r in plans])
        intro = ["Finalists first, by their long runs; then the other plans by their short runs.", ""]
    return "\n".join([f"## Top plans (by {ranked_by} throughput)", "", *intro, markdown_table(rows, [""] + names)])


def _failures(run: Run) -> str:
    failed = run.trials[run.trials.status.isin((*FAILED, "pruned"))]
    lines = ["## Failed and pruned trials", ""]
    if failed.empty:
        lines.append("Every trial that ran, ran to completion.")
    else:
        rows = [[int(r.number), r.status, row_label(r), gib(r.get("est_mem_total_bytes")),
                 r.reason or r.error or "–"] for _, r in failed.iterrows()]
        lines.append(markdown_table(rows, ["trial", "status", "plan", "estimated memory", "reason"]))
    skipped = run.trials[run.trials.status == "skipped"]
    if not skipped.empty:
        reasons = skipped.reason.replace("", "no reason given").value_counts()
        lines += ["", f"{len(skipped)} trial{'s' * (len(skipped) != 1)} closed without running a plan:", ""]
        lines += [f"- {n} x {reason}" for reason, n in reasons.items()]
    return "\n".join(lines)


def _estimate_vs_measured(run: Run) -> str:
    df = run.measured
    lines = ["## Estimate vs measured", ""]
    if df.empty:
        lines.append("No trial finished, so nothing was measured to compare with.")
        return "\n".join(lines)
    rows = [[int(r.number), row_label(r), gib(r.est_mem_total_bytes), gib(r.meas_peak_mem_bytes), pct(r.mem_error_pct),
             seconds(r.est_step_time_s), seconds(r.meas_step_time_s), pct(r.time_error_pct),
             rate(r.est_tokens_per_s), rate(r.meas_tokens_per_s)] for _, r in df.iterrows()]
    lines.append(markdown_table(rows, ["trial", "plan", "est. memory", "meas. peak", "error", "est. step",
                                       "meas. step", "error", "est. tokens/s", "meas. tokens/s"]))
    errors = [f"{what} {err.abs().mean():.1f}% over {err.notna().sum()} trials"
              for what, err in (("memory", df.mem_error_pct.dropna()), ("step time", df.time_error_pct.dropna()))
              if not err.empty]
    on_cpu = (df.device.astype(str) == "cpu").all()
    measure = ("the growth of the process's resident set (on a CPU)" if on_cpu
               else "the peak allocated bytes (torch.cuda.max_memory_allocated)")
    lines += ["", ("Mean absolute error: " + "; ".join(errors) + ". " if errors else "")
              + f"Error = (estimate - measured) / measured; measured memory is {measure}, max over ranks."]
    shares = df[df.get("ran", pd.Series("as is", index=df.index)).fillna("as is") != "as is"]
    if not shares.empty:
        lines += ["", f"Trial{'s' * (len(shares) != 1)} {', '.join(str(int(n)) for n in shares.number)} ran a share "
                  "of the plan here (`ran` in trials.csv: a node share or one rank's share); their measured figures "
                  "are the share's, scaled to the plan by the estimator's ratio of the two, so their error is that "
                  "of the share's estimate against its measurement."]
    return "\n".join(lines)


def _learned(run: Run) -> str:
    """What the trials taught the estimate, factor by factor (autotune.belief), and what is untested."""
    learned = run.result.get("learned")
    if not learned:
        return ""
    lines = ["## What the trials taught the estimate", "",
             "The search models a step's time as the estimate's parts, each scaled by a factor it learns from "
             "the measured trials (a Gaussian posterior: prior, then fitted value with its spread). A factor no "
             "trial has varied keeps its prior's spread, and plans that lean on it keep a wide optimistic bound, "
             "so the estimate alone never rules them out.", ""]
    rows = [[r["factor"], r["scales"], f"{r['prior']:.3g} ± {r['prior_sd']:.2g}", f"{r['fitted']:.3g}",
             f"{r['sd']:.2g}", str(r["trials"])] for r in learned["factors"]]
    lines.append(markdown_table(rows, ["factor", "scales", "prior", "fitted", "spread", "trials"]))
    wrong = learned.get("wrong_priors") or []
    lines += ["", (f"**The estimate was wrong about: {', '.join(wrong)}** (the measurements put the fitted value "
                   "more than two spreads, and at least 0.2, from the prior)." if wrong else
                   "No factor's prior was rejected by the measurements.")]
    unmeasured = learned.get("unmeasured") or []
    if unmeasured:
        lines += ["", "Never measured (the budget ran out first): " + ", ".join(f"`{v}`" for v in unmeasured)
                  + ". Plans with these values rest on the estimate alone."]
    return "\n".join(lines)


def _short_vs_long(run: Run) -> str:
    tau = run.kendall_tau
    finals = run.measured[run.measured.final]
    if tau is None and finals.empty:
        return ""
    lines = ["## Short runs vs long runs", ""]
    if tau is not None:
        lines.append(f"Kendall tau between the finalists' ranking by their short runs and by their long runs: "
                     f"**{tau:.2f}** (1: the short runs ranked them as the long runs did; -1: in reverse)"
                     + (f", over {run.result['kendall_pairs']} finalists." if run.result.get("kendall_pairs") else "."))
    short = run.measured[~run.measured.final]
    rows = []
    for _, final in finals.iterrows():
        match = match_plan(short, final)
        rows.append([row_label(final), rate(match.meas_tokens_per_s.max()) if not match.empty else "–",
                     rate(final.meas_tokens_per_s)])
    if rows:
        lines += ["", markdown_table(rows, ["finalist", "short run tokens/s", "long run tokens/s"])]
    return "\n".join(lines)


def _analytic(run: Run, choice: Optional[Choice]) -> str:
    ranked = ranked_candidates(run)
    if ranked is None or ranked.empty or choice is None:
        return ""
    top = ranked.head(5)
    names = _column_names(top, choice, measured=False)
    mem_cols, time_cols = component_columns(top, "", "mem"), component_columns(top, "", "time")
    rows = [["plan"] + [row_label(r) for _, r in top.iterrows()]]
    rows += [[f"memory: {component_name(c)}"] + [gib(v) for v in top[c]] for c in mem_cols]
    rows += [["memory: total"] + [gib(v) for v in top.mem_total_bytes]]
    rows += [[f"time: {component_name(c)}"] + [seconds(v) for v in top[c]] for c in time_cols]
    rows += [["step time"] + [seconds(v) for v in top.step_time_s], ["tokens/s"] + [rate(v) for v in top.tokens_per_s]]
    lines = ["## Top plans by estimate: breakdown", "", "Analytic run: every figure here is modelled, none measured.",
             "", markdown_table(rows, [""] + names), "", "### Why it wins", ""]
    win = choice.row
    others = ranked.drop(index=win.name, errors="ignore")
    if not others.empty:
        second = others.iloc[0]
        rank = f"#{ranked.index.get_loc(second.name) + 1}"
        lead = 100 * (win.tokens_per_s / second.tokens_per_s - 1)
        if abs(lead) < 0.05:
            lines.append(f"- ties with {rank} ({row_label(second)}) on estimated throughput; that plan needs "
                         f"{gib(second.mem_total_bytes)} against {gib(win.mem_total_bytes)}{_differences(win, second)}.")
        else:
            lines.append(f"- {_lead(win.tokens_per_s, second.tokens_per_s)} {rank} ({row_label(second)}) on "
                         f"estimated throughput{_differences(win, second)}.")
        for col in time_cols:
            if abs(second[col] - win[col]) > 0.001 * second.step_time_s:
                lines.append(f"- {component_name(col)}: {seconds(win[col])} vs {seconds(second[col])} for {rank}")
    cand = run.candidates
    faster = cand[(cand.tokens_per_s > win.tokens_per_s) & ~cand.fits] if "fits" in cand else cand.iloc[:0]
    if not faster.empty:
        best = faster.loc[faster.tokens_per_s.idxmax()]
        lines.append(f"- {len(faster)} plans with a higher estimate do not fit; the fastest ({row_label(best)}, "
                     f"{rate(best.tokens_per_s)} tokens/s) needs {gib(best.mem_total_bytes)}"
                     + (f" of {gib(run.memory_limit_bytes)}" if run.memory_limit_bytes else ""))
    return "\n".join(lines)


def _measured_and_modelled(run: Run) -> str:
    lines = ["## What was measured and what was modelled", ""]
    given = False
    for key, title in (("measured", "Measured"), ("modelled", "Modelled")):
        value = run.search.get(key)
        if value:
            given = True
            items = value if isinstance(value, list) else (
                [f"{k}: {v}" for k, v in value.items()] if isinstance(value, dict) else [value])
            lines += [f"{title}:", ""] + [f"- {item}" for item in items] + [""]
    if not given:
        if run.measured.empty:
            lines.append("Everything is modelled: no trial was measured.")
        else:
            devices = ", ".join(sorted({str(d) for d in run.measured.device.dropna()})) or "this machine"
            lines.append(f"Step time, throughput and peak memory of each finished trial were measured by the probe "
                         f"on {devices}; the other candidates' figures are modelled.")
    return "\n".join(lines).rstrip()


def _candidates(run: Run) -> str:
    cand = run.candidates
    if cand is None or cand.empty:
        return ""
    lines = ["## Candidates", "", f"{len(cand)} plans enumerated (`candidates.csv`)."]
    if "dropped" in cand:
        kept = int((cand.dropped == "").sum())
        counts = cand.dropped[cand.dropped != ""].value_counts()
        lines[-1] += f" {kept} kept; dropped: " + (", ".join(f"{n} {why}" for why, n in counts.items()) or "none") + "."
        if "plan_id" in cand:
            dominated = (run.search.get("plans") or {}).get("dominated") or \
                "dominated by plan N: plan N fits in no more memory and is estimated faster"
            lines.append(f"Its `dropped` and `why` columns say why a plan was left out: does not fit (what it needs "
                         f"against the limit), or {dominated} (N is the `plan_id` column).")
        over = cand[cand.dropped == "does not fit"]
        if not over.empty and "mem_total_bytes" in over:
            small = over.loc[over.mem_total_bytes.idxmin()]
            lines.append(f"The smallest plan that does not fit is {row_label(small)}: "
                         + (small.why if small.get("why") else f"{gib(small.mem_total_bytes)}") + ".")
    return "\n".join(lines)


def _plots(plots: dict[str, str]) -> str:
    if not plots:
        return ""
    return "\n\n".join(["## Plots"] + [f"### {title}\n\n![{title}]({path})" for title, path in plots.items()])
