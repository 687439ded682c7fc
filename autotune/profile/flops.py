"""Parameters that do matmul work and the training FLOPs per token ([FLOPs and MFU] in docs/formulas.md)."""
from __future__ import annotations

from autotune.engine.config import ModelConfig


def matmul_params(model: ModelConfig) -> int:
    """N of 6N: the weights that do matmul work (linear weights and the LM head; not the input
    embedding unless tied, nor norms, biases or positions), as nanoGPT/torchtitan count it."""
    d, f, v = model.d_model, model.d_ff, model.vocab_size
    q, kv = model.n_heads * model.head_dim, model.kv_heads * model.head_dim
    attn = d * q + 2 * d * kv + q * d
    mlp = (3 if model.family == "llama" else 2) * d * f
    return model.n_layers * (attn + mlp) + v * d


def flops_per_token(model: ModelConfig, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token, 6N + 12·L·a·d·s (PaLM appendix B; [FLOPs and MFU]).

    The attention term counts the full s x s score matrix (as PaLM and FlopCounterMode do), not
    the causal half that llm.c and Megatron count.
    """
    n = matmul_params(model)
    attention = 12 * model.n_layers * model.n_heads * model.head_dim * seq_len
    return {"matmul_params": n, "dense": 6.0 * n, "attention": float(attention), "total": 6.0 * n + attention}
