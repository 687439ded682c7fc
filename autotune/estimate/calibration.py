"""The calibration: the efficiency factors of the time model and the memory slack, their defaults
(the hardware profile's, or the constants here) and their fit to measured probe runs.

`Calibration` holds the factors a calibration set (None: the hardware's), `factors()` resolves
them against a hardware profile, `fit_calibration()` fits them to probe records and
`fit_memory_slack()` splits the unexplained memory into a fixed part and a fraction of the dynamic
part; a mixture-of-experts model's load imbalance is the one the probe measured. A calibration is saved and loaded as JSON (`estimate.calibration=PATH`). Sections of
docs/formulas.md in brackets.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autotune.engine.config import ConfigError
from autotune.engine.files import write_atomic
from autotune.estimate.columns import DYNAMIC_MEMORY, MODEL_STATES
from autotune.hardware import Hardware

FRAGMENTATION = 0.05  # allocator slack on the dynamic part (Megatron adds 5% for temporaries) [Activations]
# The condition number (columns scaled to unit length) below which two time parts are told apart
IDENTIFIABLE_COND = 30.0

# The values a calibration may hold: efficiencies are fractions of a peak, the rest non-negative.
CALIBRATION_RANGES = {
    "matmul_efficiency": (1e-3, 1.0), "attention_efficiency": (1e-3, 1.0), "memory_efficiency": (1e-3, 1.0),
    "overlap_slowdown": (0.0, 1.0), "collective_efficiency": (1e-3, 1.0), "fragmentation": (0.0, 10.0),
    "workspace_bytes": (0.0, float("inf")), "context_bytes": (0.0, float("inf")), "step_overhead_s": (0.0, float("inf")),
    "moe_imbalance": (1.0, float("inf")), "records": (0, float("inf")),
}

# The factors the hardware profile defaults (None in a calibration: the hardware's), and all of them
HARDWARE_FACTORS = ("matmul_efficiency", "attention_efficiency", "memory_efficiency", "overlap_slowdown")
FACTOR_NAMES = (*HARDWARE_FACTORS, "collective_efficiency", "fragmentation", "workspace_bytes", "context_bytes",
                "step_overhead_s", "moe_imbalance")
OPTIONAL_FACTORS = (*HARDWARE_FACTORS, "context_bytes", "moe_imbalance")  # None: the default rule's value
# The efficiencies a calibration from measured runs scales (autotune.validate.calibrate), and the
# range of a scale
SCALED_FACTORS = ("matmul_efficiency", "attention_efficiency", "memory_efficiency", "collective_efficiency")
SCALE_RANGE = (0.05, 20.0)


@dataclass
class Calibration:
    """The model's efficiency factors. Defaults come from the hardware profile; measured probe
    results refine them (`fit_calibration`), and `changes()` says what moved."""

    matmul_efficiency: float | None = None  # achieved / peak matmul FLOP/s; None: the hardware's
    attention_efficiency: float | None = None  # achieved / peak FLOP/s of SDPA (executed FLOPs); None: the hardware's
    memory_efficiency: float | None = None  # achieved / datasheet HBM bandwidth of memory-bound ops; None: the hardware's
    overlap_slowdown: float | None = None  # compute lost while a collective runs beside it; None: the hardware's
    collective_efficiency: float = 1.0  # achieved / assumed collective bus bandwidth
    fragmentation: float = FRAGMENTATION  # allocator overhead as a fraction of the dynamic memory
    # fixed allocated bytes beyond the model's tensors: library workspaces (cuBLAS) on a GPU; on a
    # CPU, whose measure is the resident-set growth, the runtime's own arenas and buffers
    workspace_bytes: float = 0.0
    context_bytes: float | None = None  # CUDA context + NCCL; None: autotune.estimate.memory's defaults
    step_overhead_s: float = 0.0  # fixed time per optimizer step (data, logging, host syncs)
    # a MoE model's router: the most tokens an expert gets over the mean, as the probe measured it
    # (engine.moe.step_stats); None: an evenly spreading router's (autotune.estimate.routing)
    moe_imbalance: float | None = None
    # multipliers of the efficiencies (SCALED_FACTORS) fitted to measured runs (autotune calibrate):
    # those of the GPU (by its catalog name) where the runs had it, else `scales`
    scales: dict[str, float] = dataclasses.field(default_factory=dict)
    gpu_scales: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    source: str = "defaults"
    records: int = 0

    def scale(self, name: str, gpu: str) -> float:
        """What the calibration multiplies factor `name` by on `gpu` (1 when it has no scale for it)."""
        return self.gpu_scales.get(gpu, {}).get(name, self.scales.get(name, 1.0))

    def changes(self, hw: Hardware | None = None) -> dict[str, dict[str, float]]:
        """{factor: {"default": d, "calibrated": c}} for every factor a calibration moved."""
        base = Calibration()
        out = {}
        for name in FACTOR_NAMES:
            new, old = getattr(self, name), getattr(base, name)
            if name in HARDWARE_FACTORS and hw is not None:
                old = getattr(hw, name)
            if new is not None and new != old:
                out[name] = {"default": old, "calibrated": new}
        return out

    def save(self, path: str | Path) -> None:
        write_atomic(path, json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        try:
            calib = cls(**json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise ConfigError(f"estimate.calibration: no such file {path}; write one with fit_calibration(...).save(path)")
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise ConfigError(f"estimate.calibration: {path} is not a calibration JSON ({e})")
        _check_scales(calib, path)
        for name, (low, high) in CALIBRATION_RANGES.items():
            value = getattr(calib, name)
            if value is None and name in OPTIONAL_FACTORS:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ConfigError(f"estimate.calibration: {path} has {name}={value!r}; it must be a number in "
                                  f"[{low}, {high}] (refit it with fit_calibration)")
        return calib


def _check_scales(calib: Calibration, path) -> None:
    groups = [calib.scales] + list(calib.gpu_scales.values()) if isinstance(calib.gpu_scales, dict) else [None]
    for group in groups:
        if not isinstance(group, dict) or any(k not in SCALED_FACTORS for k in group) or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) or not SCALE_RANGE[0] <= v <= SCALE_RANGE[1]
                for v in group.values()):
            raise ConfigError(f"estimate.calibration: {path} has scales {group!r}; each must map one of "
                              f"{', '.join(SCALED_FACTORS)} to a number in {list(SCALE_RANGE)} (refit with autotune calibrate)")


def factors(hw: Hardware, calib: Calibration | None = None) -> dict[str, float]:
    """The efficiency factors the time model uses: the calibration's where it set them, else the
    hardware profile's (catalog figures, or measured by the probe), times the calibration's scale
    for this GPU (an efficiency stays at most 1)."""
    calib = calib or Calibration()
    out = {k: getattr(calib, k) if getattr(calib, k) is not None else getattr(hw, k) for k in HARDWARE_FACTORS}
    out = {k: min(v * calib.scale(k, hw.gpu), 1.0) if k in SCALED_FACTORS else v for k, v in out.items()}
    collective = min(calib.collective_efficiency * calib.scale("collective_efficiency", hw.gpu), 1.0)
    return out | {"collective_efficiency": collective, "collective_latency_s": hw.collective_latency_s}


def fit_calibration(records: list[dict], hw: Hardware | None = None) -> Calibration:
    """Efficiency factors fitted to probe results: records of {"model", "job", "plan"} (dicts) with
    the measured "step_time_s" and "peak_mem_bytes" (torch.cuda.max_memory_allocated), and for a
    mixture-of-experts model the probe's "moe" figures (its "imbalance": the median over the records
    is the calibration's moe_imbalance, the router's, which no plan changes).

    Memory: measured = static + workspace + (1 + fragmentation)·dynamic, least squares in both when
    the records' dynamic bytes differ enough to tell them apart; else one of them takes the rest:
    fragmentation on a GPU (the caching allocator's slack grows with what it holds), the workspace
    on a CPU (its measure, the resident-set growth, carries the runtime's fixed buffers).
    Time: measured = k·(matmul time) + other terms + overhead, least squares in k and overhead;
    matmul_efficiency = default/k. With dp/tp communication in at least three records, the
    collective efficiency is fitted the same way (exposed communication taken as linear: dp, tp and
    the experts' all-to-alls). The memory-bound and attention parts get their own scale
    (memory_efficiency, attention_efficiency) when the records tell them apart from the others (more
    records than unknowns, and the columns far from collinear: plans of one sequence length cannot
    separate attention from matmuls).
    """
    if not records:
        raise ConfigError("fit_calibration needs at least one probe record")
    if hw is None:
        from autotune.hardware import probe_local
        hw = probe_local()
    rows = _estimated_rows(records, hw)
    dynamic = np.array([sum(row[f"mem_{k}_bytes"] for k in DYNAMIC_MEMORY) for row in rows])
    static = np.array([sum(row[f"mem_{k}_bytes"] for k in MODEL_STATES) for row in rows])
    measured_bytes = np.array([float(r["peak_mem_bytes"]) for r in records])
    fragmentation, workspace = fit_memory_slack(dynamic, measured_bytes - static - dynamic, hw.device)
    scale = _time_scales(rows, np.array([float(r["step_time_s"]) for r in records]))

    def refit(name: str, default: float) -> float | None:
        """default / scale, or None (keep the hardware's) when unfitted or within 1% of it."""
        if name not in scale or abs(scale[name] - 1) < 0.01:
            return None
        return float(np.clip(default / max(scale[name], 1e-3), 0.01, 1.0))

    return Calibration(
        matmul_efficiency=float(np.clip(hw.matmul_efficiency / max(float(scale["matmul"]), 1e-3), 0.01, 1.0)),
        memory_efficiency=refit("memory", hw.memory_efficiency),
        attention_efficiency=refit("attention", hw.attention_efficiency),
        collective_efficiency=float(np.clip(1.0 / max(scale["comm"], 1e-3), 0.01, 1.0)) if "comm" in scale else 1.0,
        fragmentation=fragmentation, workspace_bytes=workspace,
        step_overhead_s=max(float(scale.get("overhead", 0.0)), 0.0), moe_imbalance=measured_imbalance(records),
        source="fit", records=len(records),
    )


def measured_imbalance(records: list[dict]) -> float | None:
    """The median imbalance the probe measured on the records' MoE steps (their "moe" figures, as
    the probe's JSON has them; None: no record has one)."""
    measured = [float(r["moe"]["imbalance"]) for r in records if (r.get("moe") or {}).get("imbalance") is not None]
    return float(np.median(measured)) if measured else None


def _estimated_rows(records: list[dict], hw: Hardware) -> list:
    """Each record's plan estimated with the default factors: one frame row per record."""
    from autotune.engine.config import build_train_config
    from autotune.estimate.frame import estimate_frame  # the model this module calibrates imports it
    from autotune.estimate.result import plan_frame

    rows = []
    for r in records:
        cfg = build_train_config({"model": r["model"], "job": r["job"], "plan": r["plan"]})
        rows.append(estimate_frame(cfg.model, cfg.job, plan_frame([cfg.plan]), hw, Calibration()).iloc[0])
    return rows


def _time_scales(rows: list, measured_s: np.ndarray) -> dict[str, float]:
    """Least-squares scales of the estimated time parts (matmul; memory-bound, attention and
    communication when the records tell them apart) and the per-step overhead, such that the
    scaled parts plus the unscaled rest give the measured step times."""
    def column(key: str, missing: float | None = None) -> np.ndarray:  # missing: records older than the part
        return np.array([row[key] if missing is None else row.get(key, missing) for row in rows])

    parts = {"matmul": column("compute_matmul_s"), "memory": column("memory_bound_s"),
             "attention": column("compute_attention_s"),
             "comm": column("time_dp_comm_s") + column("time_tp_comm_s") + column("time_cp_comm_s", 0.0)
                     + column("time_ep_comm_s")}
    # A per-step overhead is told apart from the matmul scale only by plans whose compute differs;
    # records of one shape (the first trials often are) fit the scale alone, through the origin.
    unknowns = {"matmul": parts["matmul"]}
    if len(rows) >= 3 and np.ptp(parts["matmul"]) > 0.2 * parts["matmul"].mean():
        unknowns["overhead"] = np.ones(len(rows))
    for name in ("memory", "attention"):
        candidate = unknowns | {name: parts[name]}
        x = np.stack(list(candidate.values()), axis=1)
        norm = np.linalg.norm(x, axis=0)
        if len(rows) > len(candidate) and norm.min() > 0 and np.linalg.cond(x / norm) < IDENTIFIABLE_COND:
            unknowns = candidate
    if (parts["comm"] > 0).sum() >= 3:
        unknowns["comm"] = parts["comm"]
    target = measured_s - (column("step_time_s") - sum(parts[k] for k in unknowns if k != "overhead"))
    solution = np.linalg.lstsq(np.stack(list(unknowns.values()), axis=1), target, rcond=None)[0]
    return dict(zip(unknowns, solution))


def fit_memory_slack(dynamic: np.ndarray, rest: np.ndarray, device: str) -> tuple[float, float]:
    """(fragmentation, workspace_bytes) with rest ≈ workspace + fragmentation·dynamic, both >= 0
    and fragmentation at most 1 (see fit_calibration)."""
    if len(rest) >= 3 and np.ptp(dynamic) > 0.2 * dynamic.mean():  # the two can be told apart
        (workspace, frag), *_ = np.linalg.lstsq(np.stack([np.ones_like(dynamic), dynamic], axis=1), rest, rcond=None)
        if workspace >= 0 and 0 <= frag <= 1:
            return float(frag), float(workspace)
    if device == "cpu":  # the fixed part takes the rest, over the default slack
        return FRAGMENTATION, float(max(np.mean(rest - FRAGMENTATION * dynamic), 0.0))
    return float(np.clip(np.dot(dynamic, rest) / max(np.dot(dynamic, dynamic), 1.0), 0.0, 1.0)), 0.0

