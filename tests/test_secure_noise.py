"""Real sites' noise and sampling from a cryptographic generator (shared/secure_noise.py)."""

import numpy as np
import pytest
from scipy import stats

from fedtl.shared.secure_noise import SecureRandom


def test_uniforms_are_uniform_and_never_zero_or_one():
    u = SecureRandom().uniform(200_000)
    assert u.min() > 0 and u.max() < 1
    assert stats.kstest(u, "uniform").pvalue > 1e-4


@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_hardened_gaussians_have_the_asked_distribution(scale):
    z = SecureRandom().normal(0.0, scale, size=(400, 250))
    assert z.shape == (400, 250)
    assert stats.kstest(z.ravel() / scale, "norm").pvalue > 1e-4
    assert np.std(z) == pytest.approx(scale, rel=0.02)


def test_two_generators_draw_independent_streams_and_zero_scale_is_exact():
    a, b = SecureRandom().normal(size=1000), SecureRandom().normal(size=1000)
    assert not np.array_equal(a, b)
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.15
    assert np.array_equal(SecureRandom().normal(2.0, 0.0, size=(3,)), np.full(3, 2.0))


def test_poisson_masks_have_the_sample_rate():
    mask = SecureRandom().bernoulli(100_000, 0.05)
    assert mask.dtype == bool and mask.mean() == pytest.approx(0.05, abs=0.003)


@pytest.mark.parametrize("lam", [0.7, 4.0, 12.0, 400.0, 2.5e5])
def test_poisson_draws_have_the_poisson_distribution(lam):
    draws = SecureRandom().poisson(lam, size=(100, 400))
    assert draws.shape == (100, 400) and draws.dtype == np.int64 and draws.min() >= 0
    assert draws.mean() == pytest.approx(lam, rel=0.01 + 3 / np.sqrt(lam * draws.size))
    assert draws.var() == pytest.approx(lam, rel=0.05)
    # Against the exact pmf over the bulk of the distribution (chi-square, bins with >= 20 expected draws).
    support = np.arange(int(stats.poisson.ppf(1e-4, lam)), int(stats.poisson.ppf(1 - 1e-4, lam)) + 1)
    expected = stats.poisson.pmf(support, lam) * draws.size
    keep = expected >= 20
    if keep.sum() >= 5 and lam < 1e4:
        observed = np.array([(draws == v).sum() for v in support[keep]])
        scaled = expected[keep] * observed.sum() / expected[keep].sum()
        assert stats.chisquare(observed, scaled).pvalue > 1e-4
