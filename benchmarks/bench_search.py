"""How soon `autotune search` finds a near-best plan, against its exhaustive grid and two baselines.

For each model, on this machine's one device (a GPU, or the CPU: the CPU is a device too):
1. the grid: every valid plan of the search space measured `--repeats` times with the probe (each
   run its own process; kept in <out>/<model>/grid.jsonl, so a rerun resumes). A plan's value is
   the median of its runs; the spread between runs is the noise the searches face;
2. the searches: `autotune search` (estimator-guided), plain Optuna TPE without the estimator
   (search.use_estimator=false) and random search (the same with search.sampler=random), each at
   budgets of `--budgets` (fractions of the grid, or trial counts) and `--seeds`. The searches
   replay the grid through the search's probe hook: a trial of a plan gets one of that plan's
   measured runs (step by step, so the pruner acts as it would), another run for a finalist. Every
   method thus faces the same measured world, and a benchmark of 18 searches takes minutes, not
   hours. Everything else (the device prior, the estimates, the study) is the real search's;
3. per search: the trials until one measured a plan worth at least 97% of the grid's best (by the
   plan's grid value), and the final pick's grid value over the grid's best; with --remeasure,
   each distinct final pick is measured again (`--repeats` fresh probes), its value over the
   grid's best.

    python benchmarks/bench_search.py --models tiny llama-20m --global-batch 8 4 --seq-len 64 256 \\
        --budgets 0.10 0.25 --seeds 0 1 2 --repeats 2 --remeasure --out benchmarks/results/search-cpu

Writes <out>/results.json (with the device and versions) and prints the Markdown table for
BENCHMARKS.md. --grid-limit measures a seeded random sample of that many plans instead (the 97%
target is then relative to the partial grid, and the table says so).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

METHODS = {
    "autotune": [],
    "optuna-tpe": ["search.use_estimator=false"],
    "random": ["search.use_estimator=false", "search.sampler=random"],
}
TARGET = 0.97


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--models", nargs="+", default=["tiny", "llama-20m"])
    p.add_argument("--global-batch", nargs="+", type=int, default=[8], help="one, or one per model")
    p.add_argument("--seq-len", nargs="+", type=int, default=[64], help="one, or one per model")
    p.add_argument("--precisions", nargs="+", default=None, help="search.precisions (default: the search's)")
    p.add_argument("--budgets", nargs="+", type=float, default=[0.10, 0.25],
                   help="search.trials of each search: a fraction of the grid (< 1) or a count")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--repeats", type=int, default=2, help="probe runs of each grid plan (and of each remeasured pick)")
    p.add_argument("--probe-steps", type=int, default=3)
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--trial-timeout", type=float, default=300.0)
    p.add_argument("--grid-limit", type=int, default=None,
                   help="measure a seeded random sample of this many grid plans, not all of them")
    p.add_argument("--remeasure", action="store_true", help="probe each distinct final pick again")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "search"))
    return p.parse_args(argv)


def job_of(args: argparse.Namespace, i: int) -> tuple[int, int]:
    """(global batch, seq len) of the i-th model."""
    pick = lambda values: values[i] if len(values) > 1 else values[0]  # noqa: E731
    return pick(args.global_batch), pick(args.seq_len)


def overrides(args: argparse.Namespace, model: str, i: int) -> list[str]:
    batch, seq = job_of(args, i)
    out = [f"model={model}", "cluster=local", f"job.global_batch={batch}", f"job.seq_len={seq}",
           f"search.probe_steps={args.probe_steps}", f"search.warmup_steps={args.warmup_steps}",
           f"search.trial_timeout_s={args.trial_timeout}", "search.mode=measure"]
    return out + ([f"search.precisions=[{','.join(args.precisions)}]"] if args.precisions else [])


def grid_plans(pc) -> tuple[list, Any]:
    """Every valid plan of `pc`'s search space on this machine, and the machine."""
    from autotune.hardware import load_hardware, supported_precisions
    from autotune.plans import enumerate_plans, plan_from_row

    hw = load_hardware(pc.cluster)
    plans = enumerate_plans(pc.train, pc.cluster, pc.search, device=hw.device, precisions=supported_precisions(hw))
    return [plan_from_row(r) for r in plans.to_dict("records")], hw


def probe_runs(train, folder: Path, args: argparse.Namespace, n: int) -> list[dict[str, Any]]:
    """`n` fresh probe runs of `train`: status, per-step times (warm-up included), metrics."""
    from autotune.runner import run_probe

    runs = []
    for r in range(n):
        run = run_probe(train, folder / str(r), steps=args.probe_steps, warmup=args.warmup_steps,
                        timeout_s=args.trial_timeout)
        runs.append({"status": run.status, "metrics": run.metrics, "steps": run.steps, "wall_s": run.wall_s,
                     "reason": run.reason})
    return runs


def value(runs: list[dict[str, Any]]) -> float | None:
    """A plan's grid value: the median tokens/s of its runs that finished (None if none did)."""
    ok = [r["metrics"]["tokens_per_s"] for r in runs if r["status"] == "ok"]
    return statistics.median(ok) if ok else None


