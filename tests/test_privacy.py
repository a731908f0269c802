"""Tests for shared/privacy.py: epsilon of a history, noise for a budget."""

import math
import re

import pytest
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

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


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_find_noise_multiplier_gives_up_when_no_noise_is_enough():
    # RDP -> (eps, delta) conversion alone costs more than 0.01 at delta 1e-5, whatever the noise.
    with pytest.raises(
        PrivacyBudgetError, match=r"no noise multiplier up to 1e4 meets target-epsilon 0\.01 over 10 steps"
    ):
        find_noise_multiplier(target_epsilon=0.01, target_delta=1e-5, sample_rate=1.0, steps=10)


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
