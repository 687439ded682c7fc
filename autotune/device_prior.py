"""The engine's own speed on this device: the prior of the step-time model for `cluster=local`.

`autotune.hardware.probe_local` measures what a large matmul and SDPA reach and how fast memory
copies. A training step of the engine is more than that. On the 2-core CPU of this project's CI a
bf16 matmul runs faster than an fp32 one, yet the engine's bf16 step runs about 1.7 times slower
(autocast's casts, the norms and the loss in fp32); and a small model's step is mostly the
dispatch of hundreds of small ops, which a matmul's rate does not see. So for a local device the
forward and backward of one block of the job's own model (with its embedding, head and loss) are
timed, as the engine runs them, at two micro-batch sizes in every precision the device computes
in (and each kernel choice where Triton runs), and fitted as

    measured(b) = compute_scale[precision/kernels] * modelled_compute(b) + ops(b) * dispatch_s

with the estimator's own modelled compute and op count of that model. `dispatch_s` becomes the
device's time per dispatched op, `compute_scale` what each precision's (and kernels') modelled
compute is multiplied by (docs/formulas.md [Calibration]). The search's per-factor belief
(autotune.belief) starts from these and learns the rest from its trials.
"""
from __future__ import annotations

import dataclasses
import functools
import time

import numpy as np
import torch

from autotune.engine.config import JobConfig, ModelConfig, PlanConfig, TrainConfig
from autotune.hardware import Hardware

BATCHES = (1, 4)  # micro-batch sizes timed: dispatch dominates the first, compute the second
REPS = 5  # timed runs per shape; the fastest counts (a shared machine only ever slows a run down)
TARGET_S = 0.05  # the larger shape's modelled compute is kept near this (seconds per run)


def _time_block(model_cfg: ModelConfig, precision: str, kernels: str, batch: int, seq: int, device: str) -> float:
    """Fastest of REPS forward + backward passes of `model_cfg` as the engine runs it at ZeRO-0."""
    from autotune.engine.model import build_model
    from autotune.engine.parallel import autocast

    plan = PlanConfig(precision=precision, kernels=kernels, micro_batch=batch)
    model = build_model(model_cfg, device=device, seed=0, kernels=kernels)
    tokens = torch.randint(0, model_cfg.vocab_size, (batch, seq + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def run() -> None:
        with autocast(plan, torch.device(device)):
            loss = model(inputs, targets)
        loss.backward()
        model.zero_grad(set_to_none=True)

    run()  # warm-up: allocator, autotuning, Triton's compilation
    best = float("inf")
    for _ in range(REPS):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def _modelled(model_cfg: ModelConfig, precision: str, kernels: str, batch: int, seq: int, hw: Hardware) -> tuple[float, float]:
    """The estimator's (compute seconds, dispatched ops) of one forward + backward of `model_cfg`."""
    from autotune.estimate import estimate

    train = TrainConfig(model=model_cfg, job=JobConfig(seq_len=seq, global_batch=batch),
                        plan=PlanConfig(precision=precision, kernels=kernels, micro_batch=batch))
    # unit dispatch time and no scale: the overhead term is then the op count, compute unscaled
    counting = dataclasses.replace(hw, dispatch_s=1.0, compute_scale={})
    est = estimate(train, counting)
    return est.time["forward_s"] + est.time["backward_s"], est.time["overhead_s"]


def _prior_model(model: ModelConfig, seq: int, hw: Hardware) -> tuple[ModelConfig, int]:
    """One block of `model` and a sequence length whose larger shape takes about TARGET_S."""
    block = dataclasses.replace(model, n_layers=1, hf_config=None, init_from=None)
    while seq > 16:
        compute, _ = _modelled(block, "fp32", "torch", BATCHES[-1], seq, hw)
        if compute <= TARGET_S:
            break
        seq //= 2
    return block, seq


@functools.cache
def _measure(model: ModelConfig, seq: int, hw: Hardware, choices: tuple[tuple[str, str], ...]) -> tuple[float, dict[str, float]]:
    block, seq = _prior_model(model, seq, hw)
    rows, measured, keys = [], [], []
    for precision, kernels in choices:
        for batch in BATCHES:
            compute, ops = _modelled(block, precision, kernels, batch, seq, hw)
            rows.append((compute, ops, len(keys)))
            measured.append(_time_block(block, precision, kernels, batch, seq, hw.device))
        keys.append(f"{precision}/{kernels}")
    # least squares in (dispatch_s, one scale per choice): columns ops and compute-by-choice
    a = np.zeros((len(rows), 1 + len(keys)))
    for i, (compute, ops, k) in enumerate(rows):
        a[i, 0], a[i, 1 + k] = ops, compute
    coef, *_ = np.linalg.lstsq(a, np.array(measured), rcond=None)
    dispatch = float(max(coef[0], 0.0))
    scales = {key: float(np.clip(c, 0.05, 20.0)) for key, c in zip(keys, coef[1:])}
    return dispatch, scales


def with_engine_prior(hw: Hardware, model: ModelConfig, seq_len: int, precisions: list[str]) -> Hardware:
    """`hw` (a probed local device) with the dispatch time and compute scales measured on the
    engine's own block of `model` (see the module docstring)."""
    kernels = ["torch", "triton"] if hw.device == "cuda" else ["torch"]
    choices = tuple((p, k) for p in precisions for k in kernels)
    dispatch, scales = _measure(model, min(seq_len, model.max_seq_len), hw, choices)
    return dataclasses.replace(hw, dispatch_s=dispatch, compute_scale=scales)
