"""Peak memory per GPU: what the first and the last pipeline rank hold at the two moments that can
peak, the larger of the four, and whether the plan fits (sections of docs/formulas.md in brackets).

The two moments: the start of a backward (model states, the gradients of earlier micro-batches or
DDP's buckets, activations, logits and their gradient, gathered units, communication buffers) and
the optimizer step (model states with every gradient; the activations are gone).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from autotune.engine.config import ModelConfig
from autotune.estimate.activations import SavedBytes
from autotune.estimate import float8
from autotune.estimate.arrays import PlanArrays
from autotune.estimate.calibration import Calibration
from autotune.estimate.columns import DYNAMIC_MEMORY, GiB, MEMORY
from autotune.estimate.layout import HeldNumels
from autotune.hardware import Hardware

CUDA_CONTEXT_BYTES = 0.5 * GiB  # CUDA context with lazy loading [Fixed overheads]
# PyTorch's caching allocator serves a request of 1 MiB or more from blocks rounded up to 2 MiB
# (c10/cuda/CUDACachingAllocator.cpp, kRoundLarge): a live large tensor wastes 1 MiB on average [Peak memory]
ALLOCATOR_ROUNDING_BYTES = 1 * 2**20
STATE_TENSORS_PER_PARAM = 4  # each parameter tensor has a gradient and AdamW's two states beside it
NCCL_BYTES = 0.5 * GiB  # NCCL communicators and their buffers, several ranks [Fixed overheads]


@dataclass(frozen=True)
class StageMemory:
    """One pipeline rank's memory at its peaking moment, per plan."""

    parts: dict[str, np.ndarray]  # MEMORY's parts; those of the moment that peaks
    step_grads: np.ndarray  # gradients held at the optimizer step (model states)
    phase: np.ndarray  # backward (start of a backward) | optimizer (the step)
    total: np.ndarray


@dataclass(frozen=True)
class PeakMemory:
    """The per-GPU peak of each plan: the stage and moment that peak, and whether it fits."""

    parts: dict[str, np.ndarray]
    total: np.ndarray
    allocated: np.ndarray  # the total less the CUDA context: what max_memory_allocated shows
    reserved: np.ndarray  # allocated plus the caching allocator's rounding: what max_memory_reserved shows
    step_grads: np.ndarray
    phase: np.ndarray
    stage: np.ndarray  # the pipeline rank that peaks: first | last
    host_bytes: np.ndarray  # host memory per node that offload needs
    fits: np.ndarray
    reason: np.ndarray


def loss_gradient_bytes(model: ModelConfig, tokens, vocab_parallel) -> np.ndarray:
    """Bytes torch's cross-entropy (log_softmax, then nll_loss, on the fp32 logits) makes in its
    backward beside the log-probabilities it saved, per logit: nll_loss's gradient (a zero-filled
    fp32 tensor of the logits' shape) and log_softmax's, alive together until log_softmax's
    backward returns, 8 bytes. Under tp (vocab_parallel: loss_parallel on the rank's vocabulary
    shard) DTensor's nll_loss backward makes log_softmax's gradient with it, (the scattered zeros
    + exp(log-probabilities)) x the loss's gradient, three fp32 tensors alive at once, 12 bytes.
    The 16-bit cast of the gradient comes after the saved log-probabilities are freed. It is the
    first moment of the backward, so every activation is still held [Activations]."""
    per_logit = np.where(vocab_parallel, 12, 8)
    return per_logit * np.asarray(tokens, dtype=float) * model.vocab_size


def in_flight(plans: PlanArrays) -> np.ndarray:
    """Micro-batches whose activations the first stage holds at once [Activations, Pipeline]:
    GPipe all m; 1F1B min(p, m); interleaved min(p, m)·(1 + (p−1)/(p·v)); no pipeline: 1."""
    pp, micro_batches = plans.pp, plans.micro_batches
    one_f_one_b = np.minimum(pp, micro_batches).astype(float)
    interleaved = one_f_one_b * (1 + (pp - 1) / (pp * plans.virtual_stages))
    count = np.where(plans.schedule == "gpipe", micro_batches,
                     np.where(plans.schedule == "interleaved_1f1b", interleaved, one_f_one_b))
    return np.where(pp > 1, count, 1.0)


