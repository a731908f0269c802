"""Secure DP-SGD (head-solver "secure-dp-sgd"): distributed DP-FedSGD of the head through the secure sum.

Oracles: Zhu & Wang 2019's subsampling bound and Agarwal et al. 2021's Skellam RDP written out here with Python's
math; Opacus' RDP accountant; plain full-batch gradient descent on the pooled data (shared/dp_heads'
clipped_gradient_sum, a separate implementation).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from builders import crash_after_masking, round_settings
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp
from safetensors.numpy import load_file

from fedtl.client.ledger import PrivacyLedger
from fedtl.client.secagg import SessionPlan
from fedtl.client.secure_releases import _noised
from fedtl.client.site import Site
from fedtl.server.solvers.secure_dp_sgd import gradient_sensitivities, plan_secure_dp_sgd
from fedtl.shared import dp_heads
from fedtl.shared.config import RunConfig
from fedtl.shared.distributed_noise import SKELLAM_ORDERS, subsampled_rdp
from fedtl.shared.dp_heads import clipped_gradient_sum
from fedtl.shared.errors import ConfigError
from fedtl.shared.mechanisms import SECURE_HEAD_GRADIENT
from fedtl.shared.privacy import PrivacyStep, compute_epsilon
from fedtl.shared.public_basis import centre_features, project_features
from fedtl.shared.secure_dp_sgd import clipped_gradient_rows
from fedtl.shared.secure_sum import IntegerRelease
from fedtl.simulations.inprocess import run_inprocess

FP = "0" * 64
DELTA = 1e-5


def skellam(a, sigma, d2, d1):
    """Agarwal et al. 2021, Theorem 3.5."""
    mu = (sigma * d2) ** 2
    return a * d2**2 / (2 * mu) + min(((2 * a - 1) * d2**2 + 6 * d1) / (4 * mu**2), 3 * d1 / (2 * mu))


def zhu_wang(a, q, eps, factor=3.0):
    """Zhu & Wang 2019, Theorem 6, term by term in Python floats; `eps(l)` is the unsampled RDP."""
    if q == 1:
        return eps(a)
    total = (1 - q) ** (a - 1) * (a * q - q + 1) + math.comb(a, 2) * q**2 * (1 - q) ** (a - 2) * math.exp(eps(2))
    total += factor * sum(
        math.comb(a, ell) * q**ell * (1 - q) ** (a - ell) * math.exp((ell - 1) * eps(ell)) for ell in range(3, a + 1)
    )
    return min(math.log(total) / (a - 1), eps(a))


def oracle_epsilon(charges, delta=DELTA, orders=range(2, 41)):
    """Each charge: Zhu-Wang over Skellam at its sample rate, composed over charges, converted (Balle et al.)."""
    best = math.inf
    for a in orders:
        rdp = sum(
            zhu_wang(
                a, c.sample_rate, lambda ell, c=c: skellam(ell, c.noise_multiplier, c.l2_sensitivity, c.l1_sensitivity)
            )
            for c in charges
        )
        best = min(best, rdp + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1))
    return best


def test_the_subsampling_bound_is_opacus_exact_gaussian_rdp_but_for_zhu_and_wangs_factor_3():
    sigma, q = 1.3, 0.05
    orders = [2, 3, 5, 8, 16, 32]
    full = np.array([a / (2 * sigma**2) for a in range(0, 33)])  # the Gaussian mechanism's RDP
    ours = subsampled_rdp(orders, sample_rate=q, rdp=full)
    exact = compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders)  # Mironov et al. 2019
    gaussian = lambda ell: ell / (2 * sigma**2)  # noqa: E731
    assert np.allclose(exact, [zhu_wang(a, q, gaussian, factor=1.0) for a in orders], rtol=1e-9)
    assert np.allclose(ours, [zhu_wang(a, q, gaussian) for a in orders], rtol=1e-9)
    assert np.all(ours >= exact - 1e-12) and ours[0] == pytest.approx(exact[0])  # order 2 has no l >= 3 terms
    assert np.array_equal(subsampled_rdp(orders, sample_rate=1.0, rdp=full), full[orders])


def test_at_full_batches_fine_quantisation_costs_what_opacus_charges_the_gaussian_steps():
    # Secure DP-SGD's charge: T Skellam steps of L2 sensitivity gamma = 2^16, L1 sqrt(d) gamma, at q = 1.
    d2, d1 = gradient_sensitivities(10 * 65)(2.0)
    skellam_eps = compute_epsilon([PrivacyStep(20.0, 1.0, 50, l2_sensitivity=d2, l1_sensitivity=d1)], delta=DELTA)
    acc = RDPAccountant()
    acc.history = [(20.0, 1.0, 50)]
    opacus = acc.get_epsilon(delta=DELTA, alphas=list(SKELLAM_ORDERS))
    assert skellam_eps == pytest.approx(opacus, rel=1e-3) and skellam_eps >= opacus


@pytest.mark.parametrize("rate", [1.0, 0.25])
def test_a_step_is_charged_the_sampled_skellam_mechanism_under_t(tmp_path, rate):
    site = Site(name="site-0", state_dir=tmp_path / "state", cache_dir=tmp_path / "cache", data="")
    settings = round_settings(FP, secure_aggregation=True, secagg_honest_sites=3, target_epsilon=8.0)
    plan = SessionPlan("ab", "run-a", 1, 5, 3, 3, "head-gradient")
    zeros = lambda: IntegerRelease(np.zeros(650, dtype=np.int64), 2.0**16, 2.0**16 * math.sqrt(650), 2**16, 0.9)  # noqa: E731
    for step in (1, 2):
        out = _noised(site, settings, plan, SECURE_HEAD_GRADIENT, step, 3.0, zeros, 100, sample_rate=rate)
    charges = site.ledger.charges()
    assert [(c.kind, c.server_round, c.sample_rate, c.honest_sites, c.num_sites) for c in charges] == [
        ("secagg-head-gradient", s, rate, 3, 5) for s in (1, 2)
    ]
    assert out.release.epsilon == pytest.approx(oracle_epsilon(charges), rel=1e-9)
    if rate < 1:  # sampling amplifies: less than the same steps on every example
        full = [PrivacyStep(3.0, 1.0, 2, l2_sensitivity=2.0**16, l1_sensitivity=2.0**16 * math.sqrt(650))]
        assert out.release.epsilon < compute_epsilon(full, delta=DELTA)


def test_a_sites_rows_are_the_clipped_gradients_over_the_clip_norm():
    rng = np.random.default_rng(0)
    u = rng.normal(size=(40, 6))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    y, w, b = rng.integers(0, 3, 40), rng.normal(size=(3, 6)), rng.normal(size=3)
    rows = clipped_gradient_rows(u, y, w, b, max_grad_norm=0.5)
    assert np.linalg.norm(rows, axis=1).max() <= 1 + 1e-12
    gw, gb = clipped_gradient_sum(u, y, w, b, max_grad_norm=0.5)
    assert np.allclose(rows.sum(axis=0) * 0.5, np.concatenate([gw.ravel(), gb]))


def test_the_plan_uses_public_inputs_and_distrust_costs_noise():
    cfg = RunConfig(target_epsilon=1.0, target_delta=DELTA, num_rounds=10)
    common = dict(feature_dim=1280, num_classes=10, project=True)
    trusting = plan_secure_dp_sgd(cfg, [280] * 5, honest_sites=5, **common)
    wary = plan_secure_dp_sgd(cfg, [280] * 5, honest_sites=1, **common)
    assert trusting.steps == 50 and trusting.sample_rate == 1.0
    assert trusting.epsilon <= 1.0 * (1 + 1e-9) and trusting.epsilon > 0.95
    assert wary.mean_noise == pytest.approx(trusting.mean_noise * math.sqrt(5))  # n / t curators' variance
    assert wary.projection_dim <= trusting.projection_dim and wary.learning_rate <= trusting.learning_rate
    with pytest.raises(ConfigError, match=r"`secagg-honest-sites` must be in \[1, 5\]"):
        plan_secure_dp_sgd(cfg, [280] * 5, honest_sites=6, **common)


def test_the_plan_releases_the_k_dim_centre_by_the_auto_rule_and_spends_it_within_the_budget():
    from fedtl.server.secure_releases import centre_sensitivities, skellam_step

    cfg = RunConfig(target_epsilon=1.0, target_delta=DELTA, num_rounds=10)
    common = dict(feature_dim=1280, num_classes=10, project=True)
    plan = plan_secure_dp_sgd(cfg, [280] * 5, honest_sites=5, **common)
    one = dp_heads.find_noise_multiplier(target_epsilon=1.0, target_delta=DELTA, sample_rate=1.0, steps=1)
    # The auto plan's public rule: noise one / sqrt(CENTER_SHARE), released when its expected noise norm in the
    # k-dim pooled mean is at most MAX_CENTER_NOISE_NORM (here 12.8 x sqrt(256) / 1400 = 0.15).
    assert plan.center_noise_multiplier == pytest.approx(one / math.sqrt(dp_heads.CENTER_SHARE))
    assert plan.center_noise_multiplier * math.sqrt(plan.projection_dim) / 1400 <= dp_heads.MAX_CENTER_NOISE_NORM
    centre = skellam_step(plan.center_noise_multiplier, centre_sensitivities(plan.projection_dim))
    step = PrivacyStep(
        plan.noise_multiplier, 1.0, 1, *gradient_sensitivities(10 * plan.projection_dim)(plan.noise_multiplier)
    )
    assert plan.epsilon == pytest.approx(oracle_epsilon([centre] + [step] * plan.steps), rel=1e-6)  # one a charge
    assert 0.95 < plan.epsilon <= 1.0 * (1 + 1e-9)
    # 5 sites of 20 examples: the centre's noise norm would be far above the rule's bound, so none is released.
    small = plan_secure_dp_sgd(cfg, [20] * 5, honest_sites=5, **common)
    assert small.center_noise_multiplier is None
    lone = PrivacyStep(small.noise_multiplier, 1.0, 1, *gradient_sensitivities(160)(small.noise_multiplier))
    assert small.epsilon == pytest.approx(oracle_epsilon([lone] * 50), rel=1e-6)


def test_secure_dp_sgd_refuses_what_one_server_side_head_cannot_do():
    from fedtl.server.solvers.secure_dp_sgd import SecureDpSgdSolver

    with pytest.raises(ConfigError, match='head = "mlp"'):
        SecureDpSgdSolver.configure(RunConfig(head_solver="secure-dp-sgd", head="mlp"))
    assert SecureDpSgdSolver.configure(RunConfig(head_solver="secure-dp-sgd")).secure_aggregation


SMALL = {"backbone": "tiny", "image-size": 32, "head-solver": "secure-dp-sgd", "federated-evaluation": False}


def _run(tmp_path, name, sites, client_app=None, **keys):
    cfg = RunConfig.from_mapping({**SMALL, "out": str(tmp_path), "num-rounds": 2, **keys})
    extra = {} if client_app is None else {"client_app": client_app}
    return run_inprocess(cfg, num_sites=sites, run_dir=tmp_path / name, **extra)


def _pooled_gradient_descent(summary, skip=()):
    """Full-batch GD with per-example clipping on the pooled training data of the run's sites (the oracle)."""
    from fedtl.simulations import baselines as bl

    run = Path(summary["run-dir"])
    cfg = RunConfig.from_mapping({k: v for k, v in json.loads((run / "config.json").read_text())["config"].items()})
    plan = json.loads((run / "config.json").read_text())["head-plan"]
    lab = bl.load_lab_federation(cfg, len(summary["epsilon-per-site"]) + len(skip))
    sites = [s for s in lab.sites if s.name not in skip]
    model = load_file(summary["model"])
    x = np.concatenate([s.train_features for s in sites])
    y = np.concatenate([s.train_labels for s in sites])
    u = centre_features(project_features(x, model["projection"]), model["center"])
    w, b = np.zeros_like(model["layers.0.weight"], dtype=np.float64), np.zeros(len(model["layers.0.bias"]))
    for _ in range(plan["steps"]):
        # a projected head's bias is held (shared/heads.py): the oracle clips and steps the weights only
        gw, gb = clipped_gradient_sum(u, y, w, b, max_grad_norm=plan["max-grad-norm"], fit_bias=False)
        w, b = w - plan["learning-rate"] * gw / len(y), b - plan["learning-rate"] * gb / len(y)
    return model, w, b


