"""The one-shot DP closed-form head: statistics, noise, sensitivity, solves, the site's charge, a whole run."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import round_settings
from opacus.accountants import RDPAccountant
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.linear_model import Ridge

from fedtl.client.ledger import PrivacyLedger
from fedtl.client.site import Site, resolve_site
from fedtl.client.solvers.closed_form import sufficient_stats_round
from fedtl.shared import constants as k
from fedtl.shared.backbones import backbone_state_dict, build_backbone, fingerprint_state_dict
from fedtl.shared.closed_form import (
    SENSITIVITY,
    SufficientStats,
    check_release,
    compute_stats,
    prepare_features,
    random_projection,
    release_stats,
    solve_head,
    solve_lda,
    solve_ridge,
    sum_stats,
)
from fedtl.shared.config import RunConfig
from fedtl.shared.errors import ConfigError, FederationError
from fedtl.shared.heads import build_head, load_head_arrays
from fedtl.shared.mechanisms import FEATURE_SUM, SUFFICIENT_STATS
from fedtl.shared.privacy import PrivacyStep, find_noise_multiplier
from fedtl.shared.protocol import SimulationSettings

C, D, RIDGE = 4, 12, 0.7


def _data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw features with a shared dominant direction (like backbone features) and class-dependent offsets."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, size=n)
    x = 3.0 + rng.normal(size=(n, D)) + np.eye(C, D)[labels] * 2.0
    return x, labels


def _exact(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, SufficientStats]:
    u = prepare_features(features)
    return u, compute_stats(u, labels, C)


def test_noiseless_ridge_equals_a_linear_solve_on_the_same_statistics():
    x, y = _data(300, 0)
    u, stats = _exact(x, y)
    weight, bias = solve_ridge(stats, ridge=RIDGE)
    # Oracle 1: the normal equations of [U 1] with the intercept unpenalised, solved directly.
    s, n = stats.class_sums.sum(axis=0), stats.class_counts.sum()
    system = np.block([[stats.gram + RIDGE * np.eye(D), s[:, None]], [s[None, :], np.array([[n]])]])
    rhs = np.vstack([stats.class_sums.T, stats.class_counts[None, :]])
    solution = np.linalg.solve(system, rhs)  # (D + 1, C)
    np.testing.assert_allclose(weight, solution[:D].T, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(bias, solution[D], rtol=1e-9, atol=1e-10)
    # Oracle 2: scikit-learn's ridge on the examples themselves, one-hot targets.
    ridge = Ridge(alpha=RIDGE, fit_intercept=True).fit(u, np.eye(C)[y])
    np.testing.assert_allclose(weight, ridge.coef_, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(bias, ridge.intercept_, rtol=1e-7, atol=1e-9)


class _ShiftedEmpiricalCovariance:
    """scikit-learn's covariance-estimator protocol: the empirical covariance plus shift * I."""

    def __init__(self, shift: float) -> None:
        self.shift = shift

    def fit(self, x: np.ndarray) -> "_ShiftedEmpiricalCovariance":
        self.covariance_ = np.cov(x, rowvar=False, bias=True) + self.shift * np.eye(x.shape[1])
        return self