def _model_states(plans: PlanArrays, held: HeldNumels) -> dict[str, np.ndarray]:
    """Params, grads (at the start of a backward), master, optimizer and the step's grads [Model states]:
    fp32 params are the master weights; the reduced grads fp32 whatever the reduce dtype (FSDP2 casts
    its reduce-scatter's output back; DDP's bf16_compress_hook decompresses into its fp32 buckets, its
    bf16 copy one bucket at a time, too small to count)."""
    zero, offload = plans.zero_stage, plans.fsdp_offload
    persistent = np.where(zero >= 1, held.shard, held.local)
    # Two moments can peak. At the start of a backward the gradients are those of the earlier
    # micro-batches (the step sets them to None): DDP accumulates them whole in place, FSDP2
    # (ZeRO 2/3) reduce-scatters every micro-batch (engine.parallel.gradient_sync) into its fp32
    # shards. At the optimizer step the activations are gone and every gradient exists, sharded.
    step_grads = np.where(offload, 0, 4 * persistent)
    # Where FSDP2's gradient sync and post-backward reshard wait for the last micro-batch (ZeRO-1:
    # engine.parallel.gradient_sync; ZeRO 2/3 under pp: PipelineStage.backward_maybe_with_nosync)
    # the unsharded gradients accumulate in the reduce dtype (FSDPParam.to_accumulated_grad_if_needed),
    # and the units stay gathered after the first micro-batch's backward. ZeRO-0's under FSDP2's
    # replicate (tp, pp, ep) accumulate in the reduce dtype too.
    # DDP's gradients are views of its buckets, which exist from its first step on (ZeRO-0
    # without tp or pp): all of them, through every backward
    accumulating = (plans.micro_batches > 1) | plans.ddp_buckets
    replicated = (zero == 0) & (plans.dp > 1) & ~plans.ddp_buckets
    unsharded = plans.reduce_bytes * held.local
    return {
        "params": np.where(offload, 0, 4 * persistent),
        "grads": np.where(accumulating, np.where(plans.deferred_sync | replicated, unsharded, step_grads), 0),
        "master": np.zeros(plans.rows),
        # AdamW exp_avg + exp_avg_sq fp32, plus one fp32 `step` scalar per parameter tensor
        "optimizer": np.where(offload, 0, 8 * persistent + 4 * held.tensors),
        "step_grads": step_grads,
    }


def _dynamic_memory(model: ModelConfig, seq_len: int, plans: PlanArrays, held: HeldNumels, saved: SavedBytes,
                    micro_batches_held: np.ndarray, holds_head: np.ndarray) -> dict[str, np.ndarray]:
    """16-bit weight copies, activations, logits and communication buffers at the start of a backward."""
    zero, tp, beta = plans.zero_stage, plans.tp, plans.compute_bytes
    layers = held.layers
    checkpointed = plans.checkpointed(layers)
    all_gathered = (zero == 1) | (zero == 2) | (plans.deferred_sync & (plans.micro_batches > 1))
    # 16-bit compute copies: autocast's cast weights are saved for backward (measured P term);
    # FSDP2 ZeRO 1/2 keep every unit gathered from forward to backward (so does ZeRO-3 where its
    # sync waits for the last micro-batch, after the first backward); ZeRO-3 otherwise the root plus
    # the current and the prefetched block [Model states] (derived from FSDP2's behaviour)
    # Without pp each micro-batch's forward leaves its autocast context before its backward.
    # Under pp the schedule runs every micro-batch in one autocast context (engine/train.py), whose
    # cache keeps each fp32 weight's cast from its first use to the step's end: one copy of every
    # block, checkpointed or not, shared by the micro-batches in flight [Peak memory]. Backward
    # recomputes one checkpointed block at a time, on CUDA's autograd thread (another thread's
    # cache): its casts once more for the rank, whatever is in flight.
    recomputing = np.where(checkpointed > 0, 1, 0)
    one_micro_batch = saved.cast_weights * (layers - checkpointed) + saved.cast_weights_checkpointed * checkpointed
    cached_step = saved.cast_weights * layers
    autocast_copies = (np.where(plans.pp > 1, cached_step, one_micro_batch)
                       + saved.cast_weights * recomputing) / tp  # the fit's P is the whole block's
    # Activations [Activations]: measured bytes per block; checkpointed blocks keep their input
    per_micro_batch = saved.block * (layers - checkpointed) + saved.checkpointed_block * checkpointed
    # Logits and loss [Activations], vocab-sharded by tp: what the head and loss save, plus the
    # gradients the loss's backward makes while those live; a compiled loss (inductor's fused
    # kernels) saves the logits themselves and writes their gradient, both in the logits' width
    logits = plans.micro_batch * seq_len * model.vocab_size
    logits_saved = np.where(plans.compiled_loss, beta * logits, saved.logits)
    logits_grad = np.select([plans.compiled_loss, plans.loss_kernels == "torch"],
                            [beta * logits, loss_gradient_bytes(model, plans.micro_batch * seq_len, plans.tp > 1)], 0)
    loss = np.where(holds_head, (logits_saved + saved.head + logits_grad) / tp, 0)
    # The first checkpointed block is recomputed once the loss's backward has freed all that: it
    # adds only what exceeds it
    recomputed = np.maximum(saved.block * recomputing - loss, 0)
    return {
        # (float8 all-gather: the gathered blocks hold their float8 weights, a byte each [Float8])
        "param_copies": np.select([all_gathered, zero == 3],
                                  [beta * held.root + plans.gather_bytes * (held.local - held.root),
                                   beta * held.root + plans.gather_bytes * 2 * held.block], autocast_copies),
        # the float8 linears keep the bf16 input saved (the measured block bytes); the largest one's
        # float8 casts and scales live while its GEMM runs
        "activations": (per_micro_batch * micro_batches_held + recomputed
                        + np.where(holds_head, saved.outside_per_token, 0) + float8.cast_buffers(model, plans, seq_len)),
        "logits": loss,
        # Communication buffers: FSDP2 reduce-scatter input of one block during backward (its 16-bit
        # grads and their copy in the reduce dtype, fp32 or bf16; fp32 grads are their own; the root's
        # comes last, when the activations are gone);
        # pipeline send/recv of one micro-batch's boundary activations
        "comm": (np.where(zero >= 1, held.block * (beta + np.where(beta < 4, plans.reduce_bytes, 0)), 0)
                 + np.where(plans.pp > 1, 2 * plans.micro_batch * seq_len * model.d_model * beta, 0)),
    }