@pytest.fixture
def moderate_steps(monkeypatch):
    """Cap lr x steps x clip at 1000 (the default cap is 3000) for the exactness tests below.

    Without noise the plan takes the cap. A site rounds every example's clipped gradient to integers at the public
    scale (shared/distributed_noise.quantize_rows), so the product's gradients differ from the float oracle's by that
    rounding, and the learning rate multiplies the difference (240 at the default cap and clip 0.25). These tests
    check the sum, not the schedule: at 1000 it stays within their tolerance.
    """
    monkeypatch.setattr(dp_heads, "MAX_LR_STEPS", 1000.0)


def test_without_noise_it_is_plain_full_batch_gradient_descent_on_the_pooled_data(tmp_path, moderate_steps):
    summary = _run(tmp_path, "exact", 3, **{"non-private": True})
    model, w, b = _pooled_gradient_descent(summary)
    # The centre is the secure sum of the sites' projected features over their count: the pooled mean, to the
    # quantisation's rounding.
    from fedtl.simulations import baselines as bl

    run = Path(summary["run-dir"])
    cfg = RunConfig.from_mapping(json.loads((run / "config.json").read_text())["config"])
    pooled = np.concatenate([s.train_features for s in bl.load_lab_federation(cfg, 3).sites])
    assert np.allclose(model["center"], project_features(pooled, model["projection"]).mean(axis=0), atol=1e-4)
    assert np.allclose(model["layers.0.weight"], w, atol=2e-4) and np.allclose(model["layers.0.bias"], b, atol=2e-4)
    assert np.abs(w).max() > 0.1 and np.all(model["layers.0.bias"] == 0.0)  # the weights moved, the bias is held


