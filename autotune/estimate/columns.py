"""The parts of an estimate, by name: what `estimate_frame` writes as columns (mem_<part>_bytes,
time_<part>_s, compute_<kind>_s) and `Estimate` holds as dicts (<part>_bytes, <part>_s), and an
estimate's JSON form as those flat columns. No torch: the reports read it."""
from __future__ import annotations

from typing import Any, Mapping


GiB = 2**30
MEMORY = ("params", "grads", "master", "optimizer", "param_copies", "activations", "logits", "comm", "context", "workspace",
          "allocator")
MODEL_STATES = ("params", "grads", "master", "optimizer")
DYNAMIC_MEMORY = ("param_copies", "activations", "logits", "comm")  # what the allocator's slack grows with
TIME = ("forward", "backward", "recompute", "optimizer", "dp_comm", "overlap", "tp_comm", "cp_comm", "ep_comm", "pp_bubble", "pp_comm",
        "offload", "overhead")
COMPUTE = ("matmul", "attention", "memory")  # forward + backward + recompute by kind of work


def flat_estimate(data: Mapping[str, Any]) -> dict[str, Any]:
    """An estimate's JSON form as the flat columns of a table (candidates.csv, trials.csv): the
    memory parts as mem_<part>_bytes, the time parts as time_<part>_s (estimate_frame's names), and
    every other scalar as it is; the nested breakdowns (model_states, compute, factors,
    calibration) are left out. Reads older trials' dicts too (parts named without the unit)."""
    flat: dict[str, Any] = {}
    for name, value in (data.get("memory") or {}).items():
        flat["mem_" + (name if name.endswith("_bytes") else name + "_bytes")] = value
    for name, value in (data.get("time") or {}).items():
        flat["time_" + (name if name.endswith("_s") else name + "_s")] = value
    for name, value in data.items():
        if name not in ("memory", "time") and not isinstance(value, (dict, list)):
            flat[name] = value
    return flat