def _context(plans: PlanArrays, hw: Hardware, calib: Calibration) -> np.ndarray:
    """CUDA context and NCCL's communicators [Fixed overheads], unless a calibration measured them."""
    if calib.context_bytes is not None:
        context = calib.context_bytes
    else:
        context = CUDA_CONTEXT_BYTES if hw.device == "cuda" else 0.0
    nccl = (plans.world > 1) & (hw.device == "cuda") & (calib.context_bytes is None)
    return np.full(plans.rows, context) + np.where(nccl, NCCL_BYTES, 0)


def stage_memory(model: ModelConfig, seq_len: int, plans: PlanArrays, held: HeldNumels, saved: SavedBytes,
                 stage: str, hw: Hardware, calib: Calibration) -> StageMemory:
    """The memory of the `stage` ("first" or "last") pipeline rank at its peaking moment."""
    micro_batches_held = in_flight(plans) if stage == "first" else np.ones(plans.rows)
    holds_head = (plans.pp == 1) | (stage == "last")
    states = _model_states(plans, held)
    step_grads = states.pop("step_grads")
    parts = states | _dynamic_memory(model, seq_len, plans, held, saved, micro_batches_held, holds_head)
    parts["context"] = _context(plans, hw, calib)
    parts["workspace"] = np.full(plans.rows, calib.workspace_bytes)
    parts["allocator"] = calib.fragmentation * sum(parts[k] for k in DYNAMIC_MEMORY)
    backward = sum(parts[k] for k in MEMORY)
    at_step = parts["params"] + parts["master"] + parts["optimizer"] + step_grads + parts["context"] + parts["workspace"]
    step_peaks = at_step > backward
    for k in (*DYNAMIC_MEMORY, "allocator"):
        parts[k] = np.where(step_peaks, 0, parts[k])
    parts["grads"] = np.where(step_peaks, step_grads, parts["grads"])
    return StageMemory(parts=parts, step_grads=step_grads, phase=np.where(step_peaks, "optimizer", "backward"),
                       total=np.maximum(backward, at_step))


