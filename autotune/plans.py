"""Every valid way to run one job on one cluster, as a pandas DataFrame (one row per plan), and the
one conversion between a frame row and a PlanConfig.

A plan is built from independent choices: the parallel layout (dp x tp x pp with its pipeline
schedule and sequence parallelism; for a mixture-of-experts model, ep: how many of the dp ranks
split each MoE layer's experts, every divisor of dp that divides the experts' count, and no tp,
which the engine does not combine with experts; on more than one node, dp_replicate: hybrid
sharding's replicas, each sharding ZeRO 1-3 over whole nodes, `replica_counts`; for a long
sequence, cp: context parallelism's ranks per sequence, `context_degrees`), the micro-batch (a divisor of global_batch / dp; grad_accum
follows), the ZeRO stage with its offloads, the precision, activation checkpointing and the kernels.
Each group is enumerated on its own, with its own validity rules, and the groups are joined with
cross merges, so 10^5 plans take well under a second. The rules are those of
`engine.config.validate_plan`, plus the search space's own (`outside_search_space`, which tests
check the enumeration against): a plan is written in its canonical form (`canonical`), pp divides
n_layers (and pp x virtual stages divides it for the interleaved schedule), and tp stays inside
one node.

A frame holds plain Python values (strings for the enum-typed fields); a PlanConfig holds the
enums. `plan_from_row` and `plans_frame` convert between the two, `plan_values` gives the plain
values of a plan (Optuna params, JSON), `plan_key` its stable name and `plan_label` the short name
people read.
"""
from __future__ import annotations

import dataclasses
from enum import Enum
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from autotune.engine.config import (
    OP_CHECKPOINT_EVERY_K,
    PLAN_FIELDS,
    ConfigError,
    ModelConfig,
    PlanConfig,
    TrainConfig,
    validate_plan,
)

_DEFAULTS = PlanConfig()

# (zero_stage, offload_optimizer, offload_params): offload needs ZeRO >= 1, params offload ZeRO-3.
ZERO_OFFLOAD = (
    (0, False, False),
    (1, False, False), (1, True, False),
    (2, False, False), (2, True, False),
    (3, False, False), (3, True, False), (3, False, True), (3, True, True),
)
SELECTIVE_EVERY_K = (2, 4)  # selective checkpointing: every k-th block
MAX_VIRTUAL_STAGES = 4

# A plan is dominated when another fits in no more memory and is estimated this much faster: the
# margin keeps plans whose estimated lead is within the estimator's error in the search.
DOMINANCE_MARGIN = 0.10


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def world_sizes(n_gpus: int, gpus_per_node: int, all_sizes: bool) -> list[int]:
    """The GPU counts plans may use: the whole cluster, or (for the cost objective) any part of it
    made of whole nodes or of a divisor of one node."""
    if not all_sizes:
        return [n_gpus]
    return [w for w in _divisors(n_gpus) if (w <= gpus_per_node and gpus_per_node % w == 0) or w % gpus_per_node == 0]