def test_sites_lost_after_masking_leave_the_survivors_exact_sum(tmp_path, moderate_steps):
    summary = _run(tmp_path, "drop", 6, crash_after_masking, **{"non-private": True, "secagg-honest-sites": 5})
    trust = summary["secure-aggregation"]
    assert (trust["sites"], trust["sites-in-sum"], trust["threshold"]) == (6, 5, 4)
    assert set(trust["dropped"]) == {"site-4", "site-5"}
    model, w, b = _pooled_gradient_descent(summary, skip=("site-5",))  # site-4's gradients are in every sum
    assert np.allclose(model["layers.0.weight"], w, atol=2e-4) and np.allclose(model["layers.0.bias"], b, atol=2e-4)


def _ledgers(summary):
    root = Path(summary["run-dir"]) / "sites"
    return {p.parents[1].name: PrivacyLedger(p).charges() for p in sorted(root.glob("*/privacy/ledger.jsonl"))}


def test_fedtl_simulate_with_secure_dp_sgd_charges_each_site_the_accountants_epsilon(tmp_path, monkeypatch):
    from fedtl.cli.main import main

    monkeypatch.setenv("FEDTL_HOME", str(tmp_path / "home"))
    argv = ["simulate", "--executor", "inprocess", "--backbone", "tiny", "--sites", "3", "--rounds", "2"]
    argv += ["--set", "head-solver=secure-dp-sgd", "--set", "target-epsilon=3.0", "--set", "secagg-honest-sites=2"]
    argv += ["--set", "federated-evaluation=false", "--set", "image-size=32", "--out", str(tmp_path)]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0
    (summary_path,) = tmp_path.glob("*/summary.json")
    summary = json.loads(summary_path.read_text())
    ledgers = _ledgers(summary)
    assert sorted(ledgers) == ["site-0", "site-1", "site-2"]
    plan = summary["head-plan"]
    for name, charges in ledgers.items():
        # The k-dim centre's secure sum (the plan releases one here), then the 50 secure steps.
        assert [c.kind for c in charges] == ["secagg-feature-sum"] + ["secagg-head-gradient"] * 50
        assert charges[0].noise_multiplier == plan["center-noise-multiplier"] is not None
        assert {(c.honest_sites, c.num_sites, c.sample_rate) for c in charges} == {(2, 3, 1.0)}
        assert summary["epsilon-per-site"][name] == pytest.approx(oracle_epsilon(charges), rel=1e-6)
        assert 2.9 < summary["epsilon-per-site"][name] <= 3.0 * (1 + 1e-6)
    assert summary["trust-assumption"].startswith("each site's epsilon holds if at least 2 of the 3 sites")
    assert summary["secure-aggregation"]["epsilon-if-alone"] > summary["epsilon-max"]
    assert summary["final"]["central-accuracy"] > 0.2  # ten classes


