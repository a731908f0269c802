"""The one release path (client/release.py): plan -> policy check -> ledger charge -> noise, in one transaction."""

import math

import pytest
from builders import round_settings
from opacus.accountants import RDPAccountant

from fedtl.client.ledger import PrivacyCharge, PrivacyLedger
from fedtl.client.policy import PolicyRefusal
from fedtl.client.release import ReleaseRequest, charge_release, round_seed
from fedtl.client.site import Site
from fedtl.shared.errors import PrivacyBudgetError
from fedtl.shared.mechanisms import DP_SGD, FEATURE_SUM, MECHANISMS, SUFFICIENT_STATS
from fedtl.shared.protocol import SimulationSettings

FP = "0" * 64


def _site(tmp_path, *, simulated: bool = True) -> Site:
    sim = SimulationSettings("digits", "iid", 0, 0.2, 0.2, "", str(tmp_path), str(tmp_path)) if simulated else None
    return Site(name="site-0", state_dir=tmp_path / "state", cache_dir=tmp_path / "cache", data="", simulation=sim)


def _request(mechanism=DP_SGD, *, server_round=1, rate=0.1, steps=10, planned=20, noise=None, what="a round"):
    return ReleaseRequest(mechanism, server_round, rate, steps, what, noise, planned_steps=planned)


def _opacus_epsilon(history, delta=1e-5):
    accountant = RDPAccountant()
    accountant.history = [(sigma, q, steps) for sigma, q, steps in history]
    return accountant.get_epsilon(delta=delta)


def test_every_mechanism_has_its_own_ledger_kind():
    assert set(MECHANISMS) == {
        "dp-sgd",
        "feature-sum",
        "sufficient-stats",
        "secagg-feature-sum",
        "secagg-sufficient-stats",
        "secagg-head-gradient",
        "evaluation",
        "ranking",
        "finetune-scores",
    }
    assert SUFFICIENT_STATS.kind != FEATURE_SUM.kind
    assert {kind for kind, m in MECHANISMS.items() if not m.accounted} == {"evaluation", "ranking", "finetune-scores"}


def test_the_first_release_of_a_run_plans_the_noise_for_the_whole_run_and_later_ones_reuse_it(tmp_path):
    site = _site(tmp_path)
    ledger = site.ledger
    ledger.charge(
        PrivacyCharge(run_id="old", server_round=1, noise_multiplier=1.5, sample_rate=0.2, steps=30, delta=1e-5)
    )
    settings = round_settings(FP, target_epsilon=6.0)
    first = charge_release(site, settings, _request())
    second = charge_release(site, settings, _request(server_round=2))
    assert second.noise_multiplier == first.noise_multiplier
    # The plan covered the old run plus all 20 planned steps: the run lands just within its target.
    spent = _opacus_epsilon([(1.5, 0.2, 30), (first.noise_multiplier, 0.1, 20)])
    assert second.epsilon == pytest.approx(spent, rel=1e-9)
    assert 5.9 < spent <= 6.0 * (1 + 1e-6)
    assert [c.kind for c in ledger.charges()] == ["dp-sgd"] * 3


def test_a_fixed_noise_is_used_as_given_and_a_server_planned_one_must_be_given(tmp_path):
    site = _site(tmp_path)
    settings = round_settings(FP, noise_multiplier=2.0)
    assert charge_release(site, settings, _request(noise=settings.noise_multiplier)).noise_multiplier == 2.0
    centre = charge_release(site, settings, _request(FEATURE_SUM, server_round=0, rate=1.0, steps=1, noise=4.0))
    assert centre.noise_multiplier == 4.0
    with pytest.raises(ValueError, match=r"the server picks this mechanism's noise, but the request carries none"):
        charge_release(site, round_settings(FP), _request(FEATURE_SUM, server_round=0, rate=1.0, steps=1))


def test_a_release_past_the_budget_is_refused_and_nothing_is_written(tmp_path):
    site = _site(tmp_path)
    settings = round_settings(FP, noise_multiplier=0.3, target_epsilon=1.0)
    with pytest.raises(PrivacyBudgetError, match=r"would reach [0-9.]+ > the run's target-epsilon 1 \(delta 1e-05\)"):
        charge_release(site, settings, _request(steps=100, noise=0.3))
    assert site.ledger.charges() == []


