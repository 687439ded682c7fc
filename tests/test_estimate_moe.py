"""The cost model of mixture-of-experts plans (autotune.estimate): what a rank holds under expert
parallelism x ZeRO against the engine itself (4 gloo ranks), the routed tokens' activations and
traffic against measurements of the engine's MoE blocks, the all-to-alls and the load imbalance."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from autotune.config import ClusterConfig
from autotune.engine.config import build_train_config
from autotune.estimate import estimate
from autotune.hardware import load_hardware

ROOT = Path(__file__).resolve().parents[1]
TINY_MOE = yaml.safe_load((ROOT / "conf" / "model" / "tiny-moe.yaml").read_text()) | {"max_seq_len": 32}
TWO_EXPERTS = TINY_MOE | {"n_experts": 2, "experts_per_token": 1}  # fewer experts than dp ranks: uneven shards

# --- model states against the engine (4 gloo ranks) ---------------------------------------------

WORKER = r"""
import json, sys
import torch
torch.set_num_threads(1)
from torch.distributed.tensor import DTensor
from autotune.engine import dist
from autotune.engine.config import build_train_config
from autotune.engine.parallel import autocast, gradient_sync
from autotune.engine.tensor_parallel import loss_context
from autotune.engine.train import Engine

def nbytes(t):
    t = t.to_local() if isinstance(t, DTensor) else t
    return t.numel() * t.element_size()

device = dist.init_distributed()
out = {}
for name, config in json.loads(open(sys.argv[1]).read()).items():
    cfg = build_train_config(config)
    eng = Engine(cfg, device)
    eng.step(0)  # AdamW states exist after a step; the step then drops the gradients (set_to_none)
    if cfg.plan.pp == 1:  # the gradients of one more backward (a pipeline's schedule runs its own)
        inputs, targets = eng.batches(1)[0]
        with gradient_sync(eng.model, True), loss_context(cfg.plan), autocast(cfg.plan, device):
            eng.model(inputs, targets).backward()
    opt = eng.optimizer.optim if hasattr(eng.optimizer, "optim") else eng.optimizer
    out[name] = {
        "params": sum(nbytes(p) for p in eng.model.parameters()),
        "grads": sum(nbytes(p.grad) for p in eng.model.parameters() if p.grad is not None),
        "optimizer": sum(nbytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v)),
    }
    del eng
json.dump(out, open(sys.argv[2] + f".{dist.rank()}", "w"))
dist.shutdown()
"""


def plan_config(model: dict, **plan) -> dict:
    return {"model": model, "job": {"seq_len": 16, "global_batch": 4}, "plan": {"dp": 4, **plan}}


STATES = {
    "zero0_ep2": plan_config(TINY_MOE, zero_stage=0, ep=2, precision="bf16"),  # FSDP2's replicate, not DDP
    "zero1_ep2": plan_config(TINY_MOE, zero_stage=1, ep=2),  # ShardedOptimizer: experts over edp, the rest over dp
    "zero1_ep4": plan_config(TINY_MOE, zero_stage=1, ep=4),
    "zero1_ep1": plan_config(TINY_MOE, zero_stage=1, ep=1),  # ZeroRedundancyOptimizer over everything
    "zero2_ep2": plan_config(TINY_MOE, zero_stage=2, ep=2, precision="bf16"),
    "zero3_ep2": plan_config(TINY_MOE, zero_stage=3, ep=2, precision="bf16"),
    "zero3_ep4": plan_config(TINY_MOE, zero_stage=3, ep=4, precision="bf16"),  # edp = 1: experts unsharded
    "two_zero3_ep2": plan_config(TWO_EXPERTS, zero_stage=3, ep=2, precision="bf16"),  # 1 expert over 2 edp ranks
    "two_zero3_ep1": plan_config(TWO_EXPERTS, zero_stage=3, ep=1, precision="bf16"),  # 2 experts over 4 dp ranks
    "two_zero1_ep2": plan_config(TWO_EXPERTS, zero_stage=1, ep=2),
    "pp2_zero1_ep2": plan_config(TINY_MOE, zero_stage=1, dp=2, pp=2, ep=2, micro_batch=1),
}


@pytest.mark.slow
def test_model_states_equal_what_the_engine_holds_under_expert_parallelism(tmp_path):
    """Expert parallelism x ZeRO 0-3 (and x pp) on 4 gloo ranks: params, grads and AdamW states in
    bytes after a step equal the estimate's exactly, the estimate's rank being the one that holds the
    most (ranks of a ZeRO-1 partition, or of an uneven FSDP2 shard, hold different amounts)."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(STATES))
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                        str(worker), str(spec), str(tmp_path / "held")], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    held = [json.loads((tmp_path / f"held.{rank}").read_text()) for rank in range(4)]
    hw = load_hardware(ClusterConfig(gpu="h100-sxm", gpus_per_node=4))
    for name, config in STATES.items():
        est = estimate(build_train_config(config), hw).model_states
        keys = ("params", "optimizer") if config["plan"].get("pp", 1) > 1 else ("params", "grads", "optimizer")
        for key in keys:
            assert max(h[name][key] for h in held) == est[f"{key}_bytes"], (name, key, [h[name][key] for h in held])
    # the ranks really differ where the test says they do
    assert len({h["two_zero3_ep2"]["params"] for h in held}) > 1 and len({h["zero1_ep2"]["optimizer"] for h in held}) > 1