def replica_counts(dp: int, tp: int, ep: int, gpus_per_node: int) -> list[int]:
    """Hybrid sharding's replica counts worth searching for a layout: 1, and on more than one node
    every divisor r of dp whose shard groups (dp / r x tp ranks) fill whole nodes, so that only the
    once-per-step all-reduce crosses the network (no expert parallelism: the engine refuses both)."""
    if dp * tp <= gpus_per_node or ep > 1:
        return [1]
    return [r for r in _divisors(dp) if r == 1 or (dp // r * tp) % gpus_per_node == 0]


# Context parallelism is searched where each rank keeps at least this many tokens of a sequence: below
# it a ring step's attention is too short to hide its k/v exchange, and activations are small anyway.
MIN_CP_TOKENS = 2048


def context_degrees(seq_len: int, world: int) -> list[int]:
    """cp values worth searching: 1, and every divisor of the ranks whose 2 cp chunks split seq_len
    evenly with at least MIN_CP_TOKENS tokens a rank."""
    return [c for c in _divisors(world) if c == 1 or (seq_len % (2 * c) == 0 and seq_len // c >= MIN_CP_TOKENS)]


def _layouts(model: ModelConfig, global_batch: int, seq_len: int, world: int, gpus_per_node: int,
             max_dp: int | None) -> list[dict[str, Any]]:
    """Parallel layouts (dp, cp, tp, pp, schedule, virtual stages, sequence_parallel, async_tp, ep, dp_replicate)
    for `world` GPUs; cp without pp, ep or hybrid sharding (the engine combines it with dp and tp)."""
    rows = []
    for tp in _divisors(min(world, gpus_per_node)):
        if world % tp or model.n_heads % tp or model.kv_heads % tp or model.d_ff % tp or (model.n_experts and tp > 1):
            continue
        for cp in context_degrees(seq_len, world // tp):
            if cp > 1:
                dp = world // (tp * cp)
                if global_batch % dp == 0 and (max_dp is None or dp <= max_dp):
                    sps = _sequence_modes(tp > 1 and (seq_len // cp) % tp == 0)
                    rows += [dict(dp=dp, cp=cp, tp=tp, pp=1, pp_schedule="1f1b", pp_virtual_stages=1, sequence_parallel=sp,
                                  async_tp=at, ep=1, dp_replicate=1) for sp, at in sps]
        for pp in _divisors(world // tp):
            if model.n_layers % pp:
                continue
            dp = world // (tp * pp)
            if global_batch % dp or (max_dp is not None and dp > max_dp):
                continue
            schedules = [("1f1b", 1)]
            if pp > 1:
                schedules.append(("gpipe", 1))
                schedules += [("interleaved_1f1b", v) for v in range(2, MAX_VIRTUAL_STAGES + 1)
                              if model.n_layers % (pp * v) == 0]
            sps = _sequence_modes(tp > 1 and seq_len % tp == 0)
            eps = [ep for ep in _divisors(dp) if model.n_experts % ep == 0] if model.n_experts else [1]
            for schedule, v in schedules:
                for sp, at in sps:
                    rows += [dict(dp=dp, cp=1, tp=tp, pp=pp, pp_schedule=schedule, pp_virtual_stages=v, sequence_parallel=sp,
                                  async_tp=at, ep=ep, dp_replicate=r) for ep in eps for r in replica_counts(dp, tp, ep, gpus_per_node)]
    return rows


def _sequence_modes(sequence_parallel: bool) -> list[tuple[bool, bool]]:
    """(sequence_parallel, async_tp) of a tp layout. Async tp is not enumerated yet: with it the search's
    belief never measures exposed tp communication (tests/test_search_belief.py) and the cp choice of
    tests/test_estimate_cp.py moves; a user sets plan.async_tp."""
    return [(False, False)] + ([(True, False)] if sequence_parallel else [])


def _frame(rows: Iterable[dict[str, Any]] | dict[str, list]) -> pd.DataFrame:
    return pd.DataFrame(rows if isinstance(rows, dict) else list(rows))


def enumerate_plans(train: TrainConfig, cluster: Any, search: Any, *, device: str = "cuda",
                    precisions: Iterable[str] | None = None, fp8: Iterable[str] = ("none",),
                    attention: Iterable[str] = ("sdpa",)) -> pd.DataFrame:
    """Every valid plan of `train.model` x `train.job` on `cluster`, one column per PlanConfig field.

    `device` is the accelerator kind ("cuda" or "cpu"; Triton kernels need CUDA), `precisions`
    the dtypes it computes in (None: those of `search.precisions`), `fp8` the float8 recipes it
    runs (`hardware.fp8_modes`; each bf16 plan, with tp or not, also in each) and `attention` its
    attention kernels (`hardware.attention_kernels`; each 16-bit plan without context parallelism
    also with cuDNN's). Raises ConfigError when no plan can run the job (e.g. a global batch no
    data-parallel degree divides).
    """
    model, job = train.model, train.job
    allowed = [plain(p) for p in search.precisions if precisions is None or p in set(precisions)]
    if not allowed:
        raise ConfigError(
            f"search.precisions={[plain(p) for p in search.precisions]}: none runs on this device "
            f"(it supports {', '.join(precisions or [])}); allow one of those"
        )
    if job.seq_len > model.max_seq_len:
        raise ConfigError(f"job.seq_len={job.seq_len} exceeds model.max_seq_len={model.max_seq_len}")

    layouts = []
    for world in world_sizes(cluster.n_gpus, cluster.gpus_per_node, search.objective == "cost"):
        layouts += _layouts(model, job.global_batch, job.seq_len, world, cluster.gpus_per_node, search.max_dp)
    if not layouts:
        raise ConfigError(
            f"no parallel layout of {cluster.n_gpus} GPU(s) runs job.global_batch={job.global_batch}: "
            f"the data-parallel degree must divide the global batch; use a global batch divisible by "
            f"{cluster.n_gpus} (or by a dp that tp x pp leaves), or set search.max_dp"
        )
    layout = _frame(layouts)
    # micro_batch: every divisor of the per-replica batch; grad_accum is what is left of it.
    per_replica = job.global_batch // layout["dp"]
    layout["micro_batch"] = [_divisors(int(n)) for n in per_replica]
    layout = layout.explode("micro_batch", ignore_index=True)
    layout["micro_batch"] = layout["micro_batch"].astype(np.int64)
    layout["grad_accum"] = job.global_batch // (layout["micro_batch"] * layout["dp"])
    # the interleaved schedule needs its micro-batch count divisible by pp; 1F1B at least pp of them
    schedule, pp, accum = layout["pp_schedule"], layout["pp"], layout["grad_accum"]
    layout = layout[((schedule != "interleaved_1f1b") | (accum % pp == 0)) & ((schedule != "1f1b") | (accum >= pp))]

    memory = _frame([dict(zero_stage=z, offload_optimizer=o, offload_params=p) for z, o, p in ZERO_OFFLOAD])
    checkpointing = [("none", _DEFAULTS.checkpoint_every_k), ("full", _DEFAULTS.checkpoint_every_k)]
    checkpointing += [("selective", k) for k in SELECTIVE_EVERY_K if k <= model.n_layers]
    checkpointing += [("op", k) for k in OP_CHECKPOINT_EVERY_K] + [("attention", _DEFAULTS.checkpoint_every_k)]
    kernels = ["torch", "triton"] if device == "cuda" else ["torch"]
    compute = _frame([dict(precision=pr, activation_checkpointing=ac, checkpoint_every_k=k, kernels=kn)
                      for pr in allowed for ac, k in checkpointing for kn in kernels])

    plans = layout.merge(memory, how="cross").merge(compute, how="cross")
    plans = plans[(plans["dp_replicate"] == 1) | (plans["zero_stage"] >= 1)]  # hybrid sharding shards ZeRO 1-3
    plans["loss_scale"] = _DEFAULTS.loss_scale
    plans["reduce_dtype"] = plain(_DEFAULTS.reduce_dtype)  # bf16 changes the numerics: left to the user
    plans["compile"] = False  # torch.compile is left to the user: its warm-up dwarfs a probe
    plans["compile_loss"] = _DEFAULTS.compile_loss
    plans = _with_fp8(plans, fp8)
    plans = _with_attention(plans, attention)
    plans = plans[list(PLAN_FIELDS)].reset_index(drop=True)
    return plans.astype({k: "int64" for k in ("zero_stage", "micro_batch", "grad_accum", "checkpoint_every_k",
                                               "dp", "cp", "tp", "pp", "pp_virtual_stages", "ep",
                                               "dp_replicate")})


def _with_attention(plans: pd.DataFrame, kernels: Iterable[str]) -> pd.DataFrame:
    """The plans with SDPA's own attention, then each 16-bit plan without context parallelism again
    with cuDNN's where the device has it (the engine runs it in 16 bits and outside the cp ring)."""
    plans = plans.assign(attention="sdpa")
    base = plans[(plans["precision"] != "fp32") & (plans["cp"] == 1)]
    return pd.concat([plans] + [base.assign(attention=k) for k in kernels if k != "sdpa"], ignore_index=True)


def _with_fp8(plans: pd.DataFrame, modes: Iterable[str]) -> pd.DataFrame:
    """The plans in bf16, then each bf16 plan again per float8 recipe (engine.config.validate_fp8)."""
    plans = plans.assign(fp8="none")
    base = plans[plans["precision"] == "bf16"]
    return pd.concat([plans] + [base.assign(fp8=m) for m in modes if m != "none"], ignore_index=True)


def plain(value: Any) -> Any:
    """numpy scalars and enum members -> plain Python (Optuna, JSON and pandas want those)."""
    if isinstance(value, Enum):
        return value.value
    return value.item() if isinstance(value, np.generic) else value


def plan_from_row(row: Mapping[str, Any] | pd.Series) -> PlanConfig:
    """The plan of one frame row (or any mapping of the plan fields: a trial's JSON)."""
    values = {k: plain(row[k]) for k in PLAN_FIELDS if k in row}
    if isinstance(values.get("grad_accum"), float):  # a column with gaps holds floats and NaN
        values["grad_accum"] = None if np.isnan(values["grad_accum"]) else int(values["grad_accum"])
    return PlanConfig(**values)


def plan_values(plan: PlanConfig) -> dict[str, Any]:
    """The plan's fields as plain Python values, in PLAN_FIELDS order."""
    return {k: plain(getattr(plan, k)) for k in PLAN_FIELDS}


def plans_frame(plans: Iterable[PlanConfig]) -> pd.DataFrame:
    """One row per plan, one column per plan field."""
    return pd.DataFrame([plan_values(p) for p in plans], columns=list(PLAN_FIELDS))


def plan_key(plan: PlanConfig) -> str:
    """A stable name of a plan: equal plans, equal keys (the study's claim on a plan)."""
    return ",".join(f"{k}={v}" for k, v in plan_values(plan).items())


def plan_keys(plans: pd.DataFrame) -> pd.Series:
    """`plan_key` of every row, built column-wise (10^5 plans in a fraction of a second)."""
    columns = []
    for k in PLAN_FIELDS:  # each column has a handful of distinct values: format those once
        codes, uniques = pd.factorize(plans[k])
        names = np.array([f"{k}={plain(v)}" for v in uniques], dtype=object)
        columns.append(names[codes].tolist())
    return pd.Series([",".join(parts) for parts in zip(*columns)], index=plans.index, dtype=object)


def plan_label(plan: PlanConfig) -> str:
    """A short name for a plan: `Z2+oo bf16 mb4 ckpt:full dp8 tp2+sp pp2 1f1b fp8:tensorwise triton` (`dp8 ep4`:
    expert parallel; `dp32 hsdp4x8`: hybrid sharding, 4 replicas of 8 sharding ranks; `dp2 cp4`: each sequence
    over 4 context-parallel ranks; `dp8+reduce:bf16`: gradients reduced in bf16)."""
    zero = f"Z{plan.zero_stage}" + ("+oo" if plan.offload_optimizer else "") + ("+op" if plan.offload_params else "")
    ckpt = {"selective": f"sel{plan.checkpoint_every_k}", "op": f"op{plan.checkpoint_every_k}"}.get(
        str(plan.activation_checkpointing), str(plan.activation_checkpointing))
    reduce = f"+reduce:{plan.reduce_dtype}" if plan.reduce_dtype != _DEFAULTS.reduce_dtype else ""
    parts = [zero, str(plan.precision), f"mb{plan.micro_batch}", f"ckpt:{ckpt}", f"dp{plan.dp}{reduce}"]
    if plan.ep > 1:
        parts.append(f"ep{plan.ep}")
    if plan.dp_replicate > 1:
        parts.append(f"hsdp{plan.dp_replicate}x{plan.dp // plan.dp_replicate}")
    if plan.cp > 1:
        parts.append(f"cp{plan.cp}")
    if plan.tp > 1:
        parts.append(f"tp{plan.tp}" + ("+sp" if plan.sequence_parallel else "") + ("+async" if plan.async_tp else ""))
    if plan.pp > 1:
        virtual = f"/v{plan.pp_virtual_stages}" if plan.pp_virtual_stages > 1 else ""
        parts += [f"pp{plan.pp}", f"{plan.pp_schedule}{virtual}"]
    if plan.fp8 != "none":
        parts.append(f"fp8:{plan.fp8}")
    if plan.kernels != "torch":
        parts.append(str(plan.kernels))
    if plan.attention != "sdpa":
        parts.append(f"{plan.attention} attention")
    if plan.compile:
        parts.append("compile" if plan.compile_loss else "compile (blocks)")
    return " ".join(parts)


def canonical(plan: PlanConfig) -> PlanConfig:
    """Fields that mean nothing in a plan take their default (checkpoint_every_k without selective or
    op checkpointing, a schedule without pipelining, sequence parallelism without tp), so that two
    spellings of one plan are one plan; the enumeration writes every plan this way."""
    changes: dict[str, Any] = {}
    if plan.activation_checkpointing not in ("selective", "op"):
        changes["checkpoint_every_k"] = _DEFAULTS.checkpoint_every_k
    if plan.pp == 1:
        changes.update(pp_schedule=_DEFAULTS.pp_schedule, pp_virtual_stages=_DEFAULTS.pp_virtual_stages)
    if plan.tp == 1:
        changes["sequence_parallel"] = False
    return dataclasses.replace(plan, **changes)


def outside_search_space(plan: PlanConfig, train: TrainConfig, cluster: Any, search: Any, *, device: str = "cuda",
                         precisions: Iterable[str] | None = None, fp8: Iterable[str] = ("none",),
                         attention: Iterable[str] = ("sdpa",)) -> str:
    """Why `enumerate_plans` leaves `plan` out ("" when it is one of its plans): the engine refuses it
    (validate_plan), or a rule of the search space excludes it."""
    try:
        validate_plan(dataclasses.replace(plan, grad_accum=None), train.model, train.job)
    except ConfigError as e:
        return str(e)
    n_layers = train.model.n_layers
    rules = {
        "not in canonical form": canonical(plan) != plan,
        "another world size": plan.world_size not in world_sizes(cluster.n_gpus, cluster.gpus_per_node,
                                                                   search.objective == "cost"),
        "tp outside one node": cluster.gpus_per_node % plan.tp != 0,
        "pp does not divide n_layers": n_layers % plan.pp != 0,
        "too many virtual stages": plan.pp_virtual_stages > MAX_VIRTUAL_STAGES or n_layers % (plan.pp * plan.pp_virtual_stages) != 0,
        "dp above search.max_dp": search.max_dp is not None and plan.dp > search.max_dp,
        "cp below MIN_CP_TOKENS a rank": plan.cp not in context_degrees(train.job.seq_len, plan.cp),
        "cp with pipeline stages (the engine refuses them)": plan.cp > 1 and plan.pp > 1,
        "hybrid sharding not over whole nodes": plan.dp_replicate not in replica_counts(
            plan.dp, plan.tp, plan.ep, cluster.gpus_per_node),
        "another selective k": plan.activation_checkpointing == "selective"
        and (plan.checkpoint_every_k not in SELECTIVE_EVERY_K or plan.checkpoint_every_k > n_layers),
        "precision not searched": plan.precision not in set(search.precisions) & set(precisions or search.precisions),
        "kernels not on this device": plan.kernels != "torch" and device != "cuda",
        "float8 not on this device": plan.fp8 not in set(fp8) | {"none"},
        "attention kernel not on this device": plan.attention not in set(attention) | {"sdpa"},
        "cuDNN attention under cp (the engine refuses it)": plan.attention == "cudnn" and plan.cp > 1,
        "a setting the search leaves to the user": (plan.loss_scale != _DEFAULTS.loss_scale or plan.compile
                                                     or plan.reduce_dtype != _DEFAULTS.reduce_dtype),
    }
    return ", ".join(why for why, broken in rules.items() if broken)


def dominated_by(plans: pd.DataFrame, throughput: str = "tokens_per_s", memory: str = "mem_total_bytes",
                 margin: float = DOMINANCE_MARGIN) -> pd.Series:
    """For each plan, the index label of the fastest plan that needs no more memory, where that
    plan is `margin` faster (the plan is dominated); -1 where none is.

    O(n log n): sorted by memory, the fastest plan at or below each memory level is a running max.
    """
    mem = plans[memory].to_numpy(dtype=float)
    tps = plans[throughput].to_numpy(dtype=float)
    order = np.argsort(mem, kind="stable")
    sorted_tps = tps[order]
    running = np.maximum.accumulate(sorted_tps)
    # where the running max was last reached: the position of the fastest plan so far
    argmax = np.maximum.accumulate(np.where(sorted_tps >= running, np.arange(len(mem)), 0))
    # plans tied in memory all count as "no more memory": take the running max at the last tie
    last_of_tie = np.searchsorted(mem[order], mem[order], side="right") - 1
    best = np.empty_like(running)
    best[order] = running[last_of_tie]
    who = np.empty(len(mem), dtype=np.int64)
    who[order] = order[argmax[last_of_tie]]
    labels = plans.index.to_numpy()[who] if len(mem) else who
    return pd.Series(np.where(best >= (1.0 + margin) * tps, labels, -1), index=plans.index)

