"""The engine's own speed on this device: the prior of the step-time model for `cluster=local`.

`autotune.hardware.probe_local` measures what a large matmul and SDPA reach and how fast memory
copies. A training step of the engine is more than that. On the 2-core CPU of this project's CI a
bf16 matmul runs faster than an fp32 one, yet the engine's bf16 step runs about 1.7 times slower
(autocast's casts, the norms and the loss in fp32); and a small model's step is mostly the
dispatch of hundreds of small ops, which a matmul's rate does not see. So for a local device the
engine's own forward and backward are timed as the engine runs them (autocast at ZeRO-0), in every
precision the device computes in (and each kernel choice where Triton runs):

- a block too small to compute anything gives the time to dispatch one op (`dispatch_s`, the
  median over precisions of time / ops, with the estimator's own op count);
- one block of the job's model (a small vocabulary, at a shape whose modelled compute is about
  TARGET_S) gives, once its ops' dispatch is taken off, what each precision's modelled compute is
  multiplied by (`compute_scale["precision/kernels"]`).

The estimator uses both for every plan (docs/formulas.md [Calibration]); the search's per-factor
belief (autotune.belief) starts from them and learns the rest from its trials. Each timing is the
fastest of REPS runs: a shared machine only ever slows a run down.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from autotune.engine.config import JobConfig, ModelConfig, PlanConfig, TrainConfig
from autotune.hardware import Hardware

REPS = 3  # timed runs per shape; the fastest counts
TARGET_S = 0.02  # the job's block is timed at a shape whose modelled compute is about this
# a block so small that its compute is nothing beside the dispatch of its ops
DISPATCH_MODEL = ModelConfig(name="dispatch", n_layers=1, d_model=32, n_heads=2, d_ff=64, vocab_size=64, max_seq_len=16)


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
        if best > 1.0:  # one slow run is measurement enough
            break
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


def _job_block(model: ModelConfig, seq: int, hw: Hardware) -> tuple[ModelConfig, int, int]:
    """One block of `model` (with a small vocabulary: the block's compute is what is timed, not a
    large head's), and a micro-batch and sequence length at which its modelled compute is about
    TARGET_S (longer sequences first halved, then the micro-batch grown)."""
    block = dataclasses.replace(model, n_layers=1, vocab_size=min(model.vocab_size, 1024), hf_config=None, init_from=None)
    while seq > 16 and _modelled(block, "fp32", "torch", 1, seq, hw)[0] > TARGET_S:
        seq //= 2
    batch = 1
    while batch < 64 and _modelled(block, "fp32", "torch", 2 * batch, seq, hw)[0] <= TARGET_S:
        batch *= 2
    return block, batch, seq


_MEASURED: dict[tuple, tuple[float, dict[str, float]]] = {}  # once per process, model and device


def _measure(model: ModelConfig, seq: int, hw: Hardware, choices: tuple[tuple[str, str], ...]) -> tuple[float, dict[str, float]]:
    key = (repr(model), seq, hw.gpu, choices)
    if key not in _MEASURED:
        _MEASURED[key] = _fit(model, seq, hw, choices)
    return _MEASURED[key]


def _fit(model: ModelConfig, seq: int, hw: Hardware, choices: tuple[tuple[str, str], ...]) -> tuple[float, dict[str, float]]:
    """(dispatch seconds per op, compute scale per choice): the dispatch from a block too small to
    compute anything, each scale from one block of the job's model once its ops' dispatch is taken off."""
    per_op = []
    for precision, kernels in choices:
        compute, ops = _modelled(DISPATCH_MODEL, precision, kernels, 1, 16, hw)
        per_op.append((_time_block(DISPATCH_MODEL, precision, kernels, 1, 16, hw.device) - compute) / ops)
    dispatch = float(max(np.median(per_op), 0.0))
    block, batch, seq = _job_block(model, seq, hw)
    scales = {}
    for precision, kernels in choices:
        compute, ops = _modelled(block, precision, kernels, batch, seq, hw)
        measured = _time_block(block, precision, kernels, batch, seq, hw.device)
        scales[f"{precision}/{kernels}"] = float(np.clip((measured - ops * dispatch) / compute, 0.05, 20.0))
    return dispatch, scales


def with_engine_prior(hw: Hardware, model: ModelConfig, seq_len: int, precisions: list[str]) -> Hardware:
    """`hw`, a probed local device, with the dispatch time and compute scales measured on the
    engine's own block of `model` in `precisions` (see the module docstring); a catalog GPU as it is."""
    if not hw.measured:
        return hw
    kernels = ["torch", "triton"] if hw.device == "cuda" else ["torch"]
    choices = tuple((p, k) for p in precisions for k in kernels)
    dispatch, scales = _measure(model, min(seq_len, model.max_seq_len), hw, choices)
    return dataclasses.replace(hw, dispatch_s=dispatch, compute_scale=scales)
