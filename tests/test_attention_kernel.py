"""plan.attention: the attention kernel a plan pins (engine/parallel.py pin_attention), refused in one
line where it cannot run, kept through a checkpointed block's recompute; on a GPU, cuDNN's kernel
against SDPA's own choice."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend
from torch.utils._python_dispatch import TorchDispatchMode

from autotune.engine.config import ConfigError, ModelConfig, build_train_config
from autotune.engine.model import build_model
from autotune.engine.parallel import apply_activation_checkpointing, check_supported, pin_attention

TINY = dict(family="llama", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=96, max_seq_len=32)
JOB = dict(seq_len=32, global_batch=2)


class OpNames(TorchDispatchMode):
    """The aten ops run under it, by name."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def config(**plan):
    return build_train_config({"model": TINY, "job": JOB, "plan": plan})


def test_cudnn_needs_16_bit_attention():
    with pytest.raises(ConfigError, match="plan.attention=cudnn runs 16-bit attention only") as e:
        config(attention="cudnn", precision="fp32")
    assert "\n" not in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a machine without CUDA")
def test_cudnn_is_refused_in_one_line_without_a_gpu():
    with pytest.raises(ConfigError, match="plan.attention=cudnn .* needs a CUDA GPU; use plan.attention=sdpa") as e:
        check_supported(config(attention="cudnn", precision="bf16").plan)
    assert "\n" not in str(e.value)


def test_cudnn_is_refused_under_context_parallel_rings():
    with pytest.raises(ConfigError, match="plan.attention=cudnn"):
        check_supported(config(attention="cudnn", precision="bf16", cp=2, dp=1).plan)


def test_pinning_reaches_every_layer_only_for_cudnn():
    model = build_model(ModelConfig(**TINY), device="meta")
    pin_attention(model, config().plan)
    assert all(block.attn.sdpa_backend is None for block in model.layers.values())
    pin_attention(model, dataclasses.replace(config().plan, attention="cudnn"))
    assert all(block.attn.sdpa_backend == SDPBackend.CUDNN_ATTENTION for block in model.layers.values())


def test_a_pinned_kernel_also_runs_in_a_checkpointed_blocks_recompute():
    """The pin lives in the attention module, so the backward's recompute of a checkpointed block runs
    the kernel its forward ran. On the CPU the math kernel stands in for cuDNN: pinned, SDPA's CPU
    flash kernel never runs, forward or recompute."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY), seed=0)
    apply_activation_checkpointing(model, config(activation_checkpointing="full").plan)
    tokens = torch.randint(0, TINY["vocab_size"], (2, JOB["seq_len"]))
    flash = "aten._scaled_dot_product_flash_attention_for_cpu"
    with OpNames() as unpinned:
        model(tokens, tokens).backward()
    assert unpinned.names.count(flash) == 2 * TINY["n_layers"]  # SDPA's own choice: forward and recompute
    for block in model.layers.values():
        block.attn.sdpa_backend = SDPBackend.MATH
    with OpNames() as pinned:
        model(tokens, tokens).backward()
    assert flash not in pinned.names
    assert pinned.names.count("aten._safe_softmax") == 2 * TINY["n_layers"]  # the math kernel: forward and recompute


@pytest.mark.gpu
def test_cudnn_attention_trains_as_sdpas_own_kernel_does():
    """One bf16 step of the tiny model with cuDNN's attention pinned: cuDNN's op runs (not flash), and
    the loss and gradients match SDPA's own choice to bf16 accuracy."""
    if not torch.backends.cudnn.is_available():
        pytest.skip("no cuDNN here")
    tokens = torch.randint(0, TINY["vocab_size"], (2, JOB["seq_len"]), device="cuda")
    results = {}
    for attention in ("sdpa", "cudnn"):
        model = build_model(ModelConfig(**TINY), device="cuda", seed=0).to(torch.bfloat16)
        pin_attention(model, config(attention=attention, precision="bf16").plan)
        with OpNames() as ops:
            loss = model(tokens, tokens)
            loss.backward()
        results[attention] = (loss.float(), [p.grad.float() for p in model.parameters()], ops.names)
    assert "aten._scaled_dot_product_cudnn_attention" in results["cudnn"][2]
    # SDPA's own priority puts FlashAttention first (torch._C._get_sdp_priority_order())
    assert "aten._scaled_dot_product_flash_attention" in results["sdpa"][2]
    assert "aten._scaled_dot_product_cudnn_attention" not in results["sdpa"][2]
    torch.testing.assert_close(results["cudnn"][0], results["sdpa"][0], rtol=2e-2, atol=2e-2)
    for a, b in zip(results["cudnn"][1], results["sdpa"][1]):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)