def test_the_non_private_baseline_is_charged_without_noise_so_epsilon_is_infinite(tmp_path):
    site = _site(tmp_path)
    release = charge_release(site, round_settings(FP, non_private=True), _request())
    assert (release.noise_multiplier, release.epsilon) == (0.0, math.inf)
    assert site.ledger.charges()[0].noise_multiplier == 0.0


def test_a_precondition_sees_the_charges_of_the_transaction_and_can_refuse(tmp_path):
    site = _site(tmp_path)
    settings = round_settings(FP, noise_multiplier=2.0)
    charge_release(site, settings, _request(noise=2.0))
    seen = []

    def refuse(charges):
        seen.extend(charges)
        raise PolicyRefusal("no more")

    with pytest.raises(PolicyRefusal, match="no more"):
        charge_release(site, settings, ReleaseRequest(DP_SGD, 2, 0.1, 10, "round 2", 2.0, precondition=refuse))
    assert len(seen) == 1 and len(site.ledger.charges()) == 1


def test_noise_is_seeded_only_in_simulation(tmp_path):
    settings = round_settings(FP)
    assert round_seed(_site(tmp_path), settings, 1) == round_seed(_site(tmp_path), settings, 1) is not None
    assert round_seed(_site(tmp_path, simulated=False), settings, 1) is None
    real = charge_release(_site(tmp_path / "real", simulated=False), round_settings(FP), _request(noise=1.0))
    assert real.seed is None


def test_the_ledger_file_is_read_once_per_release(tmp_path, monkeypatch):
    site = _site(tmp_path)
    reads = []
    original = PrivacyLedger._read

    def counting(self):
        reads.append(1)
        return original(self)

    monkeypatch.setattr(PrivacyLedger, "_read", counting)
    charge_release(site, round_settings(FP), _request())
    assert len(reads) == 1


@pytest.mark.parametrize("release", ["feature-sum", "sufficient-stats"])
def test_an_example_with_non_finite_features_cannot_make_a_released_sum_nan(tmp_path, release):
    """The membership oracle through NaN, for the one-shot releases: member and non-member look alike."""
    import numpy as np

    from fedtl.client.centering import release_feature_sum
    from fedtl.client.solvers.closed_form import release_sufficient_stats

    rng = np.random.default_rng(0)
    features = rng.normal(size=(40, 32)).astype(np.float32)
    labels = np.arange(40) % 10
    target = np.full((1, 32), np.inf, np.float32)  # what a tampered block could make of one example
    finite = {}
    for member in (True, False):
        x = np.concatenate([features, target]) if member else features
        y = np.concatenate([labels, [3]]) if member else labels
        ok = 0
        for run in range(20):
            site = _site(tmp_path / f"{member}-{run}")
            settings = round_settings(FP, run_id=f"r{run}", noise_multiplier=2.0)
            if release == "feature-sum":
                total, _, _ = release_feature_sum(site, settings, x, noise_multiplier=2.0)
                arrays = [total]
            else:
                stats = release_sufficient_stats(site, settings, x, y, center=None).stats
                arrays = list(stats.arrays().values())
            ok += all(np.all(np.isfinite(a)) for a in arrays)
        finite[member] = ok
    assert finite == {True: 20, False: 20}


def test_a_charge_whose_release_never_happened_pays_for_the_redone_release_once(tmp_path):
    """Killed after the write-ahead charge, before anything left: the redone round is not charged twice."""
    site = _site(tmp_path)
    settings = round_settings(FP, noise_multiplier=2.0)
    first = charge_release(site, settings, _request(noise=2.0))
    again = ReleaseRequest(DP_SGD, 1, 0.1, 10, "round 1 again", 2.0, unreleased_charge_pays=True)
    redone = charge_release(site, settings, again)
    assert len(site.ledger.charges()) == 1
    assert (redone.noise_multiplier, redone.epsilon, redone.seed) == (first.noise_multiplier, first.epsilon, first.seed)
    # Without the caller's word that nothing was released, the same round is a new release: charged again.
    charge_release(site, settings, _request(noise=2.0))
    assert len(site.ledger.charges()) == 2
