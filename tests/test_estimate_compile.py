"""plan.compile in the cost model: a compiled block's fused kernels (autotune/estimate/fusion.py,
docs/formulas.md [Compiled blocks]) against a hand count, and the step it shortens."""
import pytest

from autotune.config import planner_config
from autotune.engine.config import ModelConfig, with_changes
from autotune.estimate import TIME, estimate, plan_frame
from autotune.estimate.arrays import PlanArrays
from autotune.estimate.calibration import Calibration
from autotune.estimate.fusion import compiled_block_traffic, compiled_kernels
from autotune.estimate.routing import expert_routing
from autotune.estimate.traffic import COMPILED_LOSS_PASSES, micro_batch_traffic
from autotune.hardware import load_hardware
from autotune.profile import TRAFFIC_BLOCK_FEATURES, block_features, compiled_saving


def config(model: str, seq_len: int = 1024, **plan):
    cfg = planner_config([f"model={model}", "cluster=8xh100", f"job.seq_len={seq_len}", "job.global_batch=16",
                          "plan.precision=bf16"] + [f"plan.{k}={v}" for k, v in plan.items()])
    return cfg.train, load_hardware(cfg.cluster)


def block_bytes(model: ModelConfig, b: int, s: int, precision: str, cast: str) -> dict[str, float]:
    at = block_features(model, b, s)
    fused = compiled_block_traffic(model, precision, cast)
    return {p: sum(c * at[k] for k, c in fused[f"block_{p}"].items()) for p in ("fwd", "bwd")}


def test_a_compiled_llama_blocks_bytes_are_its_fused_kernels_counted_by_hand():
    """GQA llama, 16 tokens (b=2, s=8) in bf16: h=64, 4 heads of 16, 2 kv heads, f=128. Each kernel
    reads its inputs and writes its outputs once (2 bytes an element, fp32 rstd, fp32 rotary tables)."""
    model = ModelConfig(d_model=64, n_heads=4, n_kv_heads=2, d_ff=128)
    t = 16
    x, q, kv, f = 2 * t * 64, 2 * t * 64, 2 * t * 32, 2 * t * 128  # bytes of one tensor that wide
    rstd, tables = 4 * t, 2 * 8 * 8 * 4  # cos and sin: s rows of d/2 fp32
    fwd = {
        "norm": x + x + rstd,  # read x, write the normed input of q, k, v
        "rope_q": q + tables + q,
        "rope_k": kv + tables + q,  # k rotated and written repeated to the 4 heads SDPA reads
        "repeat_v": kv + q,
        "add_norm": 2 * x + x + x + rstd,  # x + attention: write the sum and its norm
        "swiglu": 2 * f + f,
        "add": 2 * x + x,
    }
    bwd = {
        "swiglu_bwd": 3 * f + 2 * f,  # read the gradient, gate and up; write both gradients
        "norm_bwd_mlp": 2 * x + x + x + rstd + x,  # the gate's and up's gradients, the residual's, x; write
        "rope_q_bwd": q + tables + q,
        "rope_k_bwd": q + tables + kv,  # the group's gradients summed
        "repeat_v_bwd": q + kv,
        "norm_bwd_attention": 3 * x + x + x + rstd + x,  # q's, k's and v's gradients, the residual's, x; write
    }
    assert [k.name for k in compiled_kernels(model, "bf16", "params")] == [
        *fwd, "swiglu_bwd", "norm_bwd", "rope_q_bwd", "rope_k_bwd", "repeat_v_bwd", "norm_bwd"]
    assert block_bytes(model, 2, 8, "bf16", "params") == {"fwd": sum(fwd.values()), "bwd": sum(bwd.values())}


def test_autocast_keeps_the_residual_stream_in_fp32_and_casts_the_gradient():
    """Under autocast the three residual-stream tensors of each add are fp32 and backward casts the
    arriving gradient (read 4, write 2) and writes the residual's gradient again in 16 bits."""
    model = ModelConfig(d_model=64, n_heads=4, n_kv_heads=2, d_ff=128)
    plain, autocast = (block_bytes(model, 2, 8, "bf16", cast) for cast in ("params", "autocast"))
    x = 16 * 64  # elements
    assert autocast["fwd"] - plain["fwd"] == 5 * 2 * x  # x read twice, x1 written and read, the output written: 2 bytes more each
    assert autocast["bwd"] - plain["bwd"] == 6 * 2 * x + (4 + 2) * x + 2 * x


def test_gpt2_blocks_fuse_their_adds_and_norms_but_keep_gelu_and_the_bias_gradients():
    model = ModelConfig(family="gpt2", d_model=64, n_heads=4, d_ff=256)
    names = [k.name for k in compiled_kernels(model, "bf16", "params")]
    assert names[:4] == ["norm", "add_norm", "gelu", "add"]
    assert sum(n.startswith("bias_") for n in names) == 6
    x, f = 2 * 16 * 64, 2 * 16 * 256
    assert block_bytes(model, 2, 8, "bf16", "params")["fwd"] == (2 * x + 8 * 16) + (4 * x + 8 * 16) + 2 * f + 3 * x


