"""The engine's own speed on this device as the estimator's prior (autotune.device_prior), and the
estimator's use of it: dispatch time per op on every device, compute scaled per precision."""
import dataclasses

import numpy as np
import pytest

from autotune import device_prior
from autotune.config import planner_config
from autotune.estimate import estimate
from autotune.hardware import catalog_gpu

from fake_probe import HARDWARE


def test_a_catalog_gpu_is_left_as_the_datasheet_says():
    h100 = catalog_gpu("h100-sxm")
    assert device_prior.with_engine_prior(h100, planner_config([]).model, 64, ["bf16"]) is h100


def test_the_fit_recovers_dispatch_and_scales_from_the_timings(monkeypatch):
    """Timings made as scale x modelled compute + ops x dispatch give back that dispatch and scale."""
    truth = {"fp32": 3.0, "bf16": 0.5}

    def timed(model, precision, kernels, batch, seq, device):
        compute, ops = device_prior._modelled(model, precision, kernels, batch, seq, HARDWARE)
        return truth[precision] * compute + ops * 2e-5

    monkeypatch.setattr(device_prior, "_time_block", timed)
    monkeypatch.setattr(device_prior, "_MEASURED", {})
    pc = planner_config(["model=gpt2", "job.seq_len=128"])
    hw = device_prior.with_engine_prior(HARDWARE, pc.model, pc.job.seq_len, ["fp32", "bf16"])
    # the dispatch block's own compute is taken off too, so the fit is exact
    assert hw.dispatch_s == pytest.approx(2e-5, rel=0.05)
    assert hw.compute_scale == pytest.approx({"fp32/torch": 3.0, "bf16/torch": 0.5}, rel=0.05)


@pytest.mark.slow
def test_this_machine_is_measured_in_each_precision():
    pc = planner_config([])
    hw = device_prior.with_engine_prior(HARDWARE, pc.model, pc.job.seq_len, ["fp32", "bf16"])
    assert 1e-7 < hw.dispatch_s < 1e-2
    assert set(hw.compute_scale) == {"fp32/torch", "bf16/torch"}
    assert all(0.05 <= v <= 20 for v in hw.compute_scale.values())


def test_the_estimate_charges_dispatch_on_every_device_and_scales_compute_per_precision():
    pc = planner_config(["plan.micro_batch=2"])
    base = estimate(pc.train, dataclasses.replace(HARDWARE, dispatch_s=0.0))
    slow_dispatch = estimate(pc.train, dataclasses.replace(HARDWARE, dispatch_s=1e-4))
    assert base.time["overhead_s"] == 0 and slow_dispatch.time["overhead_s"] > 0
    # the overhead is the dispatched ops of every micro-batch at the dispatch time
    ops = slow_dispatch.time["overhead_s"] / 1e-4
    assert ops == pytest.approx(round(ops)) and ops > 0
    doubled = estimate(pc.train, dataclasses.replace(HARDWARE, dispatch_s=0.0, compute_scale={"fp32/torch": 2.0}))
    other = estimate(pc.train, dataclasses.replace(HARDWARE, dispatch_s=0.0, compute_scale={"bf16/torch": 2.0}))
    for part in ("forward_s", "backward_s"):
        assert doubled.time[part] == pytest.approx(2 * base.time[part])
        assert other.time[part] == pytest.approx(base.time[part])
    assert np.isclose(doubled.time["optimizer_s"], base.time["optimizer_s"])
