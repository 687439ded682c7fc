"""What of a plan this machine runs, when the cluster searched for is larger than this machine.

A measured search runs every trial here, on at most `capacity` ranks: `search.local_devices`, by
default every GPU of this machine (on a CPU, one gloo rank per GPU of a cluster node), never more
than one node of the cluster. Each plan runs in one of three ways:

- as is: its dp x tp x pp ranks fit here, inside one node;
- node share: its cp x tp x pp fits here: it runs with as many data-parallel replicas as fit, each with
  the plan's micro-batch and accumulation, so every rank does the plan's per-rank work (a
  mixture-of-experts plan splits its experts over as many of them as divide both: ep stays a
  divisor of the ranks that run);
- rank share: not even cp x tp x pp fits: one device runs one rank's share of the plan as a plain
  (dp = cp = tp = pp = 1) run of a smaller model on seq_len / cp tokens: the layers of one pipeline stage, each matmul cut as
  a tensor-parallel rank holds it (autotune/engine/tensor_parallel.py: n_heads/tp query and n_kv_heads/tp
  kv heads of the same width, d_ff/tp MLP units, vocabulary/tp), the plan's micro-batch,
  accumulation, precision, checkpointing, ZeRO stage and offload, on synthetic tokens, with every
  expert of a MoE layer (ep = 1). Without ZeRO's sharding over dp one rank's states may not fit:
  the share then keeps fewer layers.

What did not run (communication, the pipeline bubble, states sharded over more ranks, other nodes,
left-out layers) is modelled: the search multiplies the measured step time and peak memory by the
estimator's ratio of the whole plan on the cluster to what ran here (autotune/search/trial.py).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Optional

import torch

from autotune.config import ClusterConfig, SearchConfig
from autotune.estimate import Calibration, estimate
from autotune.hardware import Hardware
from autotune.engine.config import ConfigError, DataConfig, ModelConfig, TrainConfig, with_changes

AS_IS, NODE_SHARE, RANK_SHARE = "as is", "node share", "rank share"
# A rank share is cut to fewer layers when its estimate needs more than this part of the device:
# the estimate errs by some percent, and a share that runs out of memory measures nothing.
SHARE_MEMORY_FRACTION = 0.85


def local_devices(search: SearchConfig) -> int:
    """Devices one trial may use here: search.local_devices, or every GPU (None on a CPU)."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if search.local_devices is None:
        return gpus
    if search.local_devices < 1:
        raise ConfigError(f"search.local_devices={search.local_devices} must be at least 1, or unset for every GPU here")
    if gpus and search.local_devices > gpus:
        raise ConfigError(f"search.local_devices={search.local_devices} but this machine has {gpus} GPU(s); "
                          f"use at most {gpus}, or unset it")
    return search.local_devices


def capacity(cluster: ClusterConfig, search: SearchConfig) -> int:
    """Ranks one trial runs here: at most one node of the cluster (on a CPU, by default, a node)."""
    return min(local_devices(search) or cluster.gpus_per_node, cluster.gpus_per_node)


def gpu_kind(name: str) -> str:
    """The model number in a GPU's name: "H100" of "H100-SXM5-80GB" and of "NVIDIA H100 80GB HBM3",
    "4090" of "NVIDIA GeForce RTX 4090", "L40S" of "NVIDIA L40S"."""
    return next((t for t in re.split(r"[^0-9A-Za-z]+", name.upper()) if re.search(r"\d", t)
                 and not re.fullmatch(r"\d+GB", t) and not t.startswith(("SXM", "PCIE", "HBM"))), "")


def check_local_gpu(cluster: ClusterConfig, hw: Hardware) -> None:
    """A catalog cluster is measured here only on a GPU of its kind (model and memory size)."""
    if not torch.cuda.is_available():
        raise ConfigError(
            f"search.mode=measure with cluster={cluster.name} runs each trial's share on a local {hw.gpu}, and this "
            "machine has no CUDA GPU; use search.mode=analytic, or cluster=local to search for this machine"
        )
    props = torch.cuda.get_device_properties(0)
    if gpu_kind(props.name) != gpu_kind(hw.gpu) or abs(props.total_memory / hw.memory_bytes - 1) > 0.1:
        raise ConfigError(
            f"search.mode=measure with cluster={cluster.name} runs each trial's share on a local {hw.gpu}, but this "
            f"machine has a {props.name} ({props.total_memory / 2**30:.0f} GiB); use search.mode=analytic, "
            "or run the search on a machine with that GPU"
        )


