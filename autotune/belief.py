"""What the measured trials say about each factor of the cost model, and how sure they are.

The estimator's step time is a sum of parts (compute in each precision, the kernels' share,
recompute, the optimizer, data-parallel communication per ZeRO stage, offload, tensor- and
pipeline-parallel communication, per-op dispatch, a fixed cost per step). The search trusts no
part it has not seen measured. It models a measured step time as

    t = sum_k c_k * part_k(plan) + noise,

one scale c_k per factor with a Gaussian prior N(prior_k, sd_k^2): centred on the estimate
(c = 1, or 0 for a correction such as the kernels' or a ZeRO stage's extra cost), wide where the
estimate's inputs are datasheet figures. Each measured trial is a linear observation, so the
posterior is Gaussian (ridge regression; the scales are kept at or above their physical floor at
the mode). A factor that no measured trial has varied keeps its prior: a plan that leans on it
gets a wide interval, and its optimistic bound (the mean minus `z` standard deviations, never
under the floor) lets it be measured rather than vetoed. See docs/formulas.md [Calibration].
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import lsq_linear

# How many standard deviations the optimistic bound reaches below the posterior mean.
OPTIMISM_Z = 2.0
# A measurement's relative error beyond its own per-step spread: what a rerun of the same plan
# moves on a quiet machine (allocator state, clocks, the neighbours of a shared host).
RELATIVE_NOISE = 0.05


@dataclass(frozen=True)
class Factor:
    """One scale of the cost model: its name, prior mean and spread, and its physical floor."""

    name: str
    prior: float
    sd: float
    floor: float = 0.0
    about: str = ""  # what the factor scales, for the report


@dataclass
class Belief:
    """The posterior over the factors' scales after `trials` measured trials."""

    factors: list[Factor]
    mean: np.ndarray
    cov: np.ndarray
    support: np.ndarray  # per factor: how many measured trials had a part of it
    trials: int = 0
    residuals: list[float] = field(default_factory=list)  # measured / fitted, per trial

    @property
    def sd(self) -> np.ndarray:
        return np.sqrt(np.clip(np.diag(self.cov), 0.0, None))

    def predict(self, parts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean, standard deviation) of the step time of plans with these parts (rows)."""
        parts = np.atleast_2d(parts)
        mean = parts @ self.mean
        var = np.einsum("ij,jk,ik->i", parts, self.cov, parts)
        return mean, np.sqrt(np.clip(var, 0.0, None))

    def optimistic(self, parts: np.ndarray, z: float = OPTIMISM_Z) -> np.ndarray:
        """The shortest step time the evidence allows each plan: mean - z sd, above the floors."""
        mean, sd = self.predict(parts)
        floors = np.atleast_2d(parts) @ np.array([f.floor for f in self.factors])
        return np.maximum(mean - z * sd, np.maximum(floors, 1e-9))

    def table(self) -> list[dict[str, object]]:
        """Per factor: prior, fitted value, spread and the trials it rests on (for report.md)."""
        return [{"factor": f.name, "scales": f.about, "prior": f.prior, "prior_sd": f.sd,
                 "fitted": float(m), "sd": float(s), "trials": int(n)}
                for f, m, s, n in zip(self.factors, self.mean, self.sd, self.support)]

    def surprises(self, least: float = 0.2) -> list[dict[str, object]]:
        """Factors whose prior the measurements reject: the prior lies more than OPTIMISM_Z
        posterior spreads from the fitted value, and at least `least` (a fifth of the part it
        scales) away. Largest first: where the estimate was wrong."""
        rows = [r for r in self.table()
                if r["trials"] and abs(r["fitted"] - r["prior"]) > max(OPTIMISM_Z * r["sd"], least)]
        return sorted(rows, key=lambda r: -abs(r["fitted"] - r["prior"]))


def prior_belief(factors: list[Factor]) -> Belief:
    """The belief before any trial: the priors themselves."""
    return Belief(factors, np.array([f.prior for f in factors], dtype=float),
                  np.diag([f.sd**2 for f in factors]), np.zeros(len(factors), dtype=int))


def fit_belief(factors: list[Factor], parts: np.ndarray, measured: np.ndarray,
               spread: np.ndarray | None = None, relative_noise: float = RELATIVE_NOISE) -> Belief:
    """The posterior after trials with these parts (one row each) and measured step times.

    `spread` is each measurement's own standard error (from its per-step times); the noise of a
    trial is that and `relative_noise` of its time, added in quadrature."""
    if len(measured) == 0:
        return prior_belief(factors)
    parts = np.atleast_2d(np.asarray(parts, dtype=float))
    measured = np.asarray(measured, dtype=float)
    spread = np.zeros_like(measured) if spread is None else np.asarray(spread, dtype=float)
    noise = np.sqrt((relative_noise * measured) ** 2 + spread**2)
    prior = np.array([f.prior for f in factors], dtype=float)
    prior_sd = np.array([f.sd for f in factors], dtype=float)
    # Data rows weighted by 1/noise, prior rows by 1/sd: the mode of the Gaussian posterior is the
    # least-squares solution of the stacked system, kept above each factor's floor.
    a = np.vstack([parts / noise[:, None], np.diag(1.0 / prior_sd)])
    b = np.concatenate([measured / noise, prior / prior_sd])
    floors = np.array([f.floor for f in factors], dtype=float)
    mode = lsq_linear(a, b, bounds=(floors, np.full(len(factors), np.inf)), method="bvls").x
    precision = a.T @ a
    cov = np.linalg.inv(precision)
    fitted = parts @ mode
    return Belief(factors, mode, cov, (parts > 0).sum(axis=0).astype(int), len(measured),
                  list(measured / np.where(fitted > 0, fitted, np.nan)))


# --- the factors of a plan's estimated step time ------------------------------------------------

# A scale's prior spread: how far the estimate's part may be off before any trial measured it.
# Wide: a datasheet or a microbenchmark says little about a whole training step (on this CPU the
# uncalibrated estimate was off by +66% to +1744%; published runs put GPU estimates 30-90% off).
SCALE_SD = 0.5
# Corrections with no part of their own (a ZeRO stage's or the Triton kernels' effect on compute):
# centred on 0, a third of the compute either way.
CORRECTION_SD = 0.3
OFFLOAD_SD = 1.0  # host links and the host's AdamW: the least known part


def factor_parts(frame) -> dict[str, tuple[Factor, np.ndarray]]:
    """Every factor a plan of `frame` may lean on (an estimate frame: plan columns and time_*_s),
    with each plan's part of it in seconds per step."""
    col = lambda name: frame[name].to_numpy(dtype=float)  # noqa: E731
    compute = col("time_forward_s") + col("time_backward_s")
    zero = frame["zero_stage"].to_numpy()
    offloaded = (frame["offload_optimizer"].to_numpy(bool) | frame["offload_params"].to_numpy(bool)) & (zero >= 1)
    precision = frame["precision"].astype(str).to_numpy()
    kernels = frame["kernels"].astype(str).to_numpy()
    dp_comm = col("time_dp_comm_s") + col("time_overlap_s")
    out = {}
    fp8 = frame["fp8"].astype(str).to_numpy() if "fp8" in frame else np.full(len(frame), "none")
    for p in ("fp32", "bf16", "fp16"):
        out[f"compute[{p}]"] = (Factor(f"compute[{p}]", 1.0, SCALE_SD, 0.05, f"forward + backward in {p}"),
                                np.where((precision == p) & (fp8 == "none"), compute, 0.0))
    # the float8 linears' plans: their compute is a factor of its own (the float8 GEMM rate and the
    # casts' cost are the catalog's least-known figures), learned from their trials
    out["compute[fp8]"] = (Factor("compute[fp8]", 1.0, SCALE_SD, 0.05, "forward + backward with float8 linears"),
                           np.where(fp8 != "none", compute, 0.0))
    out["kernels[triton]"] = (Factor("kernels[triton]", 0.0, CORRECTION_SD, -0.9, "compute with Triton kernels, beyond torch's"),
                              np.where(kernels == "triton", compute, 0.0))
    for z in (1, 2, 3):
        out[f"zero[{z}]"] = (Factor(f"zero[{z}]", 0.0, CORRECTION_SD, -0.5, f"compute under ZeRO-{z}, beyond ZeRO-0's"),
                             np.where(zero == z, compute, 0.0))
    rows = [
        ("recompute", 1.0, SCALE_SD, "activation checkpointing's recompute", col("time_recompute_s")),
        ("optimizer", 1.0, SCALE_SD, "the optimizer step on the device", np.where(offloaded, 0.0, col("time_optimizer_s"))),
        ("offload", 1.0, OFFLOAD_SD, "offload transfers and the host's optimizer step",
         col("time_offload_s") + np.where(offloaded, col("time_optimizer_s"), 0.0)),
        ("dp_comm[ddp]", 1.0, SCALE_SD, "data-parallel communication, ZeRO 0", np.where(zero == 0, dp_comm, 0.0)),
        ("dp_comm[fsdp]", 1.0, SCALE_SD, "data-parallel communication, ZeRO 1-3", np.where(zero >= 1, dp_comm, 0.0)),
        ("tp_comm", 1.0, SCALE_SD, "tensor-parallel communication", col("time_tp_comm_s")),
        ("cp_comm", 1.0, SCALE_SD, "context parallelism's exposed k/v ring", col("time_cp_comm_s")),
        ("ep_comm", 1.0, SCALE_SD, "expert-parallel all-to-alls", col("time_ep_comm_s")),
        ("pp", 1.0, SCALE_SD, "the pipeline bubble and its transfers", col("time_pp_bubble_s") + col("time_pp_comm_s")),
        ("dispatch", 1.0, SCALE_SD, "per-op dispatch and the fixed cost per step", col("time_overhead_s")),
    ]
    out |= {name: (Factor(name, prior, sd, 0.0, about), part) for name, prior, sd, about, part in rows}
    # a fixed cost per step the estimate does not know of; its part is one second per step, its
    # prior spread set by factors_of from the plans' step times
    out["fixed"] = (Factor("fixed", 0.0, 1.0, 0.0, "a fixed cost per step (seconds)"), np.ones(len(frame)))
    return out


def factors_of(frame) -> list[Factor]:
    """The factors the plans of `frame` lean on (tp on one GPU is not one, say), with their priors.
    The fixed cost's spread is a quarter of a typical step either way."""
    parts = factor_parts(frame)
    kept = [f for f, part in parts.values() if f.name != "fixed" and np.any(part > 0)]
    typical = float(np.median(frame["step_time_s"].to_numpy(dtype=float))) if len(frame) else 1.0
    return kept + [Factor("fixed", 0.0, 0.25 * typical, 0.0, parts["fixed"][0].about)]


def parts_matrix(frame, factors: list[Factor]) -> np.ndarray:
    """Each plan's part of each of `factors`, one row per plan of `frame`."""
    parts = factor_parts(frame)
    return np.stack([parts[f.name][1] for f in factors], axis=1) if len(frame) else np.zeros((0, len(factors)))
