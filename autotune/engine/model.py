"""A decoder-only transformer in two families.

llama: RMSNorm, rotary embeddings (theta), SwiGLU MLP, grouped-query attention, optional q/k/v
biases (Qwen2), head tied or not, and optionally mixture-of-experts MLPs (Mixtral, Qwen2-MoE:
autotune/engine/moe.py) whose load-balancing loss joins the training loss. gpt2: LayerNorm,
learned positions, GELU MLP, biases on every linear, head tied to the token embedding.

The model builds on the meta device for planning (`build_model(cfg, device="meta")`) and is
materialised with `to_empty` + `init_weights` on the device it trains on. Blocks live in a
ModuleDict keyed by their index so that a pipeline stage can drop the blocks it does not own and
keep the parameter names of the full model (checkpoints stay interchangeable).
"""
from __future__ import annotations

import contextlib
import math
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel
from torch.distributed.tensor import DTensor, Replicate

from autotune import kernels
from autotune.engine.config import ModelConfig
from autotune.engine.moe import MoE, with_aux_loss
from autotune.engine.tensor_parallel import local_rows


def rope_tables(
    head_dim: int, max_seq_len: int, theta: float, device=None, scaling: ModelConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [max_seq_len, head_dim // 2], in fp32; `scaling`: a model whose
    rope_scaling_* fields (Llama 3.1+) apply."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if scaling is not None and scaling.rope_scaling_factor != 1:
        inv_freq = llama3_scaled(inv_freq, scaling)
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def llama3_scaled(inv_freq: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Llama 3.1+'s rope scaling: frequencies with fewer than low_freq_factor periods in the
    original context are slowed by the factor, those with more than high_freq_factor kept, and
    the band between blended linearly in the number of periods."""
    periods = cfg.rope_original_max_seq_len * inv_freq / (2 * math.pi)
    keep = ((periods - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)).clamp(0, 1)
    return keep * inv_freq + (1 - keep) * inv_freq / cfg.rope_scaling_factor


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [b, s, a, d] and k [b, s, g, d] with cos/sin [s, d/2] (halves layout, as in HF llama)."""
    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        c, s = cos[:, None, :], sin[:, None, :]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).type_as(x)

    return rotate(q), rotate(k)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, triton: bool = False):
        super().__init__()
        self.eps, self.triton = eps, triton
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.triton:  # under sequence parallel x is sharded over the sequence: the kernel takes the local rows
            return local_rows(kernels.rms_norm, x, self.weight, eps=self.eps, impl="triton")
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters and names), optionally through the Triton kernel."""

    def __init__(self, dim: int, eps: float, triton: bool = False):
        super().__init__(dim, eps=eps)
        self.triton = triton

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.triton:  # as RMSNorm
            return local_rows(kernels.layer_norm, x, self.weight, self.bias, eps=self.eps, impl="triton")
        return super().forward(x)


def make_norm(cfg: ModelConfig, triton: bool = False) -> nn.Module:
    if cfg.family == "gpt2":
        return LayerNorm(cfg.d_model, cfg.norm_eps, triton)
    return RMSNorm(cfg.d_model, cfg.norm_eps, triton)


def project(x: torch.Tensor, linears: tuple[nn.Linear, ...]) -> list[torch.Tensor]:
    """A sublayer's input projections (q, k, v or gate, up) of x."""
    return [linear(x) for linear in linears]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, triton: bool = False):
        super().__init__()
        self.triton = triton
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        bias = cfg.family == "gpt2"
        qkv_bias = bias or cfg.qkv_bias
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=qkv_bias)
        self.wk = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=qkv_bias)
        self.wv = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=bias)
        self.use_rope = cfg.family == "llama"
        self.context_shard = None  # under context parallelism: the ring (autotune/engine/context_parallel.py)
        self.sdpa_backend = None  # the SDPA kernel plan.attention pins (engine/parallel.py); None: SDPA's own choice
        self.project = project  # async tp pipelines the projections with their all-gather (engine/async_tp.py)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        q, k, v = self.project(x, (self.wq, self.wk, self.wv))
        b, s = q.shape[:2]
        # -1 rather than the head counts: under tensor parallelism each rank holds a slice of heads
        q, k, v = (t.view(b, s, -1, self.head_dim) for t in (q, k, v))
        return self.wo(self.core(q, k, v, rope))

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """Rotary, the kv heads' repeat and SDPA: [b, s, heads, d] projections to the [b, s, heads·d]
        input of wo (what plan.activation_checkpointing=attention recomputes, as Megatron's selective
        recompute does)."""
        b, s = q.shape[:2]
        if self.use_rope:
            cos, sin = rope
            if self.triton:
                q, k = kernels.apply_rope(q, k, cos[:s], sin[:s], impl="triton")
            else:
                q, k = apply_rope(q, k, cos[:s], sin[:s])
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.context_shard is not None:  # the ring shares each kv head among its group itself
            return self.context_shard.attention(q, k, v).transpose(1, 2).reshape(b, s, -1)
        if k.shape[1] != q.shape[1]:  # grouped-query attention: share each kv head among its group
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        # pinned here, inside the module, so that a checkpointed block's recompute runs the same kernel
        with sdpa_kernel(self.sdpa_backend) if self.sdpa_backend is not None else contextlib.nullcontext():
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return y.transpose(1, 2).reshape(b, s, -1)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, triton: bool = False, d_ff: int | None = None):
        """d_ff: the hidden width, if not the model's (a MoE layer's shared experts)."""
        super().__init__()
        self.triton = triton
        self.gated = cfg.family == "llama"
        bias = cfg.family == "gpt2"
        d_ff = d_ff or cfg.d_ff
        if self.gated:
            self.w_gate = nn.Linear(cfg.d_model, d_ff, bias=False)
        self.w_up = nn.Linear(cfg.d_model, d_ff, bias=bias)
        self.w_down = nn.Linear(d_ff, cfg.d_model, bias=bias)
        self.project = project  # as Attention's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.gated:
            (up,) = self.project(x, (self.w_up,))
            return self.w_down(F.gelu(up, approximate="tanh"))
        gate, up = self.project(x, (self.w_gate, self.w_up))
        if self.triton:
            return self.w_down(kernels.swiglu(gate, up, impl="triton"))
        return self.w_down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, triton: bool = False, index: int = 0):
        """index: the block's place in the model (which blocks of a MoE model have experts)."""
        super().__init__()
        self.attn_norm = make_norm(cfg, triton)
        self.attn = Attention(cfg, triton)
        self.mlp_norm = make_norm(cfg, triton)
        self.mlp = make_mlp(cfg, triton, index)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope)
        return x + self.mlp(self.mlp_norm(x))