def run_grid(args: argparse.Namespace, pc, folder: Path) -> tuple[dict[str, dict[str, Any]], str]:
    """Every plan's runs, by plan key; resumable (plans in grid.jsonl with the same settings stay)."""
    import random

    from autotune.engine.config import with_changes
    from autotune.plans import plan_from_row, plan_key, plan_values

    plans, hw = grid_plans(pc)
    if args.grid_limit is not None and args.grid_limit < len(plans):
        plans = random.Random(0).sample(plans, args.grid_limit)  # a spread of the space, not its first corner
    settings = {"probe_steps": args.probe_steps, "warmup_steps": args.warmup_steps, "device": hw.gpu,
                "job": [pc.job.global_batch, pc.job.seq_len], "repeats": args.repeats}
    path = folder / "grid.jsonl"
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row.get("settings") == settings:  # keyed anew: a plan field added since keeps its default
                row["key"] = plan_key(plan_from_row(row["plan"]))
                done[row["key"]] = row
    for i, plan in enumerate(plans):
        key = plan_key(plan)
        if key not in done:
            runs = probe_runs(with_changes(pc.train, plan=plan), folder / "grid" / str(i), args, args.repeats)
            done[key] = {"key": key, "plan": plan_values(plan), "runs": runs, "value": value(runs), "settings": settings}
            with open(path, "a") as f:
                f.write(json.dumps(done[key], default=str) + "\n")
        print(f"[grid {pc.model.name}] {i + 1}/{len(plans)} {done[key]['value'] or 0:,.0f} tokens/s",
              file=sys.stderr, flush=True)
    return {plan_key(p): done[plan_key(p)] for p in plans}, hw.gpu


class ReplayProbe:
    """The search's probe hook answered from the grid: the n-th trial of a plan gets its run
    (seed + n) mod repeats, step by step through on_progress; a plan outside the grid is an error."""

    def __init__(self, grid: dict[str, dict[str, Any]], seed: int):
        self.grid, self.seed, self.calls = grid, seed, {}

    def __call__(self, train, trial_dir: Path, *, steps: int, warmup: int, timeout_s: float,
                 memory_cap_bytes=None, on_progress=None, on_poll=None, log_path=None):
        from autotune.plans import plan_key
        from autotune.runner import ProbeRun

        key = plan_key(train.plan)
        if key not in self.grid:
            return ProbeRun("error", None, "not in the measured grid", 0.0, [], "")
        n = self.calls[key] = self.calls.get(key, -1) + 1
        runs = self.grid[key]["runs"]
        run = runs[(self.seed + n) % len(runs)]
        for row in run["steps"]:
            if on_progress is not None and on_progress(int(row["step"]), float(row["step_time_s"])):
                return ProbeRun("pruned", None, "pruned (replayed)", run["wall_s"], run["steps"], "")
        return ProbeRun(run["status"], run["metrics"], run["reason"], run["wall_s"], run["steps"], "")


def replay_search(args: argparse.Namespace, model: str, i: int, method: str, budget: int, seed: int,
                  grid: dict[str, dict[str, Any]], folder: Path) -> dict[str, Any]:
    """One search replaying the grid; its trial order, pick and stop reason."""
    import optuna

    from autotune.config import planner_config
    from autotune.plans import plan_from_row, plan_key
    from autotune.search.command import search

    out = folder / f"{method}-b{budget}-s{seed}"
    pc = planner_config([*overrides(args, model, i), f"search.trials={budget}", f"search.seed={seed}",
                         f"search.storage={out / 'study.journal'}", *METHODS[method]])
    out.mkdir(parents=True, exist_ok=True)
    search(pc, out, out.name, probe=ReplayProbe(grid, seed))
    info = json.loads((out / "search.json").read_text())
    study = optuna.load_study(study_name=info["study_name"], storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "study.journal"))))
    ran = [t for t in sorted(study.trials, key=lambda t: t.number)
           if t.user_attrs.get("claim") and not t.user_attrs.get("final")
           and t.user_attrs.get("status") in ("ok", "oom", "error", "timeout", "pruned")]
    best = (info.get("result") or {}).get("best")
    return {"order": [plan_key(plan_from_row(t.user_attrs["plan"])) for t in ran],
            "pick": plan_key(plan_from_row(best["plan"])) if best else None,
            "stopped": (info.get("result") or {}).get("stopped")}


def score(run: dict[str, Any], grid: dict[str, dict[str, Any]], best: float) -> dict[str, Any]:
    """Trials until a plan worth TARGET of the grid's best was measured, and the pick's grid value."""
    worth = lambda key: grid.get(key, {}).get("value") or 0.0  # noqa: E731  (a plan off a partial grid: 0)
    reached = next((n for n, key in enumerate(run["order"], 1) if worth(key) >= TARGET * best), None)
    return {"trials": len(run["order"]), "reached_at": reached, "pick_over_best": worth(run["pick"]) / best}


