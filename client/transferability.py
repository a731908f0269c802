"""Transferability estimators: how well a frozen backbone's features suit a labelled task, before any training.

Pure numpy (no torch, no Flower): sites compute them on their cached features, and the maths is tested
alone. Every estimator returns one float, larger = the features are predicted to transfer better. They are
scores for *ranking* backbones on one task, not accuracies, and they are NOT differentially private.
"""

from __future__ import annotations

import math

import numpy as np

from fedtl.shared.errors import DataError

LEDOIT_WOLF = "ledoit-wolf"
_LOG_2PI = math.log(2.0 * math.pi)


def _check_inputs(features: np.ndarray, labels: np.ndarray, *, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (features as float64 (N, D), labels as int64 (N,)) after checking shapes, values and agreement."""
    f = np.asarray(features)
    y = np.asarray(labels)
    if f.ndim != 2 or f.shape[0] < 2 or f.shape[1] < 1:
        raise DataError(f"{what}: `features` must be a 2-D array (N, D) with N >= 2 and D >= 1, got shape {f.shape}")
    if not np.issubdtype(f.dtype, np.number) or not np.all(np.isfinite(f)):
        raise DataError(f"{what}: `features` must be finite numbers, got dtype {f.dtype} with NaN/Inf or non-numbers")
    if y.shape != (f.shape[0],):
        raise DataError(f"{what}: `labels` must have shape ({f.shape[0]},) like the features' rows, got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise DataError(
            f"{what}: `labels` must be class indices (integers >= 0), got dtype {y.dtype} with minimum {y.min()}; "
            "map class names to 0..C-1 first"
        )
    return f.astype(np.float64), y.astype(np.int64)


def logme_score(features: np.ndarray, labels: np.ndarray, *, max_iterations: int = 10_000, tol: float = 1e-7) -> float:
    """Return LogME: the per-example log marginal likelihood (evidence) of a Bayesian linear model on the features.

    You, Liu, Wang & Long 2021, "LogME: Practical Assessment of Pre-trained Models for Transfer Learning"
    (ICML 2021), Algorithm 1. For every class c, the one-hot target y_c = 1[labels == c] is modelled as
    y_c = F w + e with prior w ~ N(0, I / alpha) and noise e ~ N(0, I / beta); alpha and beta maximise the
    evidence log p(y_c | F, alpha, beta) through MacKay's fixed point (gamma = sum_i beta s_i / (alpha + beta s_i),
    alpha = gamma / |m|^2, beta = (N - gamma) / |F m - y_c|^2), and the score is the mean over classes of the
    maximised evidence divided by N.

    Numerics: one thin SVD F = U diag(sqrt(s)) V^T serves every class and iteration (O(C min(N, D)) per step,
    all classes at once); the evidence is computed from the rank-k spectrum exactly, also when D > N (the
    marginal likelihood N(0, F F^T / alpha + I / beta) depends on F only through F F^T, so the D - k null
    directions cancel; the reference code's fixed-point variant keeps a spurious (D - k)/2 log(alpha) there).
    The iteration runs until alpha / beta changes by less than `tol` (relative; the reference code stops at
    1e-3 or 11 steps, which is far from converged when N < D); the evidence is then evaluated with beta profiled
    out (beta = N / y^T C_t^{-1} y, C_t = F F^T / t + I, t = alpha / beta) and compared with the limits
    t -> infinity (w = 0) and, when F F^T has full rank N, t -> 0 (noise-free fit), so a maximum on the
    boundary is found too.

    Classes absent from `labels` are skipped (their all-zero target has unbounded evidence), so a site is scored
    on the classes it holds.

    Raises:
        DataError: malformed features or labels.
    """
    f, y = _check_inputs(features, labels, what="logme_score")
    n = f.shape[0]
    u, singular, _ = np.linalg.svd(f, full_matrices=False)  # u (N, r), r = min(N, D)
    s = singular**2  # eigenvalues of F F^T (and F^T F)
    rank = int(np.sum(s > s.max() * max(f.shape) * np.finfo(np.float64).eps)) if s.max() > 0 else 0
    u, s = u[:, :rank], s[:rank]
    targets = (y[None, :] == np.unique(y)[:, None]).astype(np.float64)  # (C, N) one-hot rows of present classes
    x2 = (targets @ u) ** 2  # (C, k): each target's energy along each singular direction
    residual = np.maximum(targets.sum(axis=1) - x2.sum(axis=1), 0.0)  # (C,) energy outside F's column space
    t = _fixed_point(x2, residual, s, n, max_iterations=max_iterations, tol=tol)
    evidences = [_max_evidence(t[c], x2[c], residual[c], s, n) for c in range(len(targets))]
    return float(np.mean(evidences))


def _fixed_point(
    x2: np.ndarray, residual: np.ndarray, s: np.ndarray, n: int, *, max_iterations: int, tol: float
) -> np.ndarray:
    """Return t = alpha / beta per class (C,) from MacKay's fixed point; inf where it leaves for w = 0."""
    t = np.ones(len(x2))  # alpha = beta = 1, the reference implementation's start
    if s.size == 0:
        return np.full(len(x2), np.inf)
    active = x2.sum(axis=1) > 0
    t[~active] = np.inf  # the target is orthogonal to every feature direction: w = 0 is best
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for _ in range(max_iterations):
            if not active.any():
                break
            ta = t[active, None]  # (A, 1)
            shrink = s / (s + ta)  # (A, k)
            gamma = shrink.sum(axis=1)  # effective number of parameters
            m2 = np.sum(shrink * x2[active] / (s + ta), axis=1)  # |m|^2, m the posterior mean of w
            res2 = np.sum(x2[active] * (1.0 - shrink) ** 2, axis=1) + residual[active]  # |F m - y|^2
            t_new = (gamma / m2) * res2 / (n - gamma)  # alpha / beta
            bad = ~np.isfinite(t_new) | (t_new <= 0)
            # Far outside the spectrum the evidence is flat: the limits t -> inf, t -> 0 (taken exactly later) hold.
            boundary = (t_new > 1e12 * s.max()) | (t_new < 1e-12 * s.min())
            done = bad | boundary | (np.abs(t_new - ta[:, 0]) <= tol * ta[:, 0])
            idx = np.flatnonzero(active)
            t[idx[~bad]] = t_new[~bad]
            active[idx[done]] = False
    return t


def _profiled_evidence(t: float, x2: np.ndarray, residual: float, s: np.ndarray, n: int) -> float:
    """Return max over beta of log p(y | alpha = t beta, beta) / N; t = inf is the w = 0 model."""
    if math.isinf(t):
        q, logdet = float(x2.sum()) + residual, 0.0
    else:
        q = float(np.sum(x2 * t / (t + s))) + residual  # y^T C_t^{-1} y, C_t = F F^T / t + I
        logdet = float(np.sum(np.log1p(s / t)))
    # Gaussian N(0, C_t / beta) with beta = N / q: -N/2 log 2pi + N/2 log(N / q) - 1/2 log|C_t| - N/2.
    return (-0.5 * n * _LOG_2PI + 0.5 * n * math.log(n / q) - 0.5 * logdet - 0.5 * n) / n


def _max_evidence(t: float, x2: np.ndarray, residual: float, s: np.ndarray, n: int) -> float:
    """Return the larger of the evidence at the fixed point's t and at the boundaries t -> inf and t -> 0."""
    candidates = [_profiled_evidence(t, x2, residual, s, n), _profiled_evidence(math.inf, x2, residual, s, n)]
    if s.size == n and residual <= 1e-12 * (float(x2.sum()) + residual):
        # F F^T has full rank and spans y: the noise-free limit t -> 0, in closed form.
        q_over_t = float(np.sum(x2 / s))
        candidates.append(
            (-0.5 * n * _LOG_2PI + 0.5 * n * math.log(n / q_over_t) - 0.5 * float(np.sum(np.log(s))) - 0.5 * n) / n
        )
    return max(candidates)


def ledoit_wolf_covariance(features: np.ndarray) -> tuple[np.ndarray, float]:
    """Return (the Ledoit-Wolf shrunk covariance (D, D) of the rows of `features`, the shrinkage in [0, 1]).

    Ledoit & Wolf 2004, "A well-conditioned estimator for large-dimensional covariance matrices" (J. Multivariate
    Analysis 88): (1 - delta) S + delta mu I, S the maximum-likelihood covariance (divides by N), mu = tr(S) / D,
    delta = min(b^2, d^2) / d^2 with d^2 = |S - mu I|_F^2 and b^2 = (sum_i |x_i|^4 / N - |S|_F^2) / N.
    """
    x = np.asarray(features, dtype=np.float64)
    x = x - x.mean(axis=0)
    n, dim = x.shape
    cov = x.T @ x / n  # (D, D)
    mu = float(np.trace(cov)) / dim
    d2 = float(np.sum(cov**2)) - 2.0 * mu * float(np.trace(cov)) + dim * mu**2  # |S - mu I|_F^2
    b2 = (float(np.sum(np.sum(x**2, axis=1) ** 2)) / n - float(np.sum(cov**2))) / n
    shrinkage = 0.0 if d2 <= 0 else min(max(b2, 0.0), d2) / d2
    out = (1.0 - shrinkage) * cov
    out[np.diag_indices(dim)] += shrinkage * mu
    return out, shrinkage


def hscore(features: np.ndarray, labels: np.ndarray, *, shrinkage: str | float = LEDOIT_WOLF) -> float:
    """Return the H-score tr(cov(f)^-1 cov(E[f | y])): how much of the features' spread separates the classes.

    Bao, Li, Huang, Wang, Zheng, Tong & Zhang 2019, "An Information-Theoretic Approach to Transferability in
    Task Transfer Learning" (ICIP 2019). With few examples per dimension (a site's N ~ D) the sample covariance
    is singular and the plain H-score is unstable; by default cov(f) is shrunk (Ledoit-Wolf), the regularised
    H-score of Ibrahim, Ponomareva & Mazumder 2022, "Newer is not always better: Rethinking transferability
    metrics, their peculiarities, stability and performance" (ECML PKDD 2022).

    Caveat: even uninformative features score above 0. Averaged over random relabellings (class sizes kept) the
    score is (C - 1) tr(cov^-1 S) / (N - 1), S the sample covariance: (C - 1) D / (N - 1) without shrinkage, so
    with N ~ D it is dominated by D / N, and shrinkage, which scales cov down along the large-variance directions,
    inflates it further on well-separated features. Compare backbones of equal feature width on the same data.

    Args:
        features: (N, D) features.
        labels: (N,) class indices.
        shrinkage: "ledoit-wolf", or a fixed delta in [0, 1] toward mu I; 0 is Bao et al.'s original (pseudo-inverse).

    Raises:
        DataError: malformed features or labels.
        ValueError: `shrinkage` outside [0, 1] or an unknown name.
    """
    f, y = _check_inputs(features, labels, what="hscore")
    f = f - f.mean(axis=0)
    n, dim = f.shape
    if shrinkage == LEDOIT_WOLF:
        cov, _ = ledoit_wolf_covariance(f)
    elif isinstance(shrinkage, (int, float)) and not isinstance(shrinkage, bool) and 0.0 <= shrinkage <= 1.0:
        sample = f.T @ f / n
        cov = (1.0 - shrinkage) * sample
        cov[np.diag_indices(dim)] += shrinkage * float(np.trace(sample)) / dim
    else:
        raise ValueError(f"`shrinkage` must be {LEDOIT_WOLF!r} or a number in [0, 1], got {shrinkage!r}")
    classes, counts = np.unique(y, return_counts=True)
    # Class means of the centred features, scaled by sqrt(p_c): cov(E[f | y]) = M^T M.
    means = np.stack([f[y == c].mean(axis=0) for c in classes]) * np.sqrt(counts / n)[:, None]  # (C, D)
    if shrinkage == 0:
        solved = np.linalg.pinv(cov, rcond=1e-15, hermitian=True) @ means.T  # Bao et al.'s pseudo-inverse
    else:
        solved = np.linalg.solve(cov, means.T)  # (D, C); shrunk covariance is positive definite
    return float(np.sum(means.T * solved))


def leep_score(source_probs: np.ndarray, labels: np.ndarray) -> float:
    """Return LEEP: the mean log-likelihood of the labels under the source classifier's empirical predictor.

    Nguyen, Hassner, Seeger & Archambeau 2020, "LEEP: A New Measure to Evaluate Transferability of Learned
    Representations" (ICML 2020): with theta(x) the source model's class probabilities (e.g. ImageNet's 1000),
    P(y, z) = mean_i theta(x_i)_z 1[y_i = y], P(y | z) = P(y, z) / P(z), and
    LEEP = mean_i log sum_z P(y_i | z) theta(x_i)_z. Its maximum 0 means the source classes determine the labels.

    Raises:
        DataError: probabilities that are not (N, Z) rows of non-negative numbers summing to 1, or bad labels.
    """
    theta, y = _check_inputs(source_probs, labels, what="leep_score")
    sums = theta.sum(axis=1)
    if theta.min() < 0 or not np.allclose(sums, 1.0, atol=1e-3):
        raise DataError(
            "leep_score: `source_probs` rows must be probabilities (>= 0, summing to 1); got minimum "
            f"{theta.min():.3g} and row sums in [{sums.min():.4g}, {sums.max():.4g}]; apply softmax to the logits"
        )
    theta = theta / sums[:, None]
    num_classes = int(y.max()) + 1
    onehot = np.eye(num_classes)[y]  # (N, C)
    joint = onehot.T @ theta / len(y)  # (C, Z): P(y, z)
    marginal = joint.sum(axis=0)  # (Z,): P(z)
    conditional = np.divide(joint, marginal, out=np.zeros_like(joint), where=marginal > 0)  # P(y | z)
    predicted = np.einsum("nz,nz->n", theta, conditional[y])  # (N,): EEP of each example's own label
    return float(np.mean(np.log(predicted)))
