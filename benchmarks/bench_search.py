"""How fast `autotune search` finds a near-best plan, against the exhaustive grid and two baselines.

On one GPU, for each model with a fixed global batch:
1. the grid: every valid single-GPU plan of the search space (autotune.plans, the precisions given)
   measured once with the probe (results kept in <out>/<model>/grid.jsonl, so a rerun resumes);
2. `autotune search` (estimator-guided), plain Optuna TPE without the estimator
   (search.use_estimator=false) and random search (the same, search.sampler=random), each with
   the same trial budgets and seeds;
3. for each run: the number of probe trials and the wall time (from its first trial's start; the
   search's own setup, seconds, is not counted) until a trial measured at least 97% of the grid's
   best throughput.

    python benchmarks/bench_search.py --models gpt2-medium llama-3.2-1b --global-batch 16 \
        --seq-len 1024 --budgets 8 16 --seeds 0 1 2

Writes <out>/results.json (with the device that measured it) and prints the Markdown table for
BENCHMARKS.md. The grid is the slow part (a few hundred probes per model); --grid-limit measures a
seeded random sample of that many grid plans instead (the 97% target is then relative to the
partial grid, and the table says so). A search that fails is recorded as such and the rest go on.

    python benchmarks/bench_search.py --models tiny --global-batch 4 --seq-len 32 --budgets 1 \
        --seeds 0 --grid-limit 2 --out /tmp/s   # a smoke run on the CPU
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
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
    p.add_argument("--models", nargs="+", default=["gpt2-medium", "llama-3.2-1b"])
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--precisions", nargs="+", default=["bf16"], help="search.precisions of grid and searches")
    p.add_argument("--budgets", nargs="+", type=int, default=[8, 16], help="search.trials of each search")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--probe-steps", type=int, default=3)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--trial-timeout", type=float, default=300.0)
    p.add_argument("--grid-limit", type=int, default=None,
                   help="measure a seeded random sample of this many grid plans, not all of them")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "search"))
    return p.parse_args(argv)


def overrides(args: argparse.Namespace, model: str) -> list[str]:
    return [f"model={model}", "cluster=local", f"job.global_batch={args.global_batch}",
            f"job.seq_len={args.seq_len}", f"search.precisions=[{','.join(args.precisions)}]",
            f"search.probe_steps={args.probe_steps}", f"search.warmup_steps={args.warmup_steps}",
            f"search.trial_timeout_s={args.trial_timeout}", "search.finalists=0", "search.mode=measure"]


def run_grid(args: argparse.Namespace, model: str, folder: Path) -> tuple[list[dict[str, Any]], str]:
    """Every valid plan measured once, and the device that measured them. Resumable: plans already
    in grid.jsonl, measured with the same settings, are not rerun."""
    import torch

    from autotune.config import planner_config
    from autotune.hardware import load_hardware
    from autotune.engine.config import with_changes
    from autotune.plans import enumerate_plans, plan_from_row, plan_key, plan_values
    from autotune.runner import run_probe
    from autotune.hardware import supported_precisions

    pc = planner_config(overrides(args, model))
    hw = load_hardware(pc.cluster)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the hardware probe's buffers: leave the GPU's memory to the plans
    plans = enumerate_plans(pc.train, pc.cluster, pc.search, device=hw.device, precisions=supported_precisions(hw))
    if args.grid_limit is not None and args.grid_limit < len(plans):
        plans = plans.sample(n=args.grid_limit, random_state=0)  # a spread of the space, not its first corner
    settings = {"overrides": overrides(args, model), "device": hw.gpu}
    path = folder / "grid.jsonl"
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row.get("settings") == settings:
                done[row["key"]] = row
    rows = [plan_from_row(r) for r in plans.to_dict("records")]
    for i, plan in enumerate(rows):
        key = plan_key(plan)
        if key in done:
            continue
        train = with_changes(pc.train, plan=plan)
        run = run_probe(train, folder / "grid" / str(i), steps=args.probe_steps, warmup=args.warmup_steps,
                        timeout_s=args.trial_timeout)
        tps = run.metrics.get("tokens_per_s") if run.status == "ok" and run.metrics else None
        done[key] = {"key": key, "plan": plan_values(plan), "status": run.status, "tokens_per_s": tps, "wall_s": run.wall_s,
                     "peak_mem_bytes": (run.metrics or {}).get("peak_mem_bytes"), "settings": settings}
        with open(path, "a") as f:
            f.write(json.dumps(done[key]) + "\n")
        print(f"[grid {model}] {i + 1}/{len(rows)} {run.status} {tps or 0:.0f} tokens/s", file=sys.stderr, flush=True)
    return [done[plan_key(p)] for p in rows], hw.gpu


def run_search(args: argparse.Namespace, model: str, method: str, budget: int, seed: int, folder: Path) -> Path:
    """One `autotune search` in its own process; raises RuntimeError when it fails or hangs."""
    out = folder / f"{method}-b{budget}-s{seed}"
    cmd = [sys.executable, "-m", "autotune", "search", "--out", str(out), *overrides(args, model),
           f"search.trials={budget}", f"search.seed={seed}", *METHODS[method]]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    try:  # every trial may take its whole timeout; the search's own setup is minutes at most
        done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=budget * args.trial_timeout + 600)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{' '.join(cmd)} did not finish in {budget * args.trial_timeout + 600:.0f} s") from None
    if done.returncode not in (0, 1):  # 1: no trial succeeded, still a result
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return out


def time_to_target(run_dir: Path, target: float) -> dict[str, Any]:
    """Probe trials run and seconds spent until a trial measured >= target tokens/s."""
    import optuna

    info = json.loads((run_dir / "search.json").read_text())
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=info["study_name"], storage=info["storage"])
    trials = sorted((t for t in study.trials if t.user_attrs.get("status") in ("ok", "oom", "error", "timeout", "pruned")
                     and t.user_attrs.get("claim")), key=lambda t: t.number)
    start = min((t.datetime_start for t in study.trials if t.datetime_start), default=None)
    best = 0.0
    for n, t in enumerate(trials, 1):
        if t.user_attrs["status"] == "ok":
            best = max(best, (t.user_attrs.get("probe") or {}).get("tokens_per_s") or 0.0)
        if best >= target:
            return {"reached": True, "trials": n, "wall_s": (t.datetime_complete - start).total_seconds(), "best": best}
    return {"reached": False, "trials": len(trials), "wall_s": None, "best": best}


def main(argv: list[str] | None = None) -> int:
    from autotune.engine.files import write_atomic

    args = parse_args(argv)
    out = Path(args.out)
    results: dict[str, Any] = {"args": vars(args), "device": None, "models": {}}
    for model in args.models:
        folder = out / model
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        grid, results["device"] = run_grid(args, model, folder)
        ok = [g for g in grid if g["tokens_per_s"]]
        if not ok:
            print(f"{model}: no grid plan ran; skipped", file=sys.stderr)
            continue
        grid_best = max(g["tokens_per_s"] for g in ok)
        entry = {"grid": {"plans": len(grid), "ok": len(ok), "best_tokens_per_s": grid_best,
                          "wall_s": sum(g["wall_s"] for g in grid), "partial": args.grid_limit is not None,
                          "bench_wall_s": time.monotonic() - t0},
                 "runs": []}
        for method in args.methods:
            for budget in args.budgets:
                for seed in args.seeds:
                    try:
                        got = time_to_target(run_search(args, model, method, budget, seed, folder), TARGET * grid_best)
                    except RuntimeError as e:  # one failed search is a row, not the end of the benchmark
                        got = {"reached": False, "trials": None, "wall_s": None, "best": None, "error": str(e)[-2000:]}
                    entry["runs"].append({"method": method, "budget": budget, "seed": seed, **got})
                    print(f"[{model}] {method} budget {budget} seed {seed}: {got}", file=sys.stderr, flush=True)
                    results["models"][model] = entry
                    write_atomic(out / "results.json", json.dumps(results, indent=2, default=str) + "\n")
        results["models"][model] = entry
        write_atomic(out / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    print(markdown(results))
    return 0


def markdown(results: dict[str, Any]) -> str:
    lines = [f"device: {results['device']}. Trials and wall time until a trial reaches {TARGET:.0%} of the grid's "
             "best throughput (median over seeds, of the seeds that reached it; failed: searches that errored).", "",
             "| model | grid plans (ok) | grid best tokens/s | method | budget | reached | trials | wall s | best / grid |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model, entry in results["models"].items():
        g = entry["grid"]
        groups: dict[tuple, list] = {}
        for r in entry["runs"]:
            groups.setdefault((r["method"], r["budget"]), []).append(r)
        for (method, budget), runs in groups.items():
            hit = [r for r in runs if r["reached"]]
            failed = sum("error" in r for r in runs)
            trials = statistics.median(r["trials"] for r in hit) if hit else "-"
            wall = f"{statistics.median(r['wall_s'] for r in hit):.0f}" if hit else "-"
            bests = [r["best"] / g["best_tokens_per_s"] for r in runs if r["best"] is not None]
            ratio = f"{statistics.median(bests):.3f}" if bests else "-"
            lines.append(f"| {model} | {g['plans']} ({g['ok']}){' partial' if g['partial'] else ''} | "
                         f"{g['best_tokens_per_s']:,.0f} | {method} | {budget} | {len(hit)}/{len(runs)}"
                         f"{f' ({failed} failed)' if failed else ''} | {trials} | {wall} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
