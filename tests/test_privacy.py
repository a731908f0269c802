"""Tests for shared/privacy.py: epsilon of a history, noise for a budget."""

import functools
import math
import random
import re

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fedtl.shared import privacy
from fedtl.shared.errors import ConfigError, PrivacyBudgetError
from fedtl.shared.privacy import PrivacyStep, compute_epsilon, find_noise_multiplier

# Opacus' default RDP orders, written out here (opacus/accountants/rdp.py, RDPAccountant.DEFAULT_ALPHAS)
# so the oracle does not go through the accountant class fedtl itself uses.
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def oracle_epsilon(stretches: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon from Opacus' pure RDP analysis: sum each stretch's RDP curve, then convert once."""
    rdp = sum(compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=ORDERS) for sigma, q, steps in stretches)
    eps, _ = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)
    return float(eps)


# --- compute_epsilon -------------------------------------------------------------------------------


def test_compute_epsilon_matches_opacus_rdp_analysis_for_one_stretch():
    eps = compute_epsilon([PrivacyStep(1.1, 0.01, 1000)], delta=1e-5)
    assert eps == pytest.approx(oracle_epsilon([(1.1, 0.01, 1000)], 1e-5), rel=1e-9)


def test_compute_epsilon_pinned_value():
    # Recorded once, when this test was written, from compute_epsilon with Opacus 1.6.0's RDP
    # accountant (default orders): sigma=1.1, q=0.01, 1000 steps, delta=1e-5 -> 1.7117700912203435.
    # A change here means the accounting changed (orders, conversion, history handling), not a refactor.
    assert compute_epsilon([PrivacyStep(1.1, 0.01, 1000)], delta=1e-5) == pytest.approx(1.7117700912203435, rel=1e-6)


def test_compute_epsilon_composes_heterogeneous_history_like_summed_rdp_curves():
    history = [PrivacyStep(1.1, 0.01, 1000), PrivacyStep(0.8, 0.05, 120)]
    eps = compute_epsilon(history, delta=1e-5)
    assert eps == pytest.approx(oracle_epsilon([(1.1, 0.01, 1000), (0.8, 0.05, 120)], 1e-5), rel=1e-9)
    # Composition commutes, and composing costs more than either stretch alone.
    assert compute_epsilon(history[::-1], delta=1e-5) == pytest.approx(eps, rel=1e-12)
    assert eps > max(compute_epsilon([s], delta=1e-5) for s in history)


def test_compute_epsilon_ignores_zero_step_stretches():
    base = [PrivacyStep(1.1, 0.01, 1000)]
    assert compute_epsilon(base + [PrivacyStep(0.5, 0.5, 0)], delta=1e-5) == compute_epsilon(base, delta=1e-5)
    # A zero-step, zero-noise stretch spent nothing, so it must not make epsilon infinite either.
    assert math.isfinite(compute_epsilon(base + [PrivacyStep(0.0, 0.5, 0)], delta=1e-5))


def test_compute_epsilon_of_empty_history_is_zero():
    assert compute_epsilon([], delta=1e-5) == 0.0
    assert compute_epsilon([], delta=1e-5, accountant="prv") == 0.0


def test_compute_epsilon_of_a_noise_free_stretch_is_infinite():
    history = [PrivacyStep(1.1, 0.01, 1000), PrivacyStep(0.0, 0.1, 1)]
    assert compute_epsilon(history, delta=1e-5) == math.inf
    assert compute_epsilon(history, delta=1e-5, accountant="prv") == math.inf


def test_prv_accountant_is_available_and_no_looser_than_rdp():
    history = [PrivacyStep(1.1, 0.01, 1000)]
    eps_rdp = compute_epsilon(history, delta=1e-5, accountant="rdp")
    eps_prv = compute_epsilon(history, delta=1e-5, accountant="prv")
    assert eps_prv <= eps_rdp * 1.01
    assert eps_prv >= eps_rdp * 0.8  # both bound the same mechanism; PRV is tighter by ~10%, not by 2x


def test_unknown_accountant_is_a_config_error():
    with pytest.raises(ConfigError, match=r"`accountant` must be one of rdp, prv; got 'gdp'"):
        compute_epsilon([PrivacyStep(1.0, 0.1, 1)], delta=1e-5, accountant="gdp")


# --- find_noise_multiplier -------------------------------------------------------------------------


def test_find_noise_multiplier_meets_the_target_and_is_minimal():
    target, delta, q, steps, precision = 2.0, 1e-5, 0.05, 200, 0.005
    sigma = find_noise_multiplier(
        target_epsilon=target, target_delta=delta, sample_rate=q, steps=steps, precision=precision
    )
    assert oracle_epsilon([(sigma, q, steps)], delta) <= target
    assert oracle_epsilon([(sigma - precision, q, steps)], delta) > target


def test_find_noise_multiplier_leaves_room_for_the_history():
    target, delta, q, steps, precision = 3.0, 1e-5, 0.05, 200, 0.005
    history = [PrivacyStep(2.0, 0.1, 50)]
    alone = find_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q, steps=steps)
    after = find_noise_multiplier(
        target_epsilon=target, target_delta=delta, sample_rate=q, steps=steps, history=history, precision=precision
    )
    assert after > alone + precision
    stretches = [(2.0, 0.1, 50)]
    assert oracle_epsilon(stretches + [(after, q, steps)], delta) <= target
    assert oracle_epsilon(stretches + [(after - precision, q, steps)], delta) > target


def test_find_noise_multiplier_refuses_a_spent_budget_naming_both_numbers():
    history = [PrivacyStep(0.6, 0.1, 500)]
    spent = compute_epsilon(history, delta=1e-5)
    assert spent > 1.5
    expected = rf"epsilon already spent is {re.escape(f'{spent:.3f}')} >= target-epsilon 1\.5 \(delta 1e-05\)"
    with pytest.raises(PrivacyBudgetError, match=expected):
        find_noise_multiplier(target_epsilon=1.5, target_delta=1e-5, sample_rate=0.05, steps=10, history=history)


@pytest.mark.filterwarnings("error")  # the error explains the floor; Opacus' warning about it must not leak
def test_find_noise_multiplier_gives_up_when_no_noise_is_enough():
    # RDP -> (eps, delta) conversion alone costs more than 0.01 at delta 1e-5, whatever the noise.
    with pytest.raises(
        PrivacyBudgetError,
        match=r"no noise multiplier up to 1e4 meets target-epsilon 0\.01 over 10 steps .*: even noise 1e4 spends "
        r"epsilon 0\.103 at delta 1e-05 .*; raise target-epsilon above it or raise target-delta$",
    ):
        find_noise_multiplier(target_epsilon=0.01, target_delta=1e-5, sample_rate=1.0, steps=10)
    # the floor is the conversion's, not the noise's: just above it a noise is found
    assert find_noise_multiplier(target_epsilon=0.11, target_delta=1e-5, sample_rate=1.0, steps=10) < 1e4


# --- the cached RDP accountant against Opacus itself ----------------------------------------------


@functools.cache
def opacus_rdp(q: float, sigma: float, steps: int) -> np.ndarray:
    """Opacus' RDP curve of one stretch (a pure function, memoised only to keep the oracle affordable)."""
    return compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=ORDERS)