def test_noiseless_lda_equals_scikit_learns_lda_with_the_same_regularised_covariance():
    x, y = _data(400, 1)
    u, stats = _exact(x, y)
    weight, bias = solve_lda(stats, ridge=RIDGE)
    # scikit-learn averages the class covariances with the class priors: sum_c pi_c (Cov_c + shift I)
    # = (S_w + RIDGE I) / N for shift = RIDGE / N, the covariance the solver documents.
    lda = LinearDiscriminantAnalysis(
        solver="lsqr", covariance_estimator=_ShiftedEmpiricalCovariance(RIDGE / len(y))
    ).fit(u, y)
    np.testing.assert_allclose(weight, lda.coef_, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(bias, lda.intercept_, rtol=1e-7, atol=1e-9)
    # Its softmax is LDA's posterior.
    logits = u @ weight.T + bias
    posterior = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(posterior / posterior.sum(1, keepdims=True), lda.predict_proba(u), atol=1e-8)


def test_two_sites_statistics_sum_to_the_statistics_of_the_pooled_data():
    (xa, ya), (xb, yb) = _data(120, 2), _data(90, 3)
    center = np.full(D, 0.2)
    projection = random_projection(D, 5, seed=7)
    parts = [
        compute_stats(prepare_features(x, center=center, projection=projection), y, C) for x, y in ((xa, ya), (xb, yb))
    ]
    pooled = compute_stats(
        prepare_features(np.vstack([xa, xb]), center=center, projection=projection), np.concatenate([ya, yb]), C
    )
    total = sum_stats(parts)
    for name, value in pooled.arrays().items():
        np.testing.assert_allclose(total.arrays()[name], value, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(total.class_counts, np.bincount(np.concatenate([ya, yb]), minlength=C))
    # The noise of independent releases adds in variance.
    noisy = sum_stats(
        [
            release_stats(p, noise_multiplier=z, rng=np.random.default_rng(i))
            for i, (p, z) in enumerate(zip(parts, (1.0, 2.0)))
        ]
    )
    assert noisy.noise_std == pytest.approx(SENSITIVITY * math.sqrt(1.0**2 + 2.0**2))


def test_the_released_noise_is_symmetric_with_the_documented_std():
    dim, classes, z = 150, 40, 1.3
    zero = SufficientStats(np.zeros((dim, dim)), np.zeros((classes, dim)), np.zeros(classes))
    noisy = release_stats(zero, noise_multiplier=z, rng=np.random.default_rng(0))
    std = z * math.sqrt(3.0)
    assert noisy.noise_std == pytest.approx(std)
    np.testing.assert_array_equal(noisy.gram, noisy.gram.T)  # mirrored, not drawn twice
    upper = noisy.gram[np.triu_indices(dim)]  # 11325 draws, the diagonal included once each
    diagonal = np.diag(noisy.gram)
    for draws in (upper, diagonal, noisy.class_sums.ravel()):
        # The sample std of n normal draws is within 4 / sqrt(2 n) of the true one with overwhelming probability.
        assert np.std(draws) == pytest.approx(std, rel=4 / math.sqrt(2 * draws.size))
        assert abs(np.mean(draws)) < 4 * std / math.sqrt(draws.size)
    assert np.count_nonzero(noisy.class_counts) == classes
    # Noise multiplier 0 is the labelled non-private release: the statistics themselves.
    assert release_stats(zero, noise_multiplier=0.0, rng=np.random.default_rng(0)) is zero


def _released_vector(stats: SufficientStats) -> np.ndarray:
    upper = stats.gram[np.triu_indices(stats.dim)]
    return np.concatenate([upper, stats.class_sums.ravel(), stats.class_counts])


def test_one_example_moves_the_released_vector_by_at_most_the_sensitivity():
    x, y = _data(50, 4)
    base = compute_stats(prepare_features(x), y, C)
    rng = np.random.default_rng(5)
    candidates = [rng.normal(size=D) * rng.uniform(0.01, 3.0) for _ in range(200)]
    candidates += [np.eye(D)[3] * 10.0, np.abs(rng.normal(size=D))]  # one-hot: the worst case, attains sqrt(3)
    moves = []
    for extra in candidates:
        label = int(rng.integers(0, C))
        plus = compute_stats(prepare_features(np.vstack([x, extra])), np.append(y, label), C)
        moves.append(np.linalg.norm(_released_vector(plus) - _released_vector(base)))
    assert max(moves) <= SENSITIVITY + 1e-9
    assert moves[-2] == pytest.approx(SENSITIVITY, rel=1e-9)


def test_clipping_after_the_projection_bounds_every_row_and_the_head_reproduces_the_solve():
    x, y = _data(200, 6)
    center = prepare_features(x).mean(axis=0)  # any centre: here the exact one
    projection = random_projection(D, 6, seed=1)
    u = prepare_features(x, center=center, projection=projection)
    assert np.all(np.linalg.norm(u, axis=1) <= 1 + 1e-12)
    stats = compute_stats(u, y, C)
    arrays = solve_head(stats, method="ridge", ridge=RIDGE, feature_dim=D, center=center, projection=projection)
    head = build_head("linear", D, C)
    load_head_arrays(head, arrays)
    weight, bias = solve_ridge(stats, ridge=RIDGE)
    with torch.no_grad():
        logits = head(torch.as_tensor(x, dtype=torch.float32)).numpy()
    unclipped = np.linalg.norm(prepare_features(x, center=center) @ projection.T, axis=1) <= 1
    assert unclipped.sum() > 20
    np.testing.assert_allclose(logits[unclipped], (u @ weight.T + bias)[unclipped], atol=1e-4)
    with pytest.raises(ConfigError, match=r"`projection-dim` 12 must be < the backbone's feature dimension 12"):
        random_projection(D, D, seed=0)
    np.testing.assert_array_equal(random_projection(D, 6, seed=1), projection)  # public: same draw everywhere


def test_the_server_refuses_malformed_or_implausible_releases():
    _, stats = _exact(*_data(60, 8))
    good = release_stats(stats, noise_multiplier=1.0, rng=np.random.default_rng(0)).arrays()
    ok = dict(dim=D, num_classes=C, num_examples=60.0, noise_multiplier=1.0)
    assert check_release(good, **ok) is None
    asymmetric = {**good, k.GRAM: good[k.GRAM] + np.triu(np.ones((D, D)), 1) * 1e-3}
    assert "`gram` is not symmetric" in check_release(asymmetric, **ok)
    assert "`class-sums` has shape (4, 11), expected (4, 12)" in check_release(
        {**good, k.CLASS_SUMS: good[k.CLASS_SUMS][:, 1:]}, **ok
    )
    inflated = {name: value * 50 for name, value in good.items()}
    assert "impossible for 60 clipped examples plus the noise" in check_release(inflated, **ok)
    assert "contains NaN or Inf" in check_release({**good, k.CLASS_COUNTS: np.full(C, np.nan)}, **ok)


def test_a_closed_form_run_needs_a_linear_head_and_no_rounds_of_clipping():
    with pytest.raises(ConfigError, match=r"needs head = 'linear', got 'mlp'; set head = 'linear' or head-solver"):
        RunConfig(head_solver="closed-form", head="mlp")
    with pytest.raises(ConfigError, match=r"needs client-dp = 'off', got 'server'"):
        RunConfig(head_solver="closed-form", client_dp="server")
    # The server checks the projection against the backbone before asking any site for anything.
    from fedtl.server.solvers.closed_form import ClosedFormSolver

    with pytest.raises(ConfigError, match=r"`projection-dim` 64 must be < the backbone's feature dimension 32"):
        ClosedFormSolver.configure(RunConfig(backbone="tiny", head_solver="closed-form", projection_dim=64))
    configured = ClosedFormSolver.configure(RunConfig(backbone="tiny", head_solver="closed-form", projection_dim=16))
    assert configured.num_rounds == 1


# --- the site's release -------------------------------------------------------------------------------


@pytest.fixture
def site(tmp_path, monkeypatch) -> Site:
    monkeypatch.setenv("FEDTL_SIMULATED_SITES", "1")
    sim = SimulationSettings(
        data="digits",
        partition="iid",
        seed=0,
        test_fraction=0.2,
        local_test_fraction=0.2,
        permuted_label_sites="",
        site_root=str(tmp_path / "state"),
        cache_root=str(tmp_path / "cache"),
    )
    site = resolve_site({k.PARTITION_ID: 0, k.NUM_PARTITIONS: 4}, sim)
    state = backbone_state_dict(build_backbone("tiny"))
    site.backbones.install("tiny", fingerprint_state_dict(state), state)
    return site


def _opacus_epsilon(steps: list[float], delta: float) -> float:
    """Opacus' RDP accountant after one Gaussian release (sample rate 1, one step) per noise multiplier."""
    accountant = RDPAccountant()
    for sigma in steps:
        accountant.step(noise_multiplier=sigma, sample_rate=1.0)
    return accountant.get_epsilon(delta=delta)


def test_the_epsilon_charged_for_one_release_is_the_accountants(site):
    fingerprint = site.backbones.fingerprints()[0]
    given = sufficient_stats_round(site, round_settings(fingerprint, noise_multiplier=2.0, projection_dim=8))
    (charge,) = site.ledger.charges()
    assert (charge.kind, charge.noise_multiplier, charge.sample_rate, charge.steps) == (
        SUFFICIENT_STATS.kind,
        2.0,
        1.0,
        1,
    )
    assert given.epsilon == pytest.approx(_opacus_epsilon([2.0], 1e-5), rel=1e-9)
    assert given.stats.dim == 8 and given.stats.noise_std == pytest.approx(2.0 * SENSITIVITY)

    # Derived noise: the smallest meeting target-epsilon after what the ledger already holds.
    settings = round_settings(fingerprint, run_id="run-b", target_epsilon=3.0)
    derived = sufficient_stats_round(site, settings)
    sigma = find_noise_multiplier(
        target_epsilon=3.0, target_delta=1e-5, sample_rate=1.0, steps=1, history=[PrivacyStep(2.0, 1.0, 1)]
    )
    assert derived.noise_multiplier == sigma
    spent = _opacus_epsilon([2.0, sigma], 1e-5)
    assert derived.epsilon == pytest.approx(spent, rel=1e-9)
    assert 2.97 <= spent <= 3.0 * (1 + 1e-6)
    assert len(site.ledger.charges()) == 2
    assert derived.stats.dim == 32  # no projection: the tiny backbone's features


def test_a_site_policy_refuses_too_little_noise_before_anything_is_charged(tmp_path):
    from fedtl.client.admin import init_policy
    from fedtl.client.policy import PolicyRefusal, load_policy
    from fedtl.client.site import site_from_policy

    path = init_policy(
        tmp_path / "site.toml", site_name="hospital-a", data="digits", backbones=["tiny"], label_names=[]
    )
    path.write_text(path.read_text().replace("min-noise-multiplier = 0.5", "min-noise-multiplier = 1.0"))
    site = site_from_policy(load_policy(path))
    state = backbone_state_dict(build_backbone("tiny"))
    fingerprint = fingerprint_state_dict(state)
    site.backbones.install("tiny", fingerprint, state)
    with pytest.raises(PolicyRefusal, match=r"noise-multiplier 0.5 < the policy's min-noise-multiplier 1"):
        sufficient_stats_round(site, round_settings(fingerprint, noise_multiplier=0.5))
    assert site.ledger.charges() == []
    # Epsilon 8 alone would allow noise ~0.65; the policy's minimum is used instead (spending less).
    settings = round_settings(fingerprint, target_epsilon=8.0)
    assert _opacus_epsilon([1.0], 1e-5) < 8.0
    release = sufficient_stats_round(site, settings)
    assert release.noise_multiplier == 1.0 and release.epsilon == pytest.approx(_opacus_epsilon([1.0], 1e-5))


# --- a whole run ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def closed_form_run(tmp_path_factory):
    from fedtl.simulations.inprocess import run_inprocess

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDTL_HOME", str(tmp_path_factory.mktemp("home")))
        cfg = RunConfig(
            backbone="tiny",
            data="digits",
            head_solver="closed-form",
            closed_form="lda",
            projection_dim=16,
            feature_centering=True,  # the run's feature-centre release first, as DP-SGD runs have it
            target_epsilon=8.0,
            federated_evaluation=False,
            out=str(tmp_path_factory.mktemp("runs")),
        )
        return cfg, run_inprocess(cfg, num_sites=3)


def test_a_closed_form_run_charges_each_site_once_and_exports_a_working_model(closed_form_run):
    from fedtl.server.model_file import load_model
    from fedtl.shared.data import load_dataset
    from fedtl.shared.features import extract_features
    from fedtl.shared.heads import predict_proba

    cfg, summary = closed_form_run
    run_dir = Path(summary["run-dir"])
    assert summary["num-rounds"] == 1 and json.loads((run_dir / "config.json").read_text())["config"]["num-rounds"] == 1
    assert sorted(summary["epsilon-per-site"]) == ["site-0", "site-1", "site-2"]
    for name, eps in summary["epsilon-per-site"].items():
        charges = PrivacyLedger(run_dir / "sites" / name / "privacy" / "ledger.jsonl").charges()
        # The feature-centre release (round 0), then exactly one release of the statistics (round 1).
        assert [(c.server_round, c.kind, c.sample_rate, c.steps) for c in charges] == [
            (0, FEATURE_SUM.kind, 1.0, 1),
            (1, SUFFICIENT_STATS.kind, 1.0, 1),
        ]
        expected = _opacus_epsilon([c.noise_multiplier for c in charges], cfg.target_delta)
        assert eps == pytest.approx(expected, rel=1e-9)
        assert cfg.target_epsilon * 0.99 <= eps <= cfg.target_epsilon * (1 + 1e-6)
    (line,) = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert line["round"] == 1 and line["epsilon-per-site"] == summary["epsilon-per-site"]

    # The model file is a plain linear head: predictions from it reproduce the server's central accuracy.
    model = load_model(summary["model"])
    assert model.head == "linear" and np.any(model.arrays["center"])
    test = load_dataset("digits", seed=cfg.seed, test_fraction=cfg.test_fraction).test
    feats = extract_features(build_backbone("tiny"), test.images, model.preprocessing, progress=False)
    accuracy = float(np.mean(predict_proba(model.build_head(), feats).argmax(1) == test.labels))
    assert accuracy == pytest.approx(summary["final"]["central-accuracy"])
    assert accuracy > summary["majority-rate"] + 0.2


def test_a_site_sending_a_tampered_release_is_left_out_and_the_others_are_solved(tmp_path, monkeypatch, caplog):
    import logging

    from flwr.app import Array
    from flwr.clientapp import ClientApp

    from fedtl.client.client_app import query
    from fedtl.simulations.inprocess import run_inprocess

    app = ClientApp()

    @app.query()
    def tampering(msg, context):
        reply = query(msg, context)
        stats = reply.content.array_records.get(k.ARRAYS)
        if context.node_config[k.PARTITION_ID] == 1 and stats is not None and k.GRAM in stats:
            gram = stats[k.GRAM].numpy().copy()
            gram[0, 1] += 1.0  # no longer the mirrored release the site's code makes
            stats[k.GRAM] = Array(gram)
        return reply

    monkeypatch.setenv("FEDTL_HOME", str(tmp_path / "home"))
    cfg = RunConfig(
        backbone="tiny",
        data="digits",
        head_solver="closed-form",
        feature_centering=False,
        federated_evaluation=False,
        out=str(tmp_path / "runs"),
    )
    with caplog.at_level(logging.WARNING):
        summary = run_inprocess(cfg, num_sites=3, client_app=app)
    assert "site site-1: no usable sufficient statistics, left out: `gram` is not symmetric" in caplog.text
    assert sorted(summary["epsilon-per-site"]) == ["site-0", "site-2"]
    assert Path(summary["model"]).is_file()
    with pytest.raises(
        FederationError, match=r"only 2 of 3 sites released usable sufficient statistics \(min-train-sites 3\)"
    ):
        run_inprocess(cfg.replace(min_train_sites=3, min_available_nodes=3), num_sites=3, client_app=app)