def remeasure(args: argparse.Namespace, pc, picks: set[str], grid: dict[str, dict[str, Any]], folder: Path) -> dict[str, float]:
    """Each distinct pick measured again: the median tokens/s of fresh probe runs, by plan key."""
    from autotune.engine.config import with_changes
    from autotune.plans import plan_from_row

    again = {}
    for n, key in enumerate(sorted(picks)):
        train = with_changes(pc.train, plan=plan_from_row(grid[key]["plan"]))
        again[key] = value(probe_runs(train, folder / "again" / str(n), args, args.repeats)) or 0.0
    return again


def bench_model(args: argparse.Namespace, model: str, i: int, out: Path) -> dict[str, Any]:
    from autotune.config import planner_config

    folder = out / model
    folder.mkdir(parents=True, exist_ok=True)
    pc = planner_config(overrides(args, model, i))
    grid, device = run_grid(args, pc, folder)
    values = [g["value"] for g in grid.values() if g["value"]]
    best = max(values)
    runs = []
    for method in args.methods:
        for budget in args.budgets:
            trials = max(1, math.ceil(budget * len(grid))) if budget < 1 else int(budget)
            for seed in args.seeds:
                run = replay_search(args, model, i, method, trials, seed, grid, folder)
                runs.append({"method": method, "budget": budget, "trials_budget": trials, "seed": seed, **run,
                             **score(run, grid, best)})
                print(f"[{model}] {method} budget {trials} seed {seed}: {runs[-1]['reached_at']} "
                      f"{runs[-1]['pick_over_best']:.3f}", file=sys.stderr, flush=True)
    if args.remeasure:
        again = remeasure(args, pc, {r["pick"] for r in runs if r["pick"] in grid}, grid, folder)
        for r in runs:
            r["pick_again_over_best"] = again.get(r["pick"], 0.0) / best
    return {"device": device, "job": list(job_of(args, i)), "grid": {
        "plans": len(grid), "ok": len(values), "best_tokens_per_s": best, "partial": args.grid_limit is not None,
        "run_to_run_median": run_to_run(grid),
        "probe_wall_s": sum(r["wall_s"] for g in grid.values() for r in g["runs"])}, "runs": runs}


def run_to_run(grid: dict[str, dict[str, Any]]) -> float | None:
    """The median relative difference between the first two finished runs of each plan."""
    gaps = []
    for g in grid.values():
        tps = [r["metrics"]["tokens_per_s"] for r in g["runs"] if r["status"] == "ok"]
        if len(tps) >= 2:
            gaps.append(abs(tps[0] - tps[1]) / max(tps[0], tps[1]))
    return statistics.median(gaps) if gaps else None


def main(argv: list[str] | None = None) -> int:
    import torch

    from autotune.engine.files import write_atomic

    args = parse_args(argv)
    out = Path(args.out).resolve()  # the search resolves its storage against the run folder
    results: dict[str, Any] = {"args": vars(args), "date": time.strftime("%Y-%m-%d"), "device": None,
                               "versions": {"torch": torch.__version__, "python": platform.python_version()},
                               "models": {}}
    for i, model in enumerate(args.models):
        results["models"][model] = bench_model(args, model, i, out)
        results["device"] = results["models"][model]["device"]
        write_atomic(out / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    print(markdown(results))
    return 0


def markdown(results: dict[str, Any]) -> str:
    lines = [f"device: {results['device']} ({results['date']}, torch {results['versions']['torch']}). Per method and "
             f"budget, over seeds: trials until a trial measured a plan worth {TARGET:.0%} of the grid's best (median, "
             "of the seeds that got there), the final pick's grid value over the grid's best (worst and median), and "
             "the pick measured again over the grid's best (worst).", "",
             "| model (job) | grid plans | grid best tokens/s | run-to-run | method | budget | reached | trials to 97% "
             "| pick / best (worst, median) | again / best (worst) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for model, entry in results["models"].items():
        g = entry["grid"]
        groups: dict[tuple, list] = {}
        for r in entry["runs"]:
            groups.setdefault((r["method"], r["trials_budget"]), []).append(r)
        for (method, budget), runs in groups.items():
            hit = [r["reached_at"] for r in runs if r["reached_at"]]
            picks = [r["pick_over_best"] for r in runs]
            again = [r["pick_again_over_best"] for r in runs if "pick_again_over_best" in r]
            noise = f"{g['run_to_run_median']:.1%}" if g["run_to_run_median"] is not None else "-"
            lines.append(
                f"| {model} (gb {entry['job'][0]}, s {entry['job'][1]}) | {g['plans']}{' (partial)' if g['partial'] else ''} "
                f"| {g['best_tokens_per_s']:,.0f} | {noise} | {method} | {budget} | {len(hit)}/{len(runs)} | "
                f"{statistics.median(hit) if hit else '-'} | {min(picks):.3f}, {statistics.median(picks):.3f} | "
                f"{f'{min(again):.3f}' if again else '-'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
