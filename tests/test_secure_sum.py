"""The maths of secure aggregation and distributed noise, against independent computations.

Ring sums against Python's unbounded integers; quantisation against its stated error bounds; the Skellam
sampler against the Skellam law (Bessel functions); the Skellam accountant against a direct transcription of
Agarwal et al. 2021, Theorem 3.5 with the standard RDP -> (epsilon, delta) conversion; the Gaussian accountant
unchanged for Gaussian histories.
"""

import math

import numpy as np
import pytest
from scipy import special, stats

from fedtl.shared.closed_form import compute_stats
from fedtl.shared.distributed_noise import (
    POISSON_MAX_MEAN,
    integer_scale,
    quantization_shrink,
    quantize_rows,
    sample_skellam,
    share_variance,
    skellam_rdp,
)
from fedtl.shared.errors import ConfigError, PrivacyBudgetError
from fedtl.shared.privacy import PrivacyStep, compute_epsilon, find_noise_multiplier, find_skellam_noise_multiplier
from fedtl.shared.secure_sum import (
    expand_mask,
    feature_sum_release,
    from_ring,
    mask_vector,
    read_feature_sum,
    read_stats,
    shamir_threshold,
    stats_length,
    stats_release,
    sum_ring,
    to_ring,
)


def _unit_rows(rng, n, d):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_ring_sums_are_python_integer_sums_modulo_2_to_the_64():
    rng = np.random.default_rng(0)
    vectors = [rng.integers(-(2**62), 2**62, size=50) for _ in range(5)]
    total = from_ring(sum_ring([to_ring(v) for v in vectors]))
    for j in range(50):
        exact = sum(int(v[j]) for v in vectors)
        centred = (exact + 2**63) % 2**64 - 2**63
        assert int(total[j]) == centred


def test_pairwise_masks_cancel_and_self_masks_are_removed_exactly():
    rng = np.random.default_rng(1)
    values = [rng.integers(-1000, 1000, size=64) for _ in range(3)]
    pair = {(1, 2): b"a" * 32, (1, 3): b"b" * 32, (2, 3): b"c" * 32}
    seeds = [b"s1" * 16, b"s2" * 16, b"s3" * 16]
    masked = []
    for i in (1, 2, 3):
        pairwise = [(pair[tuple(sorted((i, j)))], 1 if i > j else -1) for j in (1, 2, 3) if j != i]
        masked.append(mask_vector(values[i - 1], self_secret=seeds[i - 1], pairwise=pairwise))
    total = sum_ring(masked)
    for seed in seeds:
        total -= expand_mask(seed, 64)
    assert np.array_equal(from_ring(total), sum(values))


def test_masks_are_deterministic_per_secret_and_uniform_over_the_ring():
    a, b = expand_mask(b"x" * 32, 20000), expand_mask(b"y" * 32, 20000)
    assert np.array_equal(a, expand_mask(b"x" * 32, 20000)) and not np.array_equal(a, b)
    top = (a >> np.uint64(56)).astype(np.int64)  # top byte: uniform on 0..255
    assert stats.chisquare(np.bincount(top, minlength=256)).pvalue > 1e-4


def test_the_shamir_threshold_keeps_a_lying_server_and_the_colluders_below_both_kinds_of_share():
    for n in range(2, 16):
        for t in range(1, n + 1):
            k_ = shamir_threshold(n, t)
            colluders = n - t
            assert colluders < k_ <= n  # colluders alone never rebuild a secret
            # Two disjoint sets of honest answers, each topped up by every colluder, cannot both reach k.
            assert 2 * (k_ - colluders) > t
    assert shamir_threshold(5, 5) == 3 and shamir_threshold(10, 10) == 6 and shamir_threshold(5, 1) == 5
    with pytest.raises(ConfigError, match="at least 2 sites"):
        shamir_threshold(1, 1)
    with pytest.raises(ConfigError, match=r"must be in \[1, 4\]"):
        shamir_threshold(4, 5)


def test_quantised_rows_keep_their_norm_bound_and_the_stated_rounding_error():
    rng = np.random.default_rng(2)
    for dim, scale in ((7, 64), (1280, 1024), (64, 2**16)):
        rows = _unit_rows(rng, 300, dim)
        q, shrink = quantize_rows(rows, scale)
        assert shrink == pytest.approx(1 - math.sqrt(dim) / (2 * scale))
        assert np.linalg.norm(q, axis=1).max() <= scale  # every row, deterministically
        assert np.abs(q / (scale * shrink) - rows).max() <= 1 / (2 * scale * shrink) + 1e-12
    with pytest.raises(ConfigError, match="too coarse for 1280 dims"):
        quantization_shrink(1280, 32)
    with pytest.raises(ConfigError, match="L2 norm <= 1"):
        quantize_rows(np.full((1, 4), 0.6), 64)