@pytest.mark.parametrize("model,zero_stage,dp", [("llama-3-8b", 3, 8), ("llama-3-8b", 0, 1), ("gpt2", 0, 1)])
def test_compiling_moves_less_than_the_engines_eager_ops(model, zero_stage, dp):
    """The eager count (measured on the engine's model) runs every op as its own pass: the fused
    kernels move less in each phase (16-bit weights and autocast), and launch fewer kernels than
    eager dispatches ops."""
    cfg, _ = config(model, micro_batch=2, zero_stage=zero_stage, dp=dp)
    frame = plan_frame([cfg.plan, with_changes(cfg, plan={"compile": True, "compile_loss": False}).plan,
                        with_changes(cfg, plan={"compile": True}).plan])
    plans = PlanArrays.of(frame, cfg.job)
    traffic = micro_batch_traffic(cfg.model, plans, cfg.job.seq_len, expert_routing(cfg.model, plans, cfg.job.seq_len,
                                                                                   Calibration()))
    for key in ("block_fwd", "block_bwd", "block_ops"):
        eager, compiled, _ = traffic[key]
        assert 0 < compiled < eager, key
    for phase in ("fwd", "bwd"):
        eager, blocks_only, with_loss = traffic[f"outside_{phase}"]
        assert blocks_only == eager  # compile_loss=false: the engine compiles the blocks only
        # the compiled loss's passes over the 16-bit logits in place of eager's fp32 ops
        logits = 2 * cfg.job.seq_len * cfg.model.vocab_size
        assert eager - with_loss > logits * 2 * COMPILED_LOSS_PASSES[phase], phase


def test_compile_shortens_the_step_only_through_the_memory_bound_ops_and_their_dispatch():
    cfg, hw = config("llama-3.2-1b", micro_batch=2, zero_stage=0, activation_checkpointing="op", compile_loss=False)
    eager, compiled = (estimate(with_changes(cfg, plan={"compile": c}), hw) for c in (False, True))
    assert compiled.compute["matmul_s"] == eager.compute["matmul_s"]
    assert compiled.compute["attention_s"] == eager.compute["attention_s"]
    saved = eager.compute["memory_s"] - compiled.compute["memory_s"]
    assert saved > 0.1 * eager.compute["memory_s"]
    computed = ("forward", "backward", "recompute")
    assert sum(eager.time[f"{k}_s"] - compiled.time[f"{k}_s"] for k in computed) == pytest.approx(saved)
    assert eager.time["overhead_s"] > compiled.time["overhead_s"]
    for part in TIME:
        if part not in (*computed, "overhead"):
            assert compiled.time[f"{part}_s"] == eager.time[f"{part}_s"], part
    # what the blocks keep for backward: less by what inductor recomputes (tests/test_profile_compiled_and_cuda.py)
    per_h, per_f, per_block = compiled_saving("llama", "bf16", "autocast", "op2")  # ZeRO 0: autocast
    tokens = 2 * cfg.job.seq_len
    less = cfg.model.n_layers * (tokens * (per_h * cfg.model.d_model + per_f * cfg.model.d_ff) + per_block)
    assert eager.memory["activations_bytes"] - compiled.memory["activations_bytes"] == pytest.approx(less)
    following = ("activations_bytes", "allocator_bytes", "total_bytes")  # the allocator's share follows the rest
    assert {k: v for k, v in compiled.memory.items() if k not in following} == {
        k: v for k, v in eager.memory.items() if k not in following}
    assert set(TRAFFIC_BLOCK_FEATURES) >= {k for p in ("fwd", "bwd") for k in
                                           compiled_block_traffic(cfg.model, "bf16", "params")[f"block_{p}"]}


def test_a_compiled_loss_holds_the_16_bit_logits_and_their_gradient_alone():
    """plan.compile_loss: inductor's fused loss saves the logits (16-bit) and writes their 16-bit
    gradient, where torch's eager loss saves fp32 log-probabilities and makes two fp32 gradients
    (tests/test_estimate.py measures both on the engine's model); under tp the loss stays eager."""
    cfg, hw = config("llama-3.2-1b", micro_batch=2, zero_stage=3, dp=8, compile=True)
    blocks_only, with_loss = (estimate(with_changes(cfg, plan={"compile_loss": c}), hw) for c in (False, True))
    logits = 2 * cfg.job.seq_len * cfg.model.vocab_size
    assert blocks_only.memory["logits_bytes"] - with_loss.memory["logits_bytes"] == pytest.approx((4 + 8 - 2 - 2) * logits, rel=0.05)
    assert with_loss.step_time_s < blocks_only.step_time_s
    under_tp = with_changes(cfg, plan={"dp": 4, "tp": 2})
    assert (estimate(under_tp, hw).memory["logits_bytes"]
            == estimate(with_changes(under_tp, plan={"compile_loss": False}), hw).memory["logits_bytes"])
