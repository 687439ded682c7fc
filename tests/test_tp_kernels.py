"""plan.kernels=triton under tensor parallelism: 2 gloo ranks with plan.tp=2 running the Triton kernels
(Triton's interpreter) give the loss and gradient-norm trajectory of one process with plan.kernels=torch.

The plans cover the kernels' two ways into a tp model: RoPE, SwiGLU and the norms on plain local
tensors (llama, tp=2), and the norms on sequence-sharded DTensors whose weight gradients are partial
sums over tp (llama and gpt2 with sequence parallel; gpt2's LayerNorm also has a bias, under FSDP2).
Each rank counts the kernels it launched: the expected ones ran, and the fused linear cross-entropy
did not (the head is vocabulary-sharded; torch's loss runs under loss_parallel).

Tolerance: everything is fp32. The kernels and DTensor's collectives sum in other orders than the
torch reference (about 1e-7 relative per reduction), and a few AdamW steps at lr 1e-2 leave the
trajectories about 1e-7 apart (observed). 1e-5 keeps a 100x margin for that, while a wrong
gradient fails: with the norm weights' gradients left unsummed over tp (each rank's rows only),
the gradient norm is off by 8e-5 (llama) and 1e-4 (gpt2) relative at step 0, 4e-4 and 1e-3 at step 1.

The 2 ranks run in tests/conftest.py's two_rank_run (one launch shared with other modules).
"""
from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch

STEPS = 3
# the interpreter runs a kernel's programs one by one (one per row for the norms and RoPE): few rows
LLAMA = dict(name="tiny", family="llama", n_layers=2, d_model=16, n_heads=4, n_kv_heads=2, d_ff=32,
             vocab_size=64, max_seq_len=16)
GPT2 = dict(name="tiny-gpt2", family="gpt2", n_layers=1, d_model=16, n_heads=4, d_ff=32, vocab_size=64,
            max_seq_len=16, tie_embeddings=True)
PLANS = {
    "llama_tp2": (LLAMA, dict(tp=2)),
    "llama_tp2_sp_full_ckpt": (LLAMA, dict(tp=2, sequence_parallel=True, activation_checkpointing="full")),
    "gpt2_tp2_sp_zero2": (GPT2, dict(tp=2, sequence_parallel=True, zero_stage=2)),
}
KERNELS = {
    "llama": {"_rms_norm_fwd", "_rms_norm_bwd", "_rope_kernel", "_swiglu_fwd", "_swiglu_bwd"},
    "gpt2": {"_layer_norm_fwd", "_layer_norm_bwd"},
}


def config(model: dict, **plan) -> dict:
    # two micro-batches of one sequence: gradients accumulate, and each kernel sees 8 rows (4 per rank with sp)
    job = {"seq_len": 8, "global_batch": 2, "steps": STEPS, "seed": 3, "optimizer": {"lr": 1e-2, "warmup_steps": 1}}
    return {"model": model, "job": job, "plan": {"micro_batch": 1, **plan}}


def train(config: dict) -> dict:
    """Loss and gradient norm (before clipping) of each step, and the Triton kernels launched."""
    from autotune.engine import dist
    from autotune.engine.config import build_train_config
    from autotune.engine.train import Engine, reduce_loss
    from autotune.kernels._common import LazyKernel

    cfg = build_train_config(config)
    launches: collections.Counter = collections.Counter()
    launch = LazyKernel.__getitem__

    def counted(kernel: LazyKernel, grid):
        launches[kernel.fn.__name__] += 1
        return launch(kernel, grid)

    LazyKernel.__getitem__ = counted
    try:
        engine = Engine(cfg, dist.device_for_rank())
        results = [engine.step(step) for step in range(cfg.job.steps)]
    finally:
        LazyKernel.__getitem__ = launch
    return {"loss": [reduce_loss(r.loss)[0] for r in results], "grad_norm": [float(r.grad_norm) for r in results],
            "kernels": sorted(launches)}


def on_two_ranks() -> dict:
    """Run on every rank (tests/tp_pp_worker.py's call): each plan's trajectory with the Triton
    kernels, and the kernels the rank launched (OUT keeps rank 0's; tp ranks hold the same losses)."""
    return {name: train(config(model, kernels="triton", **plan)) for name, (model, plan) in PLANS.items()}


def two_rank_spec(root: Path) -> dict:
    """What test_triton_kernels_under_tp_match_one_torch_process runs on 2 ranks (tests/tp_pp_worker.py's SPEC)."""
    return {"calls": {__name__: f"{__name__}:on_two_ranks"}}


def test_triton_kernels_under_tp_match_one_torch_process(two_rank_run):
    result = two_rank_run["out"][__name__]

    from autotune.engine import dist

    dist.init_distributed()
    try:
        reference = {family: train(config(model, kernels="torch")) for family, model in (("llama", LLAMA), ("gpt2", GPT2))}
    finally:
        dist.shutdown()

    for name, (model, _) in PLANS.items():
        family = model["family"]
        assert set(result[name]["kernels"]) == KERNELS[family], name
        for key in ("loss", "grad_norm"):
            got, want = result[name][key], reference[family][key]
            assert len(got) == STEPS
            for step, (g, w) in enumerate(zip(got, want)):
                assert abs(g - w) / w < 1e-5, (name, key, step, g, w)
    for family in ("llama", "gpt2"):
        assert reference[family]["kernels"] == []
        losses = reference[family]["loss"]
        assert max(losses) - min(losses) > 1e-3 * max(losses)  # steps differ by far more than the tolerance


def test_local_rows_runs_on_the_local_rows_and_leaves_weight_grads_partial():
    """On a one-rank tp mesh: the output keeps x's placements and equals the kernel on the whole x;
    the weight gradient is Partial (summed over tp where used); rows split over their last dim are refused."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor

    from autotune import kernels
    from autotune.engine import dist
    from autotune.engine.tensor_parallel import local_rows

    dist.init_distributed()
    try:
        mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("tp",))
        x, w = torch.randn(2, 4, 6), torch.randn(6, requires_grad=True)
        xd = distribute_tensor(x, mesh, [Shard(1)])
        wd = distribute_tensor(w.detach(), mesh, [Replicate()]).requires_grad_()
        y = local_rows(kernels.rms_norm, xd, wd, eps=1e-6, impl="torch")
        assert y.placements == (Shard(1),)
        torch.testing.assert_close(y.full_tensor(), kernels.rms_norm_torch(x, w, 1e-6))
        y.to_local().sum().backward()
        assert wd.grad.placements == (Partial(),)
        kernels.rms_norm_torch(x, w, 1e-6).sum().backward()
        torch.testing.assert_close(wd.grad.full_tensor(), w.grad)
        with pytest.raises(ValueError, match="whole rows"):
            local_rows(kernels.rms_norm, distribute_tensor(x, mesh, [Shard(2)]), wd, impl="torch")
        with pytest.raises(ValueError, match="replicated"):
            local_rows(kernels.rms_norm, xd, w, impl="torch")
    finally:
        dist.shutdown()
