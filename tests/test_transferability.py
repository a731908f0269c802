"""Transferability estimators (shared/transferability.py) against direct computations and known answers."""

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.stats import multivariate_normal
from sklearn.covariance import ledoit_wolf

from fedtl.client.transferability import hscore, ledoit_wolf_covariance, leep_score, logme_score
from fedtl.shared.errors import DataError


def _separable_and_random(n: int = 90, dim: int = 12, classes: int = 3, seed: int = 0):
    """Labels, features whose first `classes` dims carry the class (linearly separable), and pure-noise features."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    separable = 0.3 * rng.normal(size=(n, dim))
    separable[np.arange(n), labels] += 3.0
    return labels, separable, rng.normal(size=(n, dim))


def _gaussian_log_density(x: np.ndarray, cov: np.ndarray) -> float:
    """log N(x; 0, cov) through a Cholesky factor."""
    chol = np.linalg.cholesky(cov)
    z = np.linalg.solve(chol, x)
    return float(-0.5 * (z @ z) - np.sum(np.log(np.diag(chol))) - 0.5 * len(x) * np.log(2 * np.pi))


def _direct_logme(features: np.ndarray, labels: np.ndarray) -> float:
    """Slow oracle: per class, maximise log N(y_c; 0, F F^T / alpha + I / beta) over (alpha, beta) numerically."""
    n = len(labels)
    gram = features @ features.T
    evidences = []
    for c in np.unique(labels):
        target = (labels == c).astype(float)

        def negative_log_evidence(log_params):
            alpha, beta = np.exp(log_params)
            return -_gaussian_log_density(target, gram / alpha + np.eye(n) / beta)  # y_c's marginal likelihood

        starts = ([0.0, 0.0], [3.0, 1.0], [-3.0, 2.0])
        options = {"xatol": 1e-10, "fatol": 1e-12, "maxiter": 5000}
        best = min(
            (minimize(negative_log_evidence, x0, method="Nelder-Mead", options=options) for x0 in starts),
            key=lambda r: r.fun,
        )
        evidences.append(-best.fun / n)
    return float(np.mean(evidences))


@pytest.mark.parametrize(("n", "dim"), [(40, 5), (30, 60)])
def test_logme_equals_the_directly_maximised_evidence(n, dim):
    # (30, 60): more dimensions than examples, where the reference code's fixed-point variant adds
    # (D - k)/2 log(alpha); the marginal likelihood itself depends on F only through F F^T.
    labels, separable, noise = _separable_and_random(n, dim, seed=n)
    for features in (separable, noise):
        assert logme_score(features, labels) == pytest.approx(_direct_logme(features, labels), abs=1e-7)


def test_every_estimator_scores_separable_features_above_random_ones():
    labels, separable, noise = _separable_and_random()
    assert logme_score(separable, labels) > logme_score(noise, labels) + 0.5
    assert hscore(separable, labels) > 5 * hscore(noise, labels)
    assert hscore(separable, labels, shrinkage=0.0) > 5 * hscore(noise, labels, shrinkage=0.0)
    # Shuffled labels on the separable features are as good as random features.
    shuffled = np.random.default_rng(1).permutation(labels)
    assert logme_score(separable, labels) > logme_score(separable, shuffled) + 0.5
    rng = np.random.default_rng(2)
    # LEEP: a source classifier whose class follows the label (with some spill) vs one that ignores it.
    informative = np.full((len(labels), 5), 0.05)
    informative[np.arange(len(labels)), labels] = 0.8
    uninformative = rng.dirichlet(np.ones(5), size=len(labels))
    assert leep_score(informative, labels) > leep_score(uninformative, labels) + 0.5


def test_logme_is_invariant_to_rotations_example_order_and_class_names():
    labels, separable, _ = _separable_and_random()
    score = logme_score(separable, labels)
    rotation, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(12, 12)))
    # The evidence depends on F only through F F^T, which an orthogonal map of the features keeps.
    assert logme_score(separable @ rotation, labels) == pytest.approx(score, abs=1e-9)
    order = np.random.default_rng(4).permutation(len(labels))
    assert logme_score(separable[order], labels[order]) == pytest.approx(score, abs=1e-9)
    assert logme_score(separable, (labels + 1) % 3) == pytest.approx(score, abs=1e-12)
    # A class the site does not hold is skipped: labels {0, 2, 5} score as {0, 1, 2}.
    assert logme_score(separable, np.array([0, 2, 5])[labels]) == pytest.approx(score, abs=1e-12)


def test_hscore_invariances_and_its_known_maximum():
    labels, separable, _ = _separable_and_random()
    rng = np.random.default_rng(5)
    rotation, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    # Ledoit-Wolf's target mu I is rotation-invariant, and so is the shrunk H-score.
    assert hscore(separable @ rotation, labels) == pytest.approx(hscore(separable, labels), rel=1e-9)
    # Without shrinkage (Bao et al.) any invertible linear map and shift leaves it unchanged.
    mixing = rng.normal(size=(12, 12)) + 3 * np.eye(12)
    plain = hscore(separable, labels, shrinkage=0.0)
    assert hscore(separable @ mixing + 7.0, labels, shrinkage=0.0) == pytest.approx(plain, rel=1e-7)
    assert hscore(separable, (labels + 2) % 3) == pytest.approx(hscore(separable, labels), rel=1e-12)
    # Features that are the labels themselves: cov(E[f|y]) = cov(f), so H = rank = classes - 1.
    onehot = np.eye(3)[labels]
    assert hscore(onehot, labels, shrinkage=0.0) == pytest.approx(2.0, abs=1e-9)


def test_ledoit_wolf_matches_scikit_learn():
    for n, dim in ((50, 8), (20, 40)):
        features = np.random.default_rng(n).normal(size=(n, dim)) * np.linspace(0.5, 3.0, dim)
        ours, shrinkage = ledoit_wolf_covariance(features)
        theirs = ledoit_wolf(features)[0]
        np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12)
        assert 0.0 < shrinkage < 1.0


def test_leep_matches_a_loop_over_the_definition_and_its_known_values():
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 4, 60)
    probs = rng.dirichlet(np.ones(7), size=60)
    joint = np.zeros((4, 7))
    for y, theta in zip(labels, probs):
        joint[y] += theta / len(labels)
    conditional = joint / joint.sum(axis=0)
    expected = np.mean([np.log(sum(conditional[y, z] * theta[z] for z in range(7))) for y, theta in zip(labels, probs)])
    assert leep_score(probs, labels) == pytest.approx(expected, abs=1e-12)
    assert leep_score(probs[:, ::-1], labels) == pytest.approx(expected, abs=1e-12)  # source class order is moot
    # A source class that determines the label: LEEP reaches its maximum 0.
    assert leep_score(np.eye(7)[labels + 2], labels) == pytest.approx(0.0, abs=1e-12)
    # An uninformative (uniform) source: LEEP = sum_c p_c log p_c, minus the labels' entropy.
    prior = np.bincount(labels) / len(labels)
    uniform = np.full((60, 7), 1 / 7)
    assert leep_score(uniform, labels) == pytest.approx(float(np.sum(prior * np.log(prior))), abs=1e-12)


def test_bad_inputs_name_the_field_and_the_fix():
    labels, separable, _ = _separable_and_random()
    with pytest.raises(DataError, match=r"logme_score: `labels` must have shape \(90,\) .*got \(89,\)"):
        logme_score(separable, labels[:-1])
    with pytest.raises(DataError, match=r"hscore: `labels` must be class indices .*minimum -1; map class names"):
        hscore(separable, labels - 1)
    with pytest.raises(DataError, match=r"`features` must be a 2-D array \(N, D\) with N >= 2 .*got shape \(90,\)"):
        logme_score(separable[:, 0], labels)
    nan = separable.copy()
    nan[3, 4] = np.nan
    with pytest.raises(DataError, match=r"`features` must be finite numbers"):
        logme_score(nan, labels)
    with pytest.raises(ValueError, match=r"`shrinkage` must be 'ledoit-wolf' or a number in \[0, 1\], got 1.5"):
        hscore(separable, labels, shrinkage=1.5)
    with pytest.raises(DataError, match=r"`source_probs` rows must be probabilities .*apply softmax to the logits"):
        leep_score(separable, labels)


def test_the_oracle_density_is_the_gaussian_one():
    labels, separable, _ = _separable_and_random(12, 4)
    target = (labels == 0).astype(float)
    cov = separable @ separable.T / 2.0 + np.eye(12) / 3.0
    expected = multivariate_normal.logpdf(target, np.zeros(12), cov)
    assert _gaussian_log_density(target, cov) == pytest.approx(expected, abs=1e-10)
