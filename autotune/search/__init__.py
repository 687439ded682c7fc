"""`autotune search`: the fastest plan that fits, found by the estimator and confirmed by real runs.

    autotune search [--out DIR] [--name NAME] model=... cluster=... job.global_batch=... search.*=...

1. Enumerate every valid plan (autotune.plans), estimate each (autotune.estimate.estimate_frame)
   and drop what cannot fit or is dominated; all of it goes to candidates.csv with the reason
   (candidates.py).
2. `search.mode=analytic` (the default for a catalog cluster, one you need not have): the best
   estimate is the answer. `search.mode=measure` (default for cluster=local): an Optuna study
   whose trials are real probe runs (autotune.runner), one process each (loop.py):
   - guided trials take the best plan by the current estimate (enqueued with study.enqueue_trial);
     after the first few they alternate with the sampler's proposals (TPE by default), snapped to
     the nearest plan still to run (proposals.py);
   - a plan whose optimistic estimate cannot beat the best measured objective is not run
     (recorded "skipped"); when no plan left can, the search stops (guidance.py);
   - every measured trial recalibrates the estimator (fit_calibration), and the recalibrated
     estimates rank what is left;
   - the probe's per-step progress feeds trial.report / should_prune (Hyperband by default);
   - the finalists (search.finalists) rerun with search.final_steps; Kendall's tau says how well
     the short runs ranked them.
   When the cluster is larger than what a trial may use here (cluster=local with cluster.nodes=N
   or more GPUs per node than this machine has; a catalog cluster, measured on a local GPU of its
   kind), a trial runs its plan's share here (autotune.local_share: the plan as is, its tp x pp
   with the data-parallel replicas that fit, or one rank's share on one device) and the
   estimator's ratio of the whole plan to that share carries the measured step time and memory
   to the cluster (trial.py); each trial says so ("ran", "scaled"), and search.json says what was
   measured and what modelled.
3. Outputs (command.py): best.yaml, ds_config.json, launch.sh (autotune.emit), trials.csv,
   report.md, plots (autotune.reports.build_report), search.json, profile.json, logs/trial-<n>.log.

The study. Storage: autotune.storage (`<run_dir>/study.db`, a SQLAlchemy URL, or a journal file,
what several local search processes should share). Study name = run name. The params of a trial
are the plan fields that vary among the valid plans. Every trial carries user_attrs, one
TrialRecord (record.py): plan, estimate (of the whole plan), probe (the probe's JSON, or None),
step_times_s (each measured step), status (ok|oom|error|timeout|pruned|skipped), reason, final,
source (estimate|sampler|sampler (nearest)|finalist), ran (plan, job and model run here, its kind
and note), scaled (a share's measurement carried to the plan), steps, reused; and the claim
bookkeeping (claim, worker, heartbeat, confirmed: study.py). Rerunning the same command continues
the study; two processes on one storage share it, and the claims see that no plan runs twice.

The probe hook. `Search(..., probe=fn)` (and `command.search(pc, run_dir, name, probe=fn)`) runs
each trial's probe through `fn`, called as autotune.runner.run_probe is:

    fn(train: TrainConfig, trial_dir: Path, *, steps, warmup, timeout_s, memory_cap_bytes,
       on_progress, on_poll, log_path) -> ProbeRun

`train` is what runs here (the plan, or its share). A fake probe calls `on_progress(step,
step_time_s)` for each step (steps numbered from 0, the warmup first; True back means: stop, the
trial is pruned, return ProbeRun("pruned", ...)), may call `on_poll()`, and returns a ProbeRun:
status, metrics (the probe's JSON: at least step_time_s, tokens_per_s and peak_mem_bytes when ok),
reason, wall_s, and steps (the {"step", "step_time_s"} rows it reported), from which the record
takes the measured per-step times. Tests use it to check the search's logic without a real run.

search.json: name, study_name, storage (its password masked: autotune.storage), mode, objective,
config (model, job, plan, cluster, search), params (the model's total, active per token and
routed-expert parameters), hardware (Hardware.to_dict), memory_limit_bytes, counts of plans,
`measured` and `modelled` (what this run's numbers rest on), and `result` (best plan, its trial,
value, Kendall tau, why the search stopped) once it has one.
"""
