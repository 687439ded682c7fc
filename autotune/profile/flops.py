"""Parameters that do matmul work and the training FLOPs per token ([FLOPs and MFU] in docs/formulas.md)."""
from __future__ import annotations

from autotune.engine.config import ModelConfig


def expert_matmul_params(model: ModelConfig) -> int:
    """The routed experts' weights one token computes with, over all MoE layers: experts_per_token
    SwiGLU experts of each (0 for a dense model). Expert parallelism moves this work to the ranks
    holding the experts, and a load imbalance lengthens it there."""
    return len(model.moe_layers) * model.experts_per_token * 3 * model.d_model * model.expert_d_ff


def matmul_params(model: ModelConfig) -> int:
    """N of 6N: the weights that do matmul work per token (linear weights and the LM head; not the
    input embedding unless tied, nor norms, biases or positions), as nanoGPT/torchtitan count it.
    A MoE layer's are its active ones: the router, the top-k routed experts (`expert_matmul_params`),
    the shared experts and their gate; Mixtral-8x7B computes with 12.9B of its 46.7B."""
    d, f, v = model.d_model, model.d_ff, model.vocab_size
    q, kv = model.n_heads * model.head_dim, model.kv_heads * model.head_dim
    attn = d * q + 2 * d * kv + q * d
    mlp = (3 if model.family == "llama" else 2) * d * f
    n_moe = len(model.moe_layers)
    moe = (model.n_experts * d + model.n_shared_experts * 3 * d * model.shared_expert_d_ff
           + (d if model.shared_expert_gate else 0))
    return model.n_layers * attn + (model.n_layers - n_moe) * mlp + n_moe * moe + expert_matmul_params(model) + v * d


def flops_per_token(model: ModelConfig, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token, 6N + 12·L·a·d·s (PaLM appendix B; [FLOPs and MFU]), N the active
    matmul weights (`matmul_params`).

    The attention term counts the full s x s score matrix (as PaLM and FlopCounterMode do), not
    the causal half that llm.c and Megatron count.
    """
    n = matmul_params(model)
    attention = 12 * model.n_layers * model.n_heads * model.head_dim * seq_len
    return {"matmul_params": n, "expert_params": expert_matmul_params(model), "dense": 6.0 * n,
            "attention": float(attention), "total": 6.0 * n + attention}