def make_mlp(cfg: ModelConfig, triton: bool, index: int) -> nn.Module:
    if not cfg.is_moe_layer(index):
        return MLP(cfg, triton)
    shared = MLP(cfg, triton, cfg.n_shared_experts * cfg.shared_expert_d_ff) if cfg.n_shared_experts else None
    return MoE(cfg, shared, triton)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy of logits [b, s, vocab] in fp32 (upcast first), ignoring -100 targets."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, kernels: str = "torch"):
        """kernels="triton" runs norms, SwiGLU, RoPE and the loss through the fused kernels of `autotune/kernels/`
        (the loss only where the head holds the whole vocabulary: not under tensor parallelism)."""
        super().__init__()
        if kernels not in ("torch", "triton"):
            raise ValueError(f"kernels must be 'torch' or 'triton', got {kernels!r}")
        self.cfg = cfg
        self.triton = triton = kernels == "triton"
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.family == "gpt2" else None
        self.layers = nn.ModuleDict({str(i): Block(cfg, triton, i) for i in range(cfg.n_layers)})
        self.norm = make_norm(cfg, triton)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.family == "llama":
            cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, scaling=cfg)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            self.rope_cos = self.rope_sin = None
        # what the gradient of the load-balancing loss is multiplied by when forward returns no loss
        # (a pipeline stage: autotune/engine/pipeline.py sets it to its loss's own multiplier)
        self.aux_grad_scale = 1.0
        self.context_shard = None  # under context parallelism: this rank's chunks' positions
        self.loss_fn = cross_entropy  # compiled under plan.compile_loss (engine.parallel.apply_compile)

    def head_weight(self) -> torch.Tensor:
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def hidden(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Final-norm hidden states [b, s, d_model] of a batch of token ids [b, s], and the MoE
        layers' load-balancing loss (None without MoE layers).

        A pipeline stage (autotune/engine/pipeline.py) holds only some modules: without `tok_emb` it takes
        hidden states [b, s, d_model] instead of token ids; without `norm` it returns the output
        of its last block.
        """
        x = self.tok_emb(tokens) if self.tok_emb is not None else tokens
        shard = self.context_shard  # context parallel: this rank's tokens lie at scattered positions
        pos = shard.positions(tokens.shape[1], tokens.device) if shard else torch.arange(tokens.shape[1], device=tokens.device)
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos)
        rope = (self.rope_cos, self.rope_sin) if self.rope_cos is not None else None
        if rope is not None and shard:
            rope = (self.rope_cos[pos], self.rope_sin[pos])
        aux = None
        for block in self.layers.values():
            x = block(x, rope)
            if isinstance(block.mlp, MoE):  # read here, where a recomputing backward never runs
                stats = block.mlp.last
                aux = stats.aux_loss if aux is None else aux + stats.aux_loss
                if torch.is_grad_enabled():
                    block.mlp.records.append(stats._replace(aux_loss=stats.aux_loss.detach()))
        return (self.norm(x) if self.norm is not None else x), aux

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [b, s, vocab] or, given targets, the mean cross-entropy loss (fp32), plus the MoE
        layers' load-balancing loss. Without targets that loss reaches backward through the output
        (times `aux_grad_scale`), as it must from a pipeline stage that computes no loss."""
        h, aux = self.hidden(tokens)
        if aux is not None and targets is None:
            h, aux = with_aux_loss(h, aux, self.aux_grad_scale), None
        if self.norm is None:  # a pipeline stage before the last: its output feeds the next stage
            return h
        weight = self.head_weight()
        # The fused loss never materialises the [tokens, vocab] logits, but it needs the whole
        # vocabulary; a DTensor head is vocabulary-sharded (tensor parallel), whose sharded logits
        # go through torch's cross-entropy under loss_parallel (autotune/engine/tensor_parallel.py).
        if targets is not None and self.triton and not isinstance(weight, DTensor):
            loss = kernels.linear_cross_entropy(h, weight, targets, ignore_index=-100, impl="triton")
            return loss if aux is None else loss + aux
        logits = F.linear(h, weight)
        if targets is None:
            return logits
        loss = self.loss_fn(logits, targets)
        return loss if aux is None else loss + aux

    @torch.no_grad()
    def init_weights(self, seed: int | None = 0) -> None:
        """Initialise every parameter and buffer in place (after `to_empty`).

        Normal(0, init_std) for weights, residual output projections scaled by 1/sqrt(2 n_layers)
        (GPT-2), zeros for biases, ones for norm weights. Each tensor is drawn on the CPU from a
        generator seeded by (seed, its name): the values do not depend on the device, the rank, the
        order of initialisation or which blocks a pipeline stage holds, and sharded (DTensor)
        parameters receive their slice of the same full tensor. A tied head held apart from the
        embedding (the last pipeline stage's copy) is drawn as the embedding, so the copies start equal.
        """
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name == "lm_head.weight" and self.cfg.tie_embeddings:
                name = "tok_emb.weight"
            if name.endswith("bias"):
                full = torch.zeros(p.shape)
            elif "norm" in name:
                full = torch.ones(p.shape)
            else:
                residual = name.endswith(("wo.weight", "w_down.weight", "experts.w_down"))
                s = std / math.sqrt(2 * self.cfg.n_layers) if residual else std
                gen = torch.Generator().manual_seed((seed or 0) * 1_000_003 + zlib.crc32(name.encode()))
                full = torch.empty(p.shape).normal_(0.0, s, generator=gen)
            _copy_full(p, full)
        if self.rope_cos is not None:
            cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta, scaling=self.cfg)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)


