"""What a compiled block keeps for backward against the eager one (autotune.profile.COMPILED_SAVING,
docs/formulas.md [Compiled blocks]): measured again on the engine's model, compiled as the engine
compiles it, at a shape the table was not measured at and one it was."""
import pytest

from autotune.engine.config import ModelConfig
from autotune.profile import compiled_saving, measure_compiled_saving

SHAPES = ((48, 112, 1, 40), (64, 160, 2, 32))  # (h, f, b, s)


@pytest.mark.parametrize("family, precision, cast, checkpointing, every_k", [
    ("llama", "bf16", "params", "none", 2),  # the norms' fp32 intermediates and silu(gate) recomputed
    ("llama", "bf16", "params", "op", 2),
    ("gpt2", "bf16", "autocast", "none", 2),
])
def test_a_compiled_block_keeps_what_the_table_says_less(family, precision, cast, checkpointing, every_k):
    variant = "op2" if checkpointing == "op" else checkpointing
    per_h, per_f, per_block = compiled_saving(family, precision, cast, variant)
    assert per_h > 0
    for h, f, b, s in SHAPES:
        model = ModelConfig(name="t", family=family, n_layers=2, d_model=h, n_heads=4,
                            n_kv_heads=2 if family == "llama" else 4, d_ff=f, vocab_size=96, max_seq_len=64,
                            tie_embeddings=family == "gpt2")
        assert measure_compiled_saving(model, b, s, precision, cast, checkpointing, every_k) == (
            b * s * (per_h * h + per_f * f) + per_block), (h, f, b, s)


def test_full_checkpointing_keeps_the_same_compiled_or_not():
    model = ModelConfig(name="t", n_layers=2, d_model=48, n_heads=4, n_kv_heads=2, d_ff=112, vocab_size=96,
                        max_seq_len=64)
    assert compiled_saving("llama", "bf16", "params", "full") == (0, 0, 0)
    assert measure_compiled_saving(model, 1, 40, "bf16", "params", "full") == 0
