"""The cost model of mixture-of-experts plans (autotune.estimate): what a rank holds under expert
parallelism x ZeRO against the engine itself (4 gloo ranks, in tests/conftest.py's four_rank_run:
one launch shared with other modules), the routed tokens' activations and traffic against
measurements of the engine's MoE blocks, the all-to-alls and the load imbalance."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from autotune.config import ClusterConfig
from autotune.engine import dist
from autotune.engine.config import TrainConfig, build_train_config
from autotune.engine.moe import moe_layers
from autotune.engine.parallel import autocast, gradient_sync, local_tensor, unwrap
from autotune.engine.tensor_parallel import loss_context
from autotune.engine.train import Engine
from autotune.estimate import estimate
from autotune.hardware import load_hardware

ROOT = Path(__file__).resolve().parents[1]
TINY_MOE = yaml.safe_load((ROOT / "conf" / "model" / "tiny-moe.yaml").read_text()) | {"max_seq_len": 32}
TWO_EXPERTS = TINY_MOE | {"n_experts": 2, "experts_per_token": 1}  # fewer experts than dp ranks: uneven shards

# --- model states against the engine (4 gloo ranks) ---------------------------------------------


def nbytes(t: torch.Tensor) -> int:
    return local_tensor(t).numel() * t.element_size()


def states(engine: Engine, cfg: TrainConfig) -> dict[str, int]:
    """The bytes of parameters, gradients and AdamW states this rank holds after a step, with the
    gradients of one more backward (the step drops its own: set_to_none)."""
    engine.step(0)
    if cfg.plan.pp == 1:  # a pipeline's schedule runs its own backward
        inputs, targets = engine.batches(1)[0]
        with gradient_sync(engine.model, cfg.plan, True), loss_context(cfg.plan), autocast(cfg.plan, engine.device):
            engine.model(inputs, targets).backward()
    opt = engine.optimizer
    return {"params": sum(nbytes(p) for p in engine.model.parameters()),
            "grads": sum(nbytes(p.grad) for p in engine.model.parameters() if p.grad is not None),
            "optimizer": sum(nbytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v))}


def saved(engine: Engine, cfg: TrainConfig) -> dict[str, int]:
    """The bytes the MoE blocks save for backward on this rank, apart from their routed experts
    ("block") and by them ("experts"), and the rows that reach this rank's experts; the parameters
    a module computes with (under replicate and FSDP2, unsharded copies) are not activations."""
    net = unwrap(engine.model)
    held = {local_tensor(t).untyped_storage().data_ptr() for t in [*net.parameters(), *net.buffers()]}
    owner, seen, rows = ["outside"], {}, [0]

    def enter(mod, who, arriving=0):
        held.update(local_tensor(p).untyped_storage().data_ptr() for p in mod.parameters())
        owner[0] = who
        rows[0] += arriving

    for i, layer in moe_layers(net).items():
        net.layers[str(i)].register_forward_pre_hook(lambda mod, args: enter(mod, "block"))
        net.layers[str(i)].register_forward_hook(lambda mod, args, out: owner.__setitem__(0, "outside"))
        layer.experts.register_forward_pre_hook(lambda mod, args: enter(mod, "experts", args[0].shape[0]))
        layer.experts.register_forward_hook(lambda mod, args, out: owner.__setitem__(0, "block"))

    def pack(t):
        local = local_tensor(t)
        try:
            key, size = local.untyped_storage().data_ptr(), local.untyped_storage().nbytes()
        except RuntimeError:  # a tensor subclass without a storage of its own
            key, size = ("id", id(local)), local.numel() * local.element_size()
        if key not in held and key not in seen and size > 0:
            seen[key] = (owner[0], size)
        return t

    inputs, targets = engine.batches(0)[0]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(cfg.plan, engine.device):
        engine.model(inputs, targets)
    return {who: sum(n for w, n in seen.values() if w == who) for who in ("block", "experts")} | {"rows": rows[0]}


def plan_config(model: dict, seq_len: int = 16, global_batch: int = 4, **plan) -> dict:
    return {"model": model, "job": {"seq_len": seq_len, "global_batch": global_batch}, "plan": {"dp": 4, **plan}}


STATES = {
    "zero0_ep2": plan_config(TINY_MOE, zero_stage=0, ep=2, precision="bf16"),  # FSDP2's replicate, not DDP
    "zero1_ep2": plan_config(TINY_MOE, zero_stage=1, ep=2),  # FSDP2: experts sharded over edp, the rest over dp
    "zero1_ep4": plan_config(TINY_MOE, zero_stage=1, ep=4),
    "zero1_ep1": plan_config(TINY_MOE, zero_stage=1, ep=1),
    "zero2_ep2": plan_config(TINY_MOE, zero_stage=2, ep=2, precision="bf16"),
    "zero3_ep2": plan_config(TINY_MOE, zero_stage=3, ep=2, precision="bf16"),
    "zero3_ep4": plan_config(TINY_MOE, zero_stage=3, ep=4, precision="bf16"),  # edp = 1: experts unsharded
    "two_zero3_ep2": plan_config(TWO_EXPERTS, zero_stage=3, ep=2, precision="bf16"),  # 1 expert over 2 edp ranks
    "two_zero3_ep1": plan_config(TWO_EXPERTS, zero_stage=3, ep=1, precision="bf16"),  # 2 experts over 4 dp ranks
    "two_zero1_ep2": plan_config(TWO_EXPERTS, zero_stage=1, ep=2),
    "pp2_zero1_ep2": plan_config(TINY_MOE, zero_stage=1, dp=2, pp=2, ep=2, micro_batch=1),
}


SAVED = {  # micro-batches of 2 x 32 tokens
    "saved_ep2": plan_config(TINY_MOE, 32, 8, ep=2, micro_batch=2, precision="bf16"),  # autocast
    "saved_ep4": plan_config(TINY_MOE, 32, 8, ep=4, micro_batch=2),
    "saved_ep1": plan_config(TINY_MOE, 32, 8, ep=1, micro_batch=2),
}


def on_four_ranks() -> list[dict]:
    """Run on every rank (tests/tp_pp_worker.py's call): what each rank holds and saves under the
    plans of STATES and SAVED, in rank order."""
    mine = {}
    for name, config in (STATES | SAVED).items():
        cfg = build_train_config(config)
        engine = Engine(cfg, dist.device_for_rank())
        mine[name] = saved(engine, cfg) if name in SAVED else states(engine, cfg)
        del engine
    every: list = [None] * dist.world_size()
    torch.distributed.all_gather_object(every, mine)
    return every


def four_rank_spec(root: Path) -> dict:
    """What the model-state and routed-expert tests run on 4 ranks (tests/tp_pp_worker.py's SPEC)."""
    return {"calls": {__name__: f"{__name__}:on_four_ranks"}}


@pytest.fixture(scope="module")
def held_by_the_engine(four_rank_run) -> list[dict]:
    """What each of 4 gloo ranks holds and saves under the plans of STATES and SAVED, run in
    tests/conftest.py's four_rank_run (one launch shared with other modules)."""
    return four_rank_run["out"][__name__]


@pytest.mark.slow
def test_model_states_equal_what_the_engine_holds_under_expert_parallelism(held_by_the_engine):
    """Expert parallelism x ZeRO 0-3 (and x pp) on 4 gloo ranks: params, grads and AdamW states in
    bytes after a step equal the estimate's exactly, the estimate's rank being the one that holds the
    most (ranks of an uneven FSDP2 shard hold different amounts)."""
    held = held_by_the_engine
    hw = load_hardware(ClusterConfig(gpu="h100-sxm", gpus_per_node=4))
    for name, config in STATES.items():
        est = estimate(build_train_config(config), hw).model_states
        keys = ("params", "optimizer") if config["plan"].get("pp", 1) > 1 else ("params", "grads", "optimizer")
        for key in keys:
            assert max(h[name][key] for h in held) == est[f"{key}_bytes"], (name, key, [h[name][key] for h in held])
    # the ranks really differ where the test says they do
    assert len({h["two_zero3_ep2"]["params"] for h in held}) > 1 and len({h["two_zero1_ep2"]["optimizer"] for h in held}) > 1


@pytest.mark.slow
def test_routed_experts_save_what_reaches_their_rank(held_by_the_engine):
    """Under expert parallelism each rank's experts save for backward what the measured fit says of
    the rows that reached them (uneven between ranks), with E/ep experts' weights cast by autocast;
    the rest of a MoE block saves what it saves without ep (the exchange adds a few index vectors)."""
    from autotune.profile import (
        EXPERT_FEATURES, MOE_FEATURES, activation_key, expert_features, moe_activation_coefficients, moe_features,
    )

    for name, config in SAVED.items():
        cfg = build_train_config(config)
        model, plan = cfg.model, cfg.plan
        cast = "autocast" if plan.precision != "fp32" else "params"
        fit = moe_activation_coefficients(model)[activation_key(str(plan.precision), cast, "none", "torch")]
        layers, slots = len(model.moe_layers), plan.micro_batch * 32 * model.experts_per_token
        block = layers * sum(fit["moe"][k] * v for k, v in moe_features(model, plan.micro_batch, 32).items()
                             if k in MOE_FEATURES)
        arrived = [h[name]["rows"] for h in held_by_the_engine]
        for got, rows in zip((h[name] for h in held_by_the_engine), arrived):
            at = expert_features(model, plan.micro_batch, 32, rows / (layers * slots), plan.ep)
            assert got["experts"] == pytest.approx(layers * sum(fit["experts"][k] * at[k] for k in EXPERT_FEATURES),
                                                   rel=0.01), name
            assert got["block"] == pytest.approx(block, rel=0.03), name
        assert sum(arrived) == 4 * layers * slots  # every slot computed once (dropless)
        assert plan.ep == 1 or len(set(arrived)) > 1  # and not evenly: the busiest rank is busier


# --- in one process ------------------------------------------------------------------------------

H100 = load_hardware(ClusterConfig(name="8xh100", gpu="h100-sxm", gpus_per_node=8))


def mixtral(**plan):
    from autotune.config import planner_config

    return planner_config(["model=mixtral-8x7b", "cluster=8xh100", "job.seq_len=4096", "job.global_batch=32",
                           "plan.dp=8", "plan.precision=bf16"] + [f"plan.{k}={v}" for k, v in plan.items()]).train


def test_expert_parallelism_divides_the_routed_experts_states():
    """Mixtral-8x7B on 8 GPUs: ep cuts each rank's routed experts to E/ep, the rest stays whole;
    under ZeRO-3 the states are sharded over all 8 ranks anyway, but the units FSDP2 gathers shrink."""
    from autotune.engine.model import count_params, expert_params
    from autotune.estimate import rank_layout

    model = mixtral().model
    for ep in (1, 2, 4, 8):
        held = rank_layout(model, dp=8, tp=1, pp=1, v=1, ep=ep)["first"]
        assert held["experts"] == expert_params(model) // ep
        assert held["local"] == count_params(model) - expert_params(model) + expert_params(model) // ep
    zero0 = [estimate(mixtral(zero_stage=0, ep=ep), H100).model_states["params_bytes"] for ep in (1, 8)]
    assert zero0[0] - zero0[1] == 4 * expert_params(model) * 7 // 8
    zero3 = [estimate(mixtral(zero_stage=3, ep=ep), H100).memory for ep in (1, 8)]
    assert zero3[0]["params_bytes"] == pytest.approx(zero3[1]["params_bytes"], rel=1e-6)
    assert zero3[1]["param_copies_bytes"] < zero3[0]["param_copies_bytes"]


def test_the_moe_input_crosses_the_all_to_all_in_the_dtype_the_estimate_says():
    """The rows the dispatch moves are the MoE layer's input: fp32 under autocast (the residual
    stream's norm), the compute dtype under 16-bit parameters; the experts return the compute dtype."""
    from autotune.engine.model import build_model
    from autotune.estimate.arrays import PlanArrays
    from autotune.estimate.calibration import Calibration
    from autotune.estimate.routing import expert_routing
    from autotune.plans import plans_frame
    from autotune.engine.config import PlanConfig

    cfg = build_train_config({"model": TINY_MOE, "job": {"seq_len": 16, "global_batch": 2}})
    plans = [PlanConfig(precision="fp32"), PlanConfig(precision="bf16", zero_stage=0),
             PlanConfig(precision="bf16", zero_stage=2)]
    routing = expert_routing(cfg.model, PlanArrays.of(plans_frame(plans), cfg.job), 16, Calibration())
    for plan, dispatch, combine in zip(plans, routing.dispatch_bytes, routing.combine_bytes):
        net = build_model(cfg.model)
        if plan.zero_stage >= 1:  # FSDP2 computes with 16-bit parameters
            net = net.to(torch.bfloat16)
        seen = []
        net.layers["1"].mlp.experts.register_forward_hook(lambda mod, args, out: seen.append((args[0], out)))
        tokens = torch.randint(0, cfg.model.vocab_size, (2, 16))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=plan.precision == "bf16" and plan.zero_stage == 0):
            net(tokens, tokens)
        rows, out = seen[0]
        assert (rows.element_size(), out.element_size()) == (dispatch, combine), plan


def test_an_evenly_routing_router_shows_the_imbalance_the_prior_says():
    """The prior imbalance is the largest of E multinomial counts: against routers drawing k
    distinct experts per token uniformly at random."""
    from autotune.estimate.routing import uniform_imbalance

    rng = np.random.default_rng(0)
    for experts, k, tokens in ((8, 2, 512), (8, 2, 4096), (64, 8, 2048), (16, 1, 1000)):
        chosen = np.argsort(rng.random((300, tokens, experts)), axis=2)[:, :, :k]
        counts = np.stack([np.bincount(c.ravel(), minlength=experts) for c in chosen])
        simulated = (counts.max(axis=1) / counts.mean(axis=1)).mean()
        assert uniform_imbalance(experts, np.array([tokens * k]))[0] == pytest.approx(simulated, rel=0.02)


def test_the_busiest_rank_carries_the_imbalance_its_experts_share():
    from autotune.estimate.routing import busiest_rank_load

    imbalance = np.array([1.0, 1.5, 3.0])
    assert busiest_rank_load(imbalance, 8, np.ones(3)) == pytest.approx(np.ones(3))  # every expert here
    assert busiest_rank_load(imbalance, 8, np.full(3, 8)) == pytest.approx(imbalance)  # one expert per rank
    two, four = busiest_rank_load(imbalance, 8, np.full(3, 2)), busiest_rank_load(imbalance, 8, np.full(3, 4))
    assert np.all((1 <= two) & (two <= four) & (four <= imbalance))
    # the load adds up: the busiest rank's experts plus the others' at the mean of the rest
    local = 4
    assert two[1] * local == pytest.approx(1.5 + (local - 1) * (8 - 1.5) / 7)


def test_all_to_alls_are_two_each_way_per_moe_layer_over_nvlink_or_the_nics():
    """Mixtral on one node of 8: per micro-batch and MoE layer, forward the counts, the dispatch and
    the combine, backward two more, each moving (ep−1)/ep of the busiest rank's slots of d_model
    values; across nodes the part that leaves the node goes over the NICs."""
    from autotune.estimate.arrays import PlanArrays
    from autotune.estimate.calibration import Calibration
    from autotune.estimate.routing import all_to_all_time, expert_routing
    from autotune.plans import plans_frame

    cfg = mixtral(zero_stage=3, ep=8, micro_batch=2)
    model, plans = cfg.model, PlanArrays.of(plans_frame([cfg.plan]), cfg.job)
    routing = expert_routing(model, plans, 4096, Calibration())
    layers = np.array([32.0])
    slots = 2 * 4096 * 2 * routing.arrived[0]  # micro-batch x sequence x k, at the busiest rank
    one_way = slots * model.d_model * (2 + 2) * 7 / 8 / H100.intra_node_bytes_per_s  # bf16 rows both ways
    expected = plans.micro_batches[0] * 32 * (2 * one_way + 5 * H100.collective_latency_s)
    assert all_to_all_time(model, 4096, plans, routing, layers, H100, Calibration().collective_efficiency)[0] == pytest.approx(expected)
    assert estimate(cfg, H100).time["ep_comm_s"] == pytest.approx(expected)
    assert estimate(mixtral(zero_stage=3, ep=1, micro_batch=2), H100).time["ep_comm_s"] == 0
    nodes = load_hardware(ClusterConfig(gpu="h100-sxm", gpus_per_node=4, nodes=2, inter_node_gbps=46))
    across = all_to_all_time(model, 4096, plans, routing, layers, nodes, Calibration().collective_efficiency)[0]
    assert across > expected  # half of each rank's slots leave the node, over a NIC slower than NVLink
    # a recomputed layer runs its forward's three again
    ckpt = estimate(mixtral(zero_stage=3, ep=8, micro_batch=2, activation_checkpointing="full"), H100)
    assert ckpt.time["ep_comm_s"] == pytest.approx(expected * (2 * one_way + 5 * H100.collective_latency_s + one_way
                                                               + 3 * H100.collective_latency_s)
                                                   / (2 * one_way + 5 * H100.collective_latency_s))


def test_a_measured_imbalance_slows_expert_parallel_plans_only():
    """fit_calibration takes the probe's measured imbalance (the median over records); with it
    the busiest rank computes and receives more under ep, and a plan without ep is as before."""
    from autotune.estimate import Calibration, fit_calibration

    records = [{**plan_config(TINY_MOE, ep=2, zero_stage=0), "step_time_s": t, "peak_mem_bytes": 2e8,
                "moe": {"imbalance": imbalance, "aux_loss": 0.01}}
               for t, imbalance in ((0.2, 1.4), (0.21, 1.6), (0.19, 1.5))]
    calib = fit_calibration(records, H100)
    assert calib.moe_imbalance == pytest.approx(1.5)
    assert fit_calibration([{k: v for k, v in r.items() if k != "moe"} for r in records], H100).moe_imbalance is None
    learned = Calibration(moe_imbalance=1.5)
    for ep, slower in ((8, True), (1, False)):
        before, after = estimate(mixtral(zero_stage=3, ep=ep), H100), estimate(mixtral(zero_stage=3, ep=ep), H100, learned)
        assert (after.step_time_s > before.step_time_s) == slower
        assert (after.time["ep_comm_s"] > before.time["ep_comm_s"]) == slower
        assert (after.memory["activations_bytes"] > before.memory["activations_bytes"]) == slower
    assert "moe_imbalance" in learned.changes(H100)


def test_estimated_activations_of_a_moe_plan_are_what_the_engine_saves():
    """tiny-moe on one rank (a dense block and three MoE blocks): what the estimate holds for one
    micro-batch (activations, autocast's weight copies, logits) against a measured forward of the
    engine's model, dropless and at a capacity factor (the estimate's bound: no more than cf of
    the slots are kept)."""
    from autotune.estimate.memory import loss_gradient_bytes
    from autotune.profile import measure_saved_bytes

    for precision, zero, moe in (("fp32", 0, {}), ("bf16", 0, {}), ("bf16", 2, {}), ("bf16", 2, {"capacity_factor": 0.5})):
        cfg = build_train_config({"model": TINY_MOE | {"max_seq_len": 64} | moe, "job": {"seq_len": 64, "global_batch": 4},
                                  "plan": {"precision": precision, "zero_stage": zero, "micro_batch": 4}})
        est = estimate(cfg, dataclasses.replace(H100, device="cpu")).memory  # measured on the CPU, its RMSNorm
        held = est["activations_bytes"] + est["logits_bytes"] + (est["param_copies_bytes"] if zero < 2 else 0)
        cast = "autocast" if precision != "fp32" and zero < 2 else "params"
        measured = measure_saved_bytes(cfg.model, 4, 64, precision, cast)
        logits_grad = loss_gradient_bytes(cfg.model, 4 * 64, False)  # the unfused loss's backward makes these; not saved
        if moe:
            assert held - logits_grad >= measured["total"] * 0.98
            assert held - logits_grad == pytest.approx(measured["total"], rel=0.15)
        else:
            assert held - logits_grad == pytest.approx(measured["total"], rel=0.03), (precision, zero)