@dataclass
class Share:
    """What of a plan runs here, and how (AS_IS, NODE_SHARE or RANK_SHARE)."""

    train: TrainConfig
    kind: str
    note: str  # in words, for the trial and the report


def share_here(train: TrainConfig, cap: int, gpus_per_node: int, hw_here: Hardware,
               calib: Optional[Calibration] = None) -> Share:
    """The run of `train` this machine makes on `cap` ranks (see the module docstring)."""
    p = train.plan
    here = min(cap, gpus_per_node)
    if p.world_size <= here:
        return Share(train, AS_IS, f"as is on {p.world_size} rank(s)")
    if p.cp * p.tp * p.pp <= here:
        dp = min(p.dp, here // (p.cp * p.tp * p.pp))
        ep = math.gcd(p.ep, dp)
        ran = with_changes(train, job={"global_batch": p.micro_batch * p.grad_accum * dp}, plan={"dp": dp, "ep": ep})
        experts = f", ep={ep} of {p.ep}" if p.ep > 1 else ""
        return Share(ran, NODE_SHARE, f"{ran.plan.world_size} rank(s): cp x tp x pp with dp={dp} of {p.dp}{experts}, "
                                      f"global_batch={ran.job.global_batch}")
    return rank_share(train, hw_here, calib)


def tp_rank_model(model: ModelConfig, tp: int) -> ModelConfig:
    """The model as one of `tp` tensor-parallel ranks holds it: heads and MLP units split, heads as
    wide as before, the vocabulary split (autotune/engine/tensor_parallel.py); norms stay whole."""
    if tp == 1:
        return model
    kv = model.kv_heads // tp
    return dataclasses.replace(
        model, n_heads=model.n_heads // tp, n_kv_heads=None if kv == model.n_heads // tp else kv,
        attn_head_dim=model.head_dim, d_ff=model.d_ff // tp, vocab_size=math.ceil(model.vocab_size / tp))


def rank_share(train: TrainConfig, hw_here: Hardware, calib: Optional[Calibration] = None) -> Share:
    """One rank's share of `train` on one device (RANK_SHARE), with fewer layers where it must."""
    p = train.plan
    stage_layers = train.model.n_layers // p.pp
    model = dataclasses.replace(tp_rank_model(train.model, p.tp), name=f"{train.model.name}.rank",
                                hf_config=None, init_from=None)
    plan = {"dp": 1, "cp": 1, "tp": 1, "pp": 1, "ep": 1, "sequence_parallel": False, "pp_schedule": "1f1b",
            "pp_virtual_stages": 1}
    # the share's vocabulary is cut: synthetic tokens; a cp rank's share is its seq_len / cp tokens
    job = {"global_batch": p.micro_batch * p.grad_accum, "data": DataConfig(), "seq_len": train.job.seq_len // p.cp}

    def run_of(layers: int) -> TrainConfig:
        return with_changes(train, model=dataclasses.replace(model, n_layers=layers), job=job, plan=plan)

    def fits(layers: int) -> bool:
        return estimate(run_of(layers), hw_here, calib).memory["total_bytes"] <= SHARE_MEMORY_FRACTION * hw_here.memory_bytes

    # the most layers that fit (memory grows with layers), at least one
    lo, hi = 1, stage_layers
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    layers = lo
    ran = run_of(layers)
    where = f"of one of {p.pp} pipeline stages" if p.pp > 1 else "of the model"
    cut = [f"all {layers} layer(s) {where}" if layers == stage_layers else f"{layers} of the {stage_layers} layers {where}"]
    if p.tp > 1:
        cut.append(f"heads, d_ff and vocabulary / {p.tp}")
    return Share(ran, RANK_SHARE, f"one rank's share on 1 device: {', '.join(cut)}, "
                                  f"micro_batch={p.micro_batch} x {p.grad_accum}")