def _copy_full(p: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full-shape CPU tensor into a parameter, plain or sharded (DTensor).

    Every rank holds the same `full` (seeded by name), so each cuts its own shard locally (a replicated
    DTensor redistributed to the parameter's placements). distribute_tensor would scatter from rank 0
    and, for FSDP2 over tp shards (_StridedShard) of a dim that tp x dp does not divide (gpt2's
    vocabulary of 50257), fails on the uneven pieces."""
    if isinstance(p, DTensor):
        mesh = p.device_mesh
        whole = DTensor.from_local(full.to(mesh.device_type), mesh, [Replicate()] * mesh.ndim, run_check=False)
        p.copy_(whole.redistribute(mesh, p.placements))
    else:
        p.copy_(full)


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", seed: int | None = 0,
                kernels: str = "torch") -> Transformer:
    """The model on `device`; on "meta" it is only shapes (for planning), elsewhere initialised.

    kernels: "torch" or "triton" (plan.kernels).
    """
    with torch.device("meta"):
        model = Transformer(cfg, kernels)
    if str(device) != "meta":
        model.to_empty(device=device)
        model.init_weights(seed)
    return model


# --- exact parameter counts -----------------------------------------------------------------

def param_counts(cfg: ModelConfig, active: bool = False) -> dict[str, int]:
    """Parameters per module kind, closed form; equals the instantiated model's count exactly.

    "mlp" holds every block's MLP: MoE layers' router, routed and shared experts included.
    active: the parameters one token computes with instead (experts_per_token of each MoE layer's
    routed experts; Mixtral-8x7B's 12.9B of 46.7B)."""
    d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
    q_out, kv_out = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    bias = cfg.family == "gpt2"
    qkv_bias = bias or cfg.qkv_bias
    norm = 2 * d if cfg.family == "gpt2" else d
    attn = d * q_out + 2 * d * kv_out + q_out * d + (q_out + 2 * kv_out if qkv_bias else 0) + (d if bias else 0)
    if cfg.family == "llama":
        mlp = 3 * d * f
    else:
        mlp = 2 * d * f + f + d
    n_moe = len(cfg.moe_layers)
    experts_used = cfg.experts_per_token if active else cfg.n_experts
    moe = (cfg.n_experts * d + experts_used * 3 * d * cfg.expert_d_ff
           + cfg.n_shared_experts * 3 * d * cfg.shared_expert_d_ff + (d if cfg.shared_expert_gate else 0))
    counts = {
        "embedding": v * d,
        "position_embedding": cfg.max_seq_len * d if cfg.family == "gpt2" else 0,
        "attention": cfg.n_layers * attn,
        "mlp": (cfg.n_layers - n_moe) * mlp + n_moe * moe,
        "norms": cfg.n_layers * 2 * norm + norm,
        "lm_head": 0 if cfg.tie_embeddings else v * d,
    }
    counts["total"] = sum(counts.values())
    return counts


def count_params(cfg: ModelConfig) -> int:
    return param_counts(cfg)["total"]


def count_active_params(cfg: ModelConfig) -> int:
    """Parameters one token computes with: a dense model's all, a MoE model's top-k routed experts
    of each MoE layer with everything else."""
    return param_counts(cfg, active=True)["total"]


def expert_params(cfg: ModelConfig) -> int:
    """The routed experts' parameters (all MoE layers): what expert parallelism divides by plan.ep."""
    return len(cfg.moe_layers) * cfg.n_experts * 3 * cfg.d_model * cfg.expert_d_ff
