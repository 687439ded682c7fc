"""Float8 linears (plan.fp8) in the cost model ([Float8] in docs/formulas.md).

The blocks' dense linears (those autotune.engine.float8 converts: `block_gemms` of a block, not the
head, not a MoE layer's routed experts) run their three GEMMs at the float8 peak and its own
efficiency (the catalog's fp8_matmul_efficiency, scaled by the same calibration as bf16's).
Rowwise (torchao's recipe, `rate_ratio`, `rowwise_backward_bytes`): its forward GEMM is PyTorch's
CUTLASS rowwise kernel, at ROWWISE_FORWARD_GEMM of cuBLAS tensorwise's rate; its backward GEMMs
(slow accumulation, where that kernel is slower still) run cuBLAS tensorwise with unit scales, at
tensorwise's rate, and a kernel of their own then scales each output by row and column.

Each GEMM operand is cast first, eagerly, in two kernels: the amax (read the bf16 tensor: 2 bytes
an element) and the scaled cast (read 2, write 1): CAST_BYTES an element. Forward
casts the input and the weight; backward the output gradient for each of its two GEMMs, the input
again (transposed, for the weight gradient) and the weight (transposed): tensorwise reuses the
gradient's scale for the second (a transposed copy, 3 bytes), rowwise scales it along the other
axis (a second cast). Under float8 all-gather (tensorwise, ZeRO 1-3) the weight is cast on its
shard, before the gather, 1/dp of it per rank, and the gathered unit is a byte per weight.
Compiled (plan.compile, as torchtitan runs float8), the casts fuse with their neighbours (`cast_traffic`),
but rowwise's casts along an operand's other axis read a transposed bf16 copy of it.

Under tensor parallelism each rank casts and multiplies its shard of every linear (`converted_gemms`
at the rank's widths). Tensorwise scales are of the whole tensor, so each cast of a tp-sharded
operand all-reduces its amax over tp (`tp_amax_reductions`), and under sequence parallel the
sublayers' inputs and the output gradients are all-gathered in float8 (`tp_gather_bytes`).
"""
from __future__ import annotations

import numpy as np

from autotune.engine.config import ModelConfig
from autotune.estimate.arrays import PlanArrays
from autotune.estimate.gemm import block_gemms
from autotune.hardware import Hardware

CAST_BYTES = 5  # amax (read 2) + scaled cast (read 2, write 1) of a bf16 element
COMPILED_CAST_BYTES = 3  # compiled: the amax's read (2) and the float8 write (1); the cast's read is fused
TRANSPOSE_BYTES = 3  # a float8 copy transposed: read 2 (the bf16 source), write 1
# Rowwise ([Float8] in docs/formulas.md has the sources). The forward GEMM's rate over tensorwise's:
# PyTorch's CUTLASS rowwise _scaled_mm with fast accumulation reaches 90-100% of cuBLAS tensorwise's
# on most shapes on H100 (pytorch/pytorch#147971); every float8 GPU in the catalog is a Hopper.
ROWWISE_FORWARD_GEMM = 0.9
# The backward GEMMs' rescale (torchao float8_ops.addmm_float8_unwrapped): compiled, one kernel
# reads the bf16 output and writes it scaled (2 + 2 bytes an element); eager, the scales' outer
# product is made in fp32 (write 4), then multiplies the output in place (read 2 + 4, write 2)
RESCALE_BYTES, EAGER_RESCALE_BYTES = 4, 12
RESCALE_OPS = 2  # eager, per backward GEMM: the outer product and the multiply
# Compiled, a cast along the other axis writes a transposed bf16 copy and reads it back (4 bytes),
# where tensorwise's extra pass is its amax's read (2): torchao's float8 roofline counts 6 bytes
# an input or gradient element rowwise against 4 tensorwise, 10 a weight's against 8
ROWWISE_TRANSPOSE_BYTES = 2
# host-dispatched ops a float8 linear adds (amax, scale, cast of each operand): forward two
# operands, backward four (torchao's eager Float8Linear)
FWD_OPS, BWD_OPS = 6, 12


def converted_gemms(model: ModelConfig, tp=1) -> list[tuple[float, float]]:
    """The (K, N) of a block's linears that become float8, on one of tp ranks (tp: per plan)."""
    return block_gemms(model, tp)


def converted_share(model: ModelConfig, block_params_per_token) -> np.ndarray:
    """Of a rank's block matmul FLOPs (all blocks' `block_params_per_token` weights, 2 FLOPs each a
    token forward), the share in float8 linears."""
    converted = model.n_layers * sum(k * n for k, n in converted_gemms(model))
    return np.minimum(converted / np.maximum(block_params_per_token, 1.0), 1.0)


def rate_ratio(plans: PlanArrays, hw: Hardware, matmul_efficiency: float) -> dict[str, np.ndarray]:
    """Each plan's float8 GEMM rate over its precision's (1 without float8), forward (fwd) and
    backward (bwd): the catalog's float8 peak and efficiency, with the calibration's scale of the
    matmul efficiency (`matmul_efficiency` over the catalog's); rowwise's forward at
    ROWWISE_FORWARD_GEMM of it, its backward at tensorwise's (the same cuBLAS kernel)."""
    if not plans.fp8_any:
        return {"fwd": np.ones(plans.rows), "bwd": np.ones(plans.rows)}
    fp8 = hw.peak_flops.get("fp8", 0.0) * hw.fp8_matmul_efficiency * matmul_efficiency / hw.matmul_efficiency
    ratio = np.full(plans.rows, fp8 / (hw.peak_flops["bf16"] * matmul_efficiency))
    ratios = {"fwd": np.where(plans.fp8 == "rowwise", ROWWISE_FORWARD_GEMM, 1.0) * ratio, "bwd": ratio}
    return {phase: np.where(plans.fp8 == "none", 1.0, np.maximum(r, 1e-9)) for phase, r in ratios.items()}


