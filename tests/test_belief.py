"""The per-factor posterior of autotune.belief: what it learns, what it keeps uncertain."""
import numpy as np

from autotune.belief import Factor, fit_belief, prior_belief

FACTORS = [Factor("compute[fp32]", 1.0, 0.5, 0.05), Factor("compute[bf16]", 1.0, 0.5, 0.05),
           Factor("recompute", 1.0, 0.5), Factor("fixed", 0.0, 0.01)]


def plans(rng, n, precisions=("fp32", "bf16"), checkpointing=(False, True)):
    """Random parts: compute in one precision, recompute a third of it where checkpointed, the fixed column."""
    rows = []
    for _ in range(n):
        compute = rng.uniform(0.01, 0.1)
        prec = rng.choice(precisions)
        ckpt = rng.choice(checkpointing)
        rows.append([compute if prec == "fp32" else 0.0, compute if prec == "bf16" else 0.0,
                     compute / 3 if ckpt else 0.0, 1.0])
    return np.array(rows)


def test_the_prior_is_the_belief_before_any_trial():
    belief = prior_belief(FACTORS)
    assert list(belief.mean) == [1.0, 1.0, 1.0, 0.0]
    assert np.allclose(belief.sd, [0.5, 0.5, 0.5, 0.01])
    mean, sd = belief.predict(np.array([[0.1, 0, 0, 1]]))
    assert np.isclose(mean[0], 0.1) and np.isclose(sd[0], np.hypot(0.05, 0.01))


def test_a_factor_the_trials_contradict_is_learned_and_named():
    rng = np.random.default_rng(0)
    truth = np.array([0.3, 1.1, 0.0, 0.002])  # fp32 3x faster than estimated, recompute free
    x = plans(rng, 12)
    measured = x @ truth * rng.normal(1, 0.01, len(x))
    belief = fit_belief(FACTORS, x, measured)
    assert np.allclose(belief.mean[:3], truth[:3], atol=0.05)
    assert belief.sd[0] < 0.05 and belief.sd[2] < 0.15
    named = [r["factor"] for r in belief.surprises()]
    assert set(named) == {"compute[fp32]", "recompute"}


def test_a_factor_no_trial_varied_keeps_its_prior_and_a_wide_bound():
    rng = np.random.default_rng(1)
    x = plans(rng, 8, precisions=("bf16",))
    measured = x @ np.array([1.0, 2.0, 1.0, 0.0])  # bf16 twice as slow as estimated
    belief = fit_belief(FACTORS, x, measured)
    assert np.isclose(belief.mean[0], 1.0) and np.isclose(belief.sd[0], 0.5, rtol=1e-3)
    assert belief.support[0] == 0 and belief.support[1] == 8
    fp32, bf16 = np.array([[0.05, 0, 0, 1]]), np.array([[0, 0.05, 0, 1]])
    # the unmeasured precision may be far faster than its mean; the measured one may not
    assert belief.optimistic(fp32)[0] < 0.5 * belief.predict(fp32)[0][0]
    assert belief.optimistic(bf16)[0] > 0.8 * belief.predict(bf16)[0][0]
    # and nothing in the evidence puts an fp32 plan's bound under its floor
    assert belief.optimistic(fp32)[0] >= 0.05 * 0.05


def test_measurement_spread_widens_the_posterior():
    rng = np.random.default_rng(2)
    x = plans(rng, 6)
    measured = x @ np.array([1.0, 1.0, 1.0, 0.0])
    tight = fit_belief(FACTORS, x, measured, spread=np.zeros(6))
    loose = fit_belief(FACTORS, x, measured, spread=0.5 * measured)
    assert np.all(loose.sd[:2] > tight.sd[:2])