def test_the_feature_sum_release_reads_back_within_its_bound_and_states_its_sensitivities():
    rng = np.random.default_rng(3)
    rows = _unit_rows(rng, 500, 32)
    release = feature_sum_release(rows, 2**12)
    back = read_feature_sum(release.values, release.scale, release.shrink)
    assert np.abs(back - rows.sum(axis=0)).max() <= 500 / (2 * release.scale * release.shrink)
    # One example moves the integer sum by its quantised row: L2 <= gamma, L1 <= sqrt(D) gamma.
    without = feature_sum_release(rows[1:], 2**12)
    diff = (release.values - without.values).astype(float)
    assert np.linalg.norm(diff) <= release.l2_sensitivity and np.abs(diff).sum() <= release.l1_sensitivity


def test_the_stats_release_is_the_exact_integer_statistics_and_reads_back_near_the_float_ones():
    rng = np.random.default_rng(4)
    rows, labels = _unit_rows(rng, 200, 12) * 0.9, rng.integers(0, 3, 200)
    release = stats_release(rows, labels, 3, 2**10)
    assert release.values.shape == (stats_length(12, 3),)
    q, shrink = quantize_rows(rows, 2**10)
    # Independent integer arithmetic (Python ints, no BLAS): the Gram's upper triangle, sums, counts.
    qi = [[int(v) for v in row] for row in q]
    gram = [sum(r[a] * r[b] for r in qi) for a in range(12) for b in range(a, 12)]
    sums = [sum(qi[i][a] for i in range(200) if labels[i] == c) * 2**10 for c in range(3) for a in range(12)]
    counts = [int((labels == c).sum()) * 2**20 for c in range(3)]
    assert release.values.tolist() == gram + sums + counts
    back = read_stats(release.values, dim=12, num_classes=3, scale=2**10, shrink=shrink, noise_std=0.0)
    exact = compute_stats(rows, labels, 3)
    assert np.array_equal(back.class_counts, exact.class_counts)
    per_entry = 1 / (2**10 * shrink)  # each coordinate's rounding error bound
    assert np.abs(back.class_sums - exact.class_sums).max() <= 200 * per_entry
    assert np.abs(back.gram - exact.gram).max() <= 200 * (2 * per_entry + per_entry**2)
    # Adding one example moves the vector by at most the stated sensitivities.
    more = stats_release(np.vstack([rows, _unit_rows(rng, 1, 12)]), np.append(labels, 1), 3, 2**10)
    diff = (more.values - release.values).astype(float)
    assert np.linalg.norm(diff) <= release.l2_sensitivity and np.abs(diff).sum() <= release.l1_sensitivity


def test_skellam_draws_follow_the_skellam_law_and_shares_add_up_to_one_curators_variance():
    rng = np.random.default_rng(5)
    mu = 6.0
    draws = sample_skellam(rng, variance=mu, size=200_000)
    values, counts = np.unique(np.clip(draws, -12, 12), return_counts=True)
    ks = np.arange(-12, 13)
    pmf = np.exp(-mu) * special.iv(ks, mu)  # Sk(mu/2, mu/2): P(k) = e^-mu I_k(mu)
    tail = np.exp(-mu) * special.iv(np.arange(12, 400), mu).sum()  # P(X >= 12) = P(X <= -12), folded into the ends
    pmf[0] = pmf[-1] = tail
    assert values.tolist() == ks.tolist()
    assert stats.chisquare(counts, pmf / pmf.sum() * counts.sum()).pvalue > 1e-4
    # t shares of variance mu / t sum to variance mu; a site's share is that.
    assert share_variance(noise_multiplier=2.0, l2_sensitivity=3.0, honest_sites=4) == 9.0
    total = sum(sample_skellam(rng, variance=mu / 4, size=200_000) for _ in range(4))
    assert total.var() == pytest.approx(mu, rel=0.02) and abs(total.mean()) < 0.02
    with pytest.raises(ConfigError, match="integer_scale"):
        sample_skellam(rng, variance=4 * POISSON_MAX_MEAN, size=1)


def test_the_quantisation_scale_is_the_finest_that_keeps_every_poisson_mean_in_range():
    for sigma in (0.5, 3.0, 40.0):
        scale = integer_scale(noise_multiplier=sigma, l2_per_scale=math.sqrt(3), degree=2, max_bits=12)
        assert (sigma * math.sqrt(3) * scale**2) ** 2 / 2 <= POISSON_MAX_MEAN
        assert scale == 2**12 or (sigma * math.sqrt(3) * (2 * scale) ** 2) ** 2 / 2 > POISSON_MAX_MEAN
    with pytest.raises(ConfigError, match="too large for a quantised release"):
        integer_scale(noise_multiplier=1e9, l2_per_scale=1.0, degree=2, max_bits=12)


