"""SDPA's efficiency by sequence length and head width ([Attention] in docs/formulas.md).

The causal flash kernels (FlashAttention-2, SDPA's flash backend) split the s x s scores into
blocks of BLOCK queries by BLOCK keys, one thread block per (sequence, head, query block):

- the diagonal blocks are computed whole for the half the causal mask keeps, and each query block
  loads its queries and writes its output and log-sum-exp once: of a query block's s/BLOCK·½ key
  blocks about one is overhead, so the rate goes as s / (s + BLOCK);
- every score also takes one exponential on the SM's special-function units (16 a clock per SM on
  Ampere and Hopper, CUDA C Programming Guide, arithmetic instructions) beside the 4·d tensor-core
  FLOPs of its two matmuls; with the tensor cores doing F FLOPs a clock per SM the exponentials
  cost as much as F/64 more head width: the rate goes as d / (d + F/64) (FlashAttention-3's
  reason for overlapping softmax with the matmuls on Hopper, where F is twice Ampere's);
- the thread blocks run in waves over the SMs.

The catalog's attention_efficiency is measured at REFERENCE (the probe's shape, also the long-
sequence, head-width-128 regime of the FlashAttention papers' figures); a shape's efficiency is
relative to it. cuDNN's fused attention (plan.attention=cudnn) has its own figure at REFERENCE
(cudnn_attention_efficiency) and the same relative shape: the FlashAttention-3 paper's cuDNN runs
1.58-1.65 times its FlashAttention-2 at every length from 512 to 16k, causal forward and backward.
"""
from __future__ import annotations

import numpy as np

from autotune.hardware import Hardware

BLOCK = 128  # FlashAttention-2's query/key block on A100/H100 for head width <= 128
EXP_PER_CLOCK = 16  # special-function-unit exponentials per clock per SM (compute capability 8.x, 9.0)
REFERENCE = {"batch_heads": 2 * 16, "seq_len": 4096, "head_dim": 128}


def _rate(batch_heads, seq_len, head_dim, sms: int, tensor_flops_per_clock: float):
    seq_len, head_dim = np.asarray(seq_len, dtype=float), np.asarray(head_dim, dtype=float)
    exp_width = tensor_flops_per_clock / (4 * EXP_PER_CLOCK)
    blocks = np.asarray(batch_heads, dtype=float) * np.ceil(seq_len / BLOCK)
    wave = blocks / (np.ceil(blocks / sms) * sms)
    return seq_len / (seq_len + BLOCK) * head_dim / (head_dim + exp_width) * wave


def attention_efficiency(cudnn: np.ndarray, attention_efficiency: float, hw: Hardware) -> np.ndarray:
    """Each plan's attention efficiency at REFERENCE: `attention_efficiency` (the hardware's SDPA
    figure, as calibrated) or, for cuDNN's kernel, that times the hardware's cuDNN-over-SDPA ratio (a
    calibration scales both alike); a GPU without a cuDNN figure is taken at SDPA's."""
    ratio = hw.cudnn_attention_efficiency / hw.attention_efficiency if hw.cudnn_attention_efficiency else 1.0
    return np.where(cudnn, attention_efficiency * ratio, attention_efficiency)


def relative_attention_efficiency(batch_heads, seq_len, head_dim, sms: int, tensor_flops_per_clock: float):
    """SDPA's rate at (sequences x heads on the rank, s, d) over its rate at REFERENCE; 1 without a
    GPU's figures (sms = 0: a measured CPU)."""
    if not sms or not tensor_flops_per_clock:
        return np.ones_like(np.asarray(seq_len, dtype=float))
    return (_rate(batch_heads, seq_len, head_dim, sms, tensor_flops_per_clock)
            / _rate(REFERENCE["batch_heads"], REFERENCE["seq_len"], REFERENCE["head_dim"], sms, tensor_flops_per_clock))