def _distinct_inputs(model: ModelConfig) -> int:
    """How many of a block's float8 linears read each input, in `converted_gemms` order (q, k, v
    read one; a gated MLP's gate and up read one)."""
    return [3, 3, 3, 1] + ([2, 2, 1] if model.family == "llama" else [1, 1]) * (model.n_experts == 0)


def cast_traffic(model: ModelConfig, plans: PlanArrays, seq_len: int) -> dict[str, np.ndarray]:
    """Bytes one block's float8 casts move per micro-batch (fwd, bwd) and the ops they add (ops,
    fwd_ops). Eager, every linear casts its own operands (CAST_BYTES an element); compiled
    (plan.compile), inductor fuses each cast's read into the op that produced the tensor and casts
    a tensor that several linears read once (COMPILED_CAST_BYTES). Rowwise adds its backward's
    rescales and transposed copies (`rowwise_backward_bytes`)."""
    tokens = plans.micro_batch * seq_len
    fp8 = plans.fp8 != "none"
    compiled = plans.compiled
    cast = np.where(compiled, COMPILED_CAST_BYTES, CAST_BYTES)
    weight_share = np.where(plans.fp8_gather, 1.0 / plans.dp, 1.0)
    second_grad_cast = np.where(plans.fp8 == "rowwise", cast, TRANSPOSE_BYTES)
    fwd = np.zeros(plans.rows)
    bwd = np.zeros(plans.rows)
    for (k, n), readers in zip(converted_gemms(model, plans.tp), _distinct_inputs(model)):
        inputs = tokens * k / np.where(compiled, readers, 1)
        fwd = fwd + cast * (inputs + weight_share * k * n)
        bwd = bwd + (cast + second_grad_cast) * tokens * n + cast * (inputs + k * n)
    linears = len(converted_gemms(model))
    ops = np.where(compiled, 0, 1)  # inductor's fused kernels: no ops of their own to dispatch
    bwd_ops = BWD_OPS + np.where(plans.fp8 == "rowwise", 2 * RESCALE_OPS, 0)
    return {"fwd": np.where(fp8, fwd, 0.0), "bwd": np.where(fp8, bwd, 0.0) + rowwise_backward_bytes(model, plans, seq_len),
            "fwd_ops": np.where(fp8, ops * FWD_OPS * linears, 0), "ops": np.where(fp8, ops * (FWD_OPS + bwd_ops) * linears, 0)}


def rowwise_backward_bytes(model: ModelConfig, plans: PlanArrays, seq_len: int) -> np.ndarray:
    """Bytes rowwise adds to one block's backward per micro-batch: the rescale of each backward
    GEMM's output (the input gradient, tokens x K, and the weight gradient, K x N) and, compiled,
    ROWWISE_TRANSPOSE_BYTES an element of the operands it casts along their other axis (the output
    gradient, the input, once for the linears that read it, and the weight)."""
    tokens = plans.micro_batch * seq_len
    rescale = np.where(plans.compiled, RESCALE_BYTES, EAGER_RESCALE_BYTES)
    transpose = np.where(plans.compiled, ROWWISE_TRANSPOSE_BYTES, 0)
    total = np.zeros(plans.rows)
    for (k, n), readers in zip(converted_gemms(model, plans.tp), _distinct_inputs(model)):
        total = total + rescale * (tokens * k + k * n) + transpose * (tokens * n + tokens * k / readers + k * n)
    return np.where(plans.fp8 == "rowwise", total, 0.0)


def cast_buffers(model: ModelConfig, plans: PlanArrays, seq_len: int) -> np.ndarray:
    """Bytes the largest float8 linear's casts hold while its GEMM runs: its input and weight in
    float8 (a byte an element) and their scales (fp32: one a tensor, or one a row)."""
    tokens = plans.micro_batch * seq_len
    sizes = [tokens * k + k * n + np.where(plans.fp8 == "rowwise", 4 * (tokens + n), 8)
             for k, n in converted_gemms(model, plans.tp)]
    return np.where(plans.fp8 != "none", np.max(sizes, axis=0), 0.0)


def tp_gather_bytes(plans: PlanArrays) -> np.ndarray:
    """Bytes an element of sequence parallel's all-gathers (the sublayers' inputs forward, the
    output gradients backward): torchao's float8 tp styles gather tensorwise float8, a byte."""
    return np.where(plans.sequence_parallel & (plans.fp8 == "tensorwise"), 1.0, plans.compute_bytes)


def tp_amax_reductions(model: ModelConfig, plans: PlanArrays) -> dict[str, np.ndarray]:
    """All-reduces over tp of one scalar amax per block and micro-batch (fwd, bwd), tensorwise under
    tp: forward the two sublayers' inputs (cast once for their column-parallel linears), the two
    row-parallel linears' sharded inputs and every weight shard (none under float8 all-gather: its
    scales are computed once a step, after the optimizer); backward every linear's output gradient."""
    linears = len(converted_gemms(model))
    on = (plans.fp8 == "tensorwise") & (plans.tp > 1)
    fwd = 4 + np.where(plans.fp8_gather, 0, linears)
    return {"fwd": np.where(on, fwd, 0), "bwd": np.where(on, linears, 0)}