def peak_memory(model: ModelConfig, seq_len: int, plans: PlanArrays, layouts: dict[str, HeldNumels],
                saved: SavedBytes, hw: Hardware, calib: Calibration) -> PeakMemory:
    """The larger of the first and the last pipeline rank's peaks, the host memory offload needs,
    and whether both fit."""
    first, last = (stage_memory(model, seq_len, plans, layouts[k], saved, k, hw, calib) for k in ("first", "last"))
    last_peaks = last.total > first.total

    def pick(of_first: np.ndarray, of_last: np.ndarray) -> np.ndarray:
        return np.where(last_peaks, of_last, of_first)

    parts = {k: pick(first.parts[k], last.parts[k]) for k in MEMORY}
    total = pick(first.total, last.total)
    held = layouts["first"]  # sharded fp32 params and grads, AdamW states
    host_bytes = np.where(plans.fsdp_offload, 16 * held.shard, 0) * hw.gpus_per_node
    fits_gpu = total <= hw.memory_bytes
    fits_host = (hw.host_memory_bytes <= 0) | (host_bytes <= hw.host_memory_bytes)
    return PeakMemory(
        parts=parts, total=total, allocated=total - parts["context"],
        reserved=np.minimum(total - parts["context"] + _rounding(plans, held, parts["activations"], seq_len, model.d_model)
                            + _stranded(model, seq_len, plans, parts["logits"]), hw.memory_bytes - parts["context"]),
        step_grads=pick(first.step_grads, last.step_grads),
        phase=pick(first.phase, last.phase), stage=np.where(last_peaks, "last", "first"), host_bytes=host_bytes,
        fits=fits_gpu & fits_host,
        reason=_reasons(fits_gpu, fits_host, parts, total, hw.memory_bytes, host_bytes, hw.host_memory_bytes),
    )


def _rounding(plans: PlanArrays, held: HeldNumels, activations: np.ndarray, seq_len: int, d_model: int) -> np.ndarray:
    """The caching allocator's rounding at the peak: 1 MiB for each live tensor, the model states'
    (STATE_TENSORS_PER_PARAM per parameter tensor) and the saved activations' (counted in tensors of
    one micro-batch's hidden states, b·s·h elements)."""
    hidden = plans.micro_batch * seq_len * d_model * plans.compute_bytes
    return ALLOCATOR_ROUNDING_BYTES * (STATE_TENSORS_PER_PARAM * held.tensors + activations / np.maximum(hidden, 1))


def _stranded(model: ModelConfig, seq_len: int, plans: PlanArrays, logits: np.ndarray) -> np.ndarray:
    """A cached block the caching allocator cannot reuse at the peak, where that is the eager loss's
    backward (logits held): forward freed the 16-bit logits (β a logit) and their fp32 copy (4),
    and backward's fp32 gradients (two, three under tp) take the copy's block and new ones, since a
    cached block serves only requests no larger than itself (c10/cuda/CUDACachingAllocator.cpp:
    blocks split, never merge across segments); the 16-bit logits' block stays reserved. None with
    fp32 logits (no copy) or a compiled loss (no fp32 tensors). On an allocation that would not fit,
    the allocator frees its cached blocks and retries, so reserved never exceeds the GPU."""
    eager_16_bit = (logits > 0) & (plans.loss_kernels == "torch") & ~plans.compiled_loss & (plans.compute_bytes < 4)
    return np.where(eager_16_bit, plans.compute_bytes * plans.micro_batch * seq_len * model.vocab_size / plans.tp, 0)


def _reasons(fits_gpu, fits_host, mem, total, capacity, host_bytes, host_capacity) -> np.ndarray:
    """Each plan's verdict in words: "fits", or what it needs against what the GPU or host has."""
    reason = np.full(len(total), "fits", dtype=object)
    gib = lambda x: pd.Series(np.round(x / GiB, 2)).astype(str).to_numpy(dtype=object)  # noqa: E731
    over = np.flatnonzero(~fits_gpu)  # the text is built for these rows only
    if len(over):
        parts = np.stack([mem[k][over] for k in MEMORY])
        top = np.argmax(parts, axis=0)
        reason[over] = ("needs " + gib(total[over]) + f" GiB per GPU, has {capacity / GiB:.2f} GiB (largest: "
                        + np.array(MEMORY, dtype=object)[top] + " " + gib(parts[top, np.arange(len(over))]) + " GiB)")
    host = np.flatnonzero(fits_gpu & ~fits_host)
    if len(host):
        reason[host] = "offload needs " + gib(host_bytes[host]) + f" GiB of host memory per node, has {host_capacity / GiB:.1f} GiB"
    return reason