def reference_epsilon(history: list[PrivacyStep], delta: float) -> float:
    """compute_epsilon as it was before issue 13: the body of Opacus' RDPAccountant.get_privacy_spent."""
    steps = [s for s in history if s.steps > 0]
    if not steps:
        return 0.0
    if any(s.noise_multiplier == 0 for s in steps):
        return math.inf
    rdp = sum([opacus_rdp(s.sample_rate, s.noise_multiplier, s.steps) for s in steps])
    eps, _ = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)
    return float(eps)


def accountant_epsilon(history: list[PrivacyStep], delta: float) -> float:
    """Epsilon from a fresh Opacus RDPAccountant holding `history` (no memo at all)."""
    acc = RDPAccountant()
    acc.history = [(s.noise_multiplier, s.sample_rate, s.steps) for s in history if s.steps > 0]
    return float(acc.get_epsilon(delta=delta))


def reference_find_noise_multiplier(
    *, target_epsilon, target_delta, sample_rate, steps, history=(), precision=0.005
) -> float:
    """find_noise_multiplier (rdp) as it was before issue 13, on reference_epsilon."""
    past = [s for s in history if s.steps > 0]
    spent = reference_epsilon(past, target_delta)
    if spent >= target_epsilon:
        raise PrivacyBudgetError("spent")

    def eps_at(sigma: float) -> float:
        return reference_epsilon(past + [PrivacyStep(sigma, sample_rate, steps)], target_delta)

    low, high = 0.0, 1.0
    while eps_at(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise PrivacyBudgetError("no noise")
    while high - low > precision:
        mid = (low + high) / 2
        if eps_at(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high


# (noise_multiplier, sample_rate) pairs from tiny to no noise and sampling, q = 1 included (closed form).
PAIRS = [(0.35, 0.004), (0.6, 0.05), (0.9, 64 / 287), (1.3, 0.5), (2.2, 64 / 287), (5.0, 1.0), (40.0, 1.0), (1.1, 0.01)]
STEP_COUNTS = [1, 20, 300]


def random_history(rng: random.Random) -> list[PrivacyStep]:
    """Return 1-12 stretches drawn from PAIRS x STEP_COUNTS (repeats likely, as in a ledger), zero-step ones too."""
    out = []
    for _ in range(rng.randint(1, 12)):
        sigma, q = rng.choice(PAIRS)
        out.append(PrivacyStep(sigma, q, rng.choice(STEP_COUNTS + [0])))
    return out


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Optimal order is the")
def test_compute_epsilon_is_bit_identical_to_opacus_over_random_histories():
    rng = random.Random(13)
    privacy._unit_curve.cache_clear()
    for trial in range(300):
        history, delta = random_history(rng), rng.choice([1e-5, 1e-7, 1e-3])
        # Start from an arbitrary order and, now and then, from half-filled curves: the orders a call
        # skips or computes first depend on both, the result must not.
        privacy._hint[0] = rng.randrange(len(ORDERS))
        if trial % 50 == 0:
            privacy._unit_curve.cache_clear()
        eps = compute_epsilon(history, delta=delta)
        assert eps == reference_epsilon(history, delta), (trial, history, delta)
        if trial % 50 == 0:  # against the accountant class itself, no memo anywhere (short: it is slow)
            short = history[:3]
            direct = accountant_epsilon(short, delta)
            assert compute_epsilon(short, delta=delta) == direct
            assert compute_epsilon(short, delta=delta) == pytest.approx(direct, rel=1e-9, abs=1e-9)


def test_opacus_per_step_rdp_is_never_below_the_floor_the_order_skipping_assumes():
    # compute_epsilon skips an order only if its epsilon is provably above the best one, assuming each
    # per-step RDP that is not computed yet is >= -_RDP_FLOOR (a Renyi divergence is >= 0).
    for sigma, q in PAIRS + [(0.3, 0.9), (100.0, 0.001), (8.0, 0.999)]:
        curve = opacus_rdp(q, sigma, 1)
        assert np.nanmin(curve) >= -privacy._RDP_FLOOR / 1e3, (sigma, q)


# Targets, deltas, sample rates, steps and histories around the ones fedtl plans: a DP-SGD run (q = 64/287,
# 200 steps), a second run on a site ledger, small q, a feature-centre release (q = 1, one step), a coarse
# precision, and budgets the search cannot meet.
FIND_GRID = [
    dict(target_epsilon=8.0, target_delta=1e-5, sample_rate=64 / 287, steps=200),
    dict(
        target_epsilon=8.0,
        target_delta=1e-5,
        sample_rate=64 / 287,
        steps=200,
        history=[PrivacyStep(2.2, 64 / 287, 20)] * 5 + [PrivacyStep(5.0, 1.0, 1)],
    ),
    dict(target_epsilon=1.0, target_delta=1e-6, sample_rate=0.01, steps=1000),
    dict(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.05, steps=200, history=[PrivacyStep(2.0, 0.1, 50)]),
    dict(target_epsilon=0.25 * 3.0, target_delta=1e-5, sample_rate=1.0, steps=1),
    dict(target_epsilon=2.0, target_delta=1e-3, sample_rate=0.5, steps=30, precision=0.05),
    dict(target_epsilon=50.0, target_delta=1e-5, sample_rate=0.004, steps=20, history=[PrivacyStep(0.0, 0.5, 0)]),
    dict(target_epsilon=8.0, target_delta=1e-5, sample_rate=0.3, steps=0),
    dict(target_epsilon=1.5, target_delta=1e-5, sample_rate=0.05, steps=10, history=[PrivacyStep(0.6, 0.1, 500)]),
    dict(target_epsilon=0.01, target_delta=1e-5, sample_rate=1.0, steps=10),
]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Optimal order is the")
@pytest.mark.parametrize("case", FIND_GRID, ids=lambda c: "-".join(f"{v}" for k, v in c.items() if k != "history"))
def test_find_noise_multiplier_takes_the_same_bisection_decisions_as_opacus(case):
    privacy._hint[0] = len(ORDERS) - 1  # start every search from the largest order: the least helpful one
    try:
        expected = reference_find_noise_multiplier(**case)
    except PrivacyBudgetError as e:
        with pytest.raises(PrivacyBudgetError, match="already spent" if str(e) == "spent" else "no noise multiplier"):
            find_noise_multiplier(**case)
        return
    assert find_noise_multiplier(**case) == expected
    assert find_noise_multiplier(**case) == expected  # again, on the curves the first search cached


# --- PrivacyStep validation ------------------------------------------------------------------------


@pytest.mark.parametrize("noise", [-0.1, math.inf, math.nan])
def test_privacy_step_rejects_bad_noise(noise):
    with pytest.raises(
        ConfigError, match=rf"`noise-multiplier` must be a finite number >= 0, got {re.escape(str(noise))}"
    ):
        PrivacyStep(noise, 0.1, 1)


@pytest.mark.parametrize("rate", [0.0, -0.5, 1.5, math.nan])
def test_privacy_step_rejects_sample_rate_outside_unit_interval(rate):
    with pytest.raises(ConfigError, match=rf"`sample-rate` must be in \(0, 1\], got {re.escape(str(rate))}"):
        PrivacyStep(1.0, rate, 1)


def test_privacy_step_rejects_negative_steps_and_accepts_the_edges():
    with pytest.raises(ConfigError, match=r"`steps` must be >= 0, got -1"):
        PrivacyStep(1.0, 0.5, -1)
    PrivacyStep(0.0, 1.0, 0)  # no noise, full batch, no steps: all legal