def _oracle_skellam_epsilon(releases, delta):
    """Agarwal et al. 2021 Thm 3.5 transcribed, composed over releases, converted as in Balle et al. 2020."""
    best = math.inf
    for a in list(range(2, 64)) + [64, 80, 96, 112, 128, 160, 192, 256, 384, 512, 768, 1024]:
        rdp = 0.0
        for sigma, d2, d1 in releases:
            mu = (sigma * d2) ** 2
            rdp += a * d2**2 / (2 * mu) + min(((2 * a - 1) * d2**2 + 6 * d1) / (4 * mu**2), 3 * d1 / (2 * mu))
        eps = rdp + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
        best = min(best, eps)
    return best


def test_skellam_epsilon_is_the_theorem_s_and_tends_to_the_gaussian_s_for_fine_quantisation():
    delta = 1e-5
    coarse = [(3.0, 40.0, 400.0)]
    fine = [(3.0, math.sqrt(3) * 2**20, 2**20 * 700.0)]
    for releases in (coarse, fine, coarse + fine):
        history = [PrivacyStep(s, 1.0, 1, l2_sensitivity=d2, l1_sensitivity=d1) for s, d2, d1 in releases]
        assert compute_epsilon(history, delta=delta) == pytest.approx(
            _oracle_skellam_epsilon(releases, delta), rel=1e-12
        )
    assert skellam_rdp(5, noise_multiplier=3.0, l2_sensitivity=40.0, l1_sensitivity=400.0) > 5 / (2 * 9)
    # Fine quantisation: the integers' surcharge vanishes, the Gaussian mechanism's RDP remains (integer orders).
    gaussian = compute_epsilon([PrivacyStep(3.0, 1.0, 1)], delta=delta)
    skellam = compute_epsilon([PrivacyStep(3.0, 1.0, 1, *fine[0][1:])], delta=delta)
    assert gaussian <= skellam <= gaussian * 1.01
    with pytest.raises(ConfigError, match="integer orders"):
        skellam_rdp(2.5, noise_multiplier=1.0, l2_sensitivity=1.0, l1_sensitivity=1.0)
    with pytest.raises(ConfigError, match=r"`sample-rate` must be in \(0, 1\]"):
        PrivacyStep(1.0, 1.5, 1, l2_sensitivity=1.0, l1_sensitivity=1.0)
    # A Skellam step on a Poisson sample (secure DP-SGD) is accounted, and costs less than on every example.
    sampled = compute_epsilon([PrivacyStep(3.0, 0.5, 1, *fine[0][1:])], delta=delta)
    assert 0 < sampled < skellam


def test_a_history_mixing_dp_sgd_and_skellam_adds_their_rdp_at_integer_orders():
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = list(range(2, 64)) + [64, 80, 96, 112, 128, 160, 192, 256, 384, 512, 768, 1024]
    history = [PrivacyStep(1.5, 0.05, 200), PrivacyStep(4.0, 1.0, 1, l2_sensitivity=1e6, l1_sensitivity=3e7)]
    rdp = compute_rdp(q=0.05, noise_multiplier=1.5, steps=200, orders=orders)
    rdp += np.array([skellam_rdp(a, noise_multiplier=4.0, l2_sensitivity=1e6, l1_sensitivity=3e7) for a in orders])
    assert compute_epsilon(history, delta=1e-5) == get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)[0]
    # Planning DP-SGD after a Skellam release meets the budget exactly as before.
    sigma = find_noise_multiplier(
        target_epsilon=6.0, target_delta=1e-5, sample_rate=0.05, steps=200, history=history[1:]
    )
    assert compute_epsilon([PrivacyStep(sigma, 0.05, 200), history[1]], delta=1e-5) <= 6.0
    assert compute_epsilon([PrivacyStep(sigma - 0.01, 0.05, 200), history[1]], delta=1e-5) > 6.0


def test_the_skellam_noise_search_lands_on_the_budget():
    sigma = find_skellam_noise_multiplier(
        target_epsilon=1.0, target_delta=1e-5, l2_sensitivity=2**20, l1_sensitivity=2**25
    )
    release = lambda s: PrivacyStep(s, 1.0, 1, l2_sensitivity=2**20, l1_sensitivity=2**25)  # noqa: E731
    assert compute_epsilon([release(sigma)], delta=1e-5) <= 1.0 < compute_epsilon([release(sigma - 0.01)], delta=1e-5)
    with pytest.raises(PrivacyBudgetError, match="budget exhausted"):
        find_skellam_noise_multiplier(
            target_epsilon=1.0, target_delta=1e-5, l2_sensitivity=4.0, l1_sensitivity=8.0, history=[release(0.5)]
        )