@pytest.mark.parametrize(
    ("projection", "error"),
    [
        (np.ones((32, 32), dtype=np.float32), r"shape \(32, 32\); expected \(k, 32\) with 1 <= k < 32"),
        (np.ones((4, 16), dtype=np.float32), r"shape \(4, 16\); expected \(k, 32\)"),
        (np.full((4, 32), np.nan, dtype=np.float32), "holds NaN or Inf values"),
    ],
)
def test_a_site_refuses_a_malformed_projection_for_its_centre_before_paying(tmp_path, monkeypatch, projection, error):
    from fedtl.client.secure_releases import FEATURE_SUM, secure_release
    from fedtl.server.setup import federation_label_names, load_server_backbone, load_server_data
    from fedtl.server.solvers.auto import resolve_feature_block
    from fedtl.shared.errors import ReplyError
    from fedtl.shared.protocol import SimulationSettings
    from fedtl.simulations.federation import lab_settings, lab_sites, simulated_sites

    monkeypatch.setenv("FEDTL_HOME", str(tmp_path / "home"))
    cfg = resolve_feature_block(RunConfig.from_mapping({**SMALL, "out": str(tmp_path)}))
    backbone = load_server_backbone(cfg)
    settings, _ = lab_settings(cfg, backbone, federation_label_names(cfg, load_server_data(cfg)))
    simulation = SimulationSettings.for_run(cfg, run_dir=tmp_path)  # this site charges its ledger: a folder of its own
    with simulated_sites():
        site = next(lab_sites(2, simulation, backbone))
        plan = SessionPlan("ab", settings.run_id, 1, 2, 2, 2, FEATURE_SUM)
        with pytest.raises(ReplyError, match=error):
            secure_release(site, settings, plan, noise_multiplier=3.0, center=None, arrays={"projection": projection})
        assert site.ledger.charges() == []  # refused before anything was charged or computed
        good = np.eye(4, 32, dtype=np.float32)  # a well-formed basis is released: 4 entries, charged once
        out = secure_release(site, settings, plan, noise_multiplier=3.0, center=None, arrays={"projection": good})
        assert len(out.values) == 4 and [c.kind for c in site.ledger.charges()] == ["secagg-feature-sum"]


def test_auto_under_secure_aggregation_trains_by_secure_dp_fedsgd(tmp_path):
    from fedtl.server.solvers import SecureDpSgdSolver, solver_for

    assert isinstance(solver_for(RunConfig(secure_aggregation=True)), SecureDpSgdSolver)
    assert not isinstance(solver_for(RunConfig()), SecureDpSgdSolver)
    keys = {**SMALL, "head-solver": "auto", "secure-aggregation": True, "target-epsilon": 3.0}
    summary = _run(tmp_path, "auto-secure", 3, **keys)
    assert summary["head-plan"]["method"] == "secure-dp-sgd"
    for charges in _ledgers(summary).values():
        assert {c.kind for c in charges} == {"secagg-feature-sum", "secagg-head-gradient"}
        assert sum(c.kind == "secagg-head-gradient" for c in charges) == summary["head-plan"]["steps"]
    assert summary["epsilon-max"] <= 3.0 * (1 + 1e-9)
