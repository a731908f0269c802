"""One-shot DP closed-form heads: a site's noised sufficient statistics, and the server's ridge / LDA solve.

A site releases, once, its Gram matrix, per-class feature sums and class counts with Gaussian noise;
the server adds the sites' releases up and solves a linear head in closed form (no DP-SGD rounds). This
is the "Analyze Gauss" recipe (Dwork, Talwar, Thakurta, Zhang 2014, "Analyze Gauss: Optimal Bounds for
Privacy-Preserving Principal Component Analysis") applied to least squares as in Sheffet 2017
("Differentially Private Ordinary Least Squares") and, for the linear-model view of private empirical risk
minimisation, Chaudhuri, Monteleoni, Sarwate 2011 ("Differentially Private Empirical Risk Minimization").
Pure numpy: no Flower.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch.nn import functional as F

from fedtl.shared import constants as k
from fedtl.shared.errors import ConfigError, ReplyError

RIDGE = "ridge"
LDA = "lda"
METHODS = (RIDGE, LDA)

# L2 sensitivity of the whole released vector (Gram upper triangle, class sums, class counts) for
# add/remove-one neighbouring datasets; derived in `sensitivity`.
SENSITIVITY = math.sqrt(3.0)


@dataclass(frozen=True)
class SufficientStats:
    """Sufficient statistics of (clipped) features u (N, d) with labels y, possibly Gaussian-noised.

    `gram` = sum_i u_i u_i^T (d, d), symmetric; `class_sums[c]` = sum over class-c examples of u_i (C, d);
    `class_counts[c]` = number of class-c examples (C,). With noise every released entry (the Gram's upper
    triangle, the sums, the counts) carries independent N(0, noise_std^2) noise, mirrored below the diagonal.
    """

    gram: np.ndarray  # (d, d) float64
    class_sums: np.ndarray  # (C, d) float64
    class_counts: np.ndarray  # (C,) float64
    noise_std: float = 0.0  # std of the noise on every released entry; 0 = exact

    def __post_init__(self) -> None:
        d = self.gram.shape[0] if self.gram.ndim == 2 else -1
        if self.gram.shape != (d, d) or self.class_sums.ndim != 2 or self.class_sums.shape[1] != d:
            raise ReplyError(
                f"sufficient statistics have gram {self.gram.shape} and class sums {self.class_sums.shape}; "
                "expected (d, d) and (C, d)"
            )
        if self.class_counts.shape != (self.class_sums.shape[0],):
            raise ReplyError(
                f"class counts have shape {self.class_counts.shape}, expected ({self.class_sums.shape[0]},) "
                "(one per class of the class sums)"
            )
        if not (math.isfinite(self.noise_std) and self.noise_std >= 0):
            raise ReplyError(f"`noise_std` must be a finite number >= 0, got {self.noise_std}")

    @property
    def dim(self) -> int:
        """Return d, the feature dimension the statistics are over."""
        return int(self.gram.shape[0])

    @property
    def num_classes(self) -> int:
        """Return C, the number of classes."""
        return int(self.class_sums.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        """Return the three released arrays by name (what travels)."""
        return {k.GRAM: self.gram, k.CLASS_SUMS: self.class_sums, k.CLASS_COUNTS: self.class_counts}


def sensitivity() -> float:
    """Return the L2 sensitivity of the released vector (Gram upper triangle, class sums, class counts).

    Neighbouring datasets differ by adding or removing one example (u, y) with ||u||_2 <= 1 (`prepare_features`
    clips to that). The released vector changes by
      - Gram upper triangle incl. the diagonal: entries u_i u_j for i <= j, squared norm
        sum_{i<=j} (u_i u_j)^2 = (||u||_2^4 + ||u||_4^4) / 2 <= ||u||_2^4 <= 1, as ||u||_4^4 <= ||u||_2^4;
      - class sums: row y moves by u, squared norm ||u||_2^2 <= 1;
      - class counts: entry y moves by 1, squared norm 1.
    So the whole vector moves by at most sqrt(1 + 1 + 1) = sqrt(3) in L2. Adding N(0, (z * sqrt(3))^2) to every
    released entry is one Gaussian mechanism of noise multiplier z (Dwork et al. 2014, "Analyze Gauss", for
    the symmetric Gram noise); its RDP is alpha / (2 z^2), which Opacus' accountant gives for sample rate 1 and
    one step (Mironov 2017). A site's label is part of its record, hence the class sums and counts in the bound.
    """
    return SENSITIVITY


def check_projection_dim(feature_dim: int, projection_dim: int) -> None:
    """Refuse a projection that is negative or does not reduce the dimension.

    Raises:
        ConfigError: `projection-dim` < 0 or >= the backbone's feature dimension.
    """
    if projection_dim < 0:
        raise ConfigError(f"`projection-dim` must be >= 0, got {projection_dim}")
    if projection_dim >= feature_dim:
        raise ConfigError(
            f"`projection-dim` {projection_dim} must be < the backbone's feature dimension {feature_dim} "
            "(it projects down to shrink the Gram matrix's noise); use 0 for no projection"
        )


def random_projection(feature_dim: int, projection_dim: int, *, seed: int) -> np.ndarray | None:
    """Return the public projection matrix P (projection_dim, feature_dim), or None for projection_dim 0.

    Entries are i.i.d. N(0, 1 / projection_dim), drawn from the run seed alone: data-independent, so applying
    it costs no privacy, and the server draws the same matrix to fold it into the exported head. It keeps norms
    in expectation, E||P z||^2 = ||z||^2, and distances approximately (Johnson & Lindenstrauss 1984), but not
    exactly, which is why the clip after it is needed.
    numpy's Generator gives the same draws on every platform.
    """
    check_projection_dim(feature_dim, projection_dim)
    if projection_dim == 0:
        return None
    rng = np.random.default_rng([seed, feature_dim, projection_dim, 0x5EED])
    return rng.standard_normal((projection_dim, feature_dim)) / math.sqrt(projection_dim)


def prepare_features(
    features: np.ndarray, *, center: np.ndarray | None = None, projection: np.ndarray | None = None
) -> np.ndarray:
    """Return features (N, D) as the statistics see them (N, d): the head's input, projected, clipped to norm 1.

    The head's input is `Head.forward`'s: normalise, subtract the federation's feature centre (0 without one),
    normalise again, so every row has norm <= 1 and the exported head sees the same vectors. A random
    projection keeps norms only on average, so rows are clipped to norm <= 1 after it: the sensitivity bound
    (`sensitivity`) must hold for every possible example, not on average.
    """
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32)  # (N, D), computed as the head does
    c = torch.zeros(x.shape[1]) if center is None else torch.as_tensor(center, dtype=torch.float32)
    u = F.normalize(F.normalize(x, dim=1) - c, dim=1).double().numpy()  # (N, D), rows of norm <= 1
    if projection is not None:
        u = u @ projection.T  # (N, d)
    norms = np.linalg.norm(u, axis=1, keepdims=True)  # (N, 1)
    return u / np.maximum(norms, 1.0)


def compute_stats(features: np.ndarray, labels: np.ndarray, num_classes: int) -> SufficientStats:
    """Return the exact sufficient statistics of prepared features u (N, d) and labels (N,)."""
    u = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ConfigError(f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
    onehot = np.eye(num_classes, dtype=np.float64)[labels]  # (N, C)
    return SufficientStats(
        gram=u.T @ u,  # (d, d)
        class_sums=onehot.T @ u,  # (C, d)
        class_counts=onehot.sum(axis=0),  # (C,)
    )


def symmetric_noise(dim: int, std: float, rng: np.random.Generator) -> np.ndarray:
    """Return a symmetric (dim, dim) matrix whose upper triangle incl. the diagonal is i.i.d. N(0, std^2).

    The lower triangle mirrors the upper one, so the noised Gram matrix stays symmetric and each of the
    d (d + 1) / 2 released Gram entries carries exactly one draw (Dwork et al. 2014, "Analyze Gauss").
    """
    upper = np.triu(rng.normal(0.0, std, size=(dim, dim)))
    return upper + np.triu(upper, 1).T


def release_stats(stats: SufficientStats, *, noise_multiplier: float, rng: np.random.Generator) -> SufficientStats:
    """Return `stats` with Gaussian noise of std noise_multiplier * sqrt(3) on every released entry.

    One Gaussian mechanism of noise multiplier `noise_multiplier` on the whole vector (see `sensitivity`);
    noise_multiplier 0 returns the exact statistics (the non-private baseline).
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ConfigError(f"`noise-multiplier` must be a finite number >= 0, got {noise_multiplier}")
    if noise_multiplier == 0:
        return stats
    std = noise_multiplier * sensitivity()
    return SufficientStats(
        gram=stats.gram + symmetric_noise(stats.dim, std, rng),
        class_sums=stats.class_sums + rng.normal(0.0, std, size=stats.class_sums.shape),
        class_counts=stats.class_counts + rng.normal(0.0, std, size=stats.class_counts.shape),
        noise_std=math.sqrt(stats.noise_std**2 + std**2),
    )


def sum_stats(parts: Sequence[SufficientStats]) -> SufficientStats:
    """Return the statistics of the pooled data: the sum of the parts (their independent noise adds up)."""
    if not parts:
        raise ReplyError("no sufficient statistics to sum: no site released any")
    first = parts[0]
    for part in parts[1:]:
        if part.gram.shape != first.gram.shape or part.class_sums.shape != first.class_sums.shape:
            raise ReplyError(
                f"sufficient statistics of shapes {part.gram.shape}/{part.class_sums.shape} and "
                f"{first.gram.shape}/{first.class_sums.shape} cannot be summed; every site must use the same "
                "projection-dim and classes"
            )
    return SufficientStats(
        gram=np.sum([p.gram for p in parts], axis=0),
        class_sums=np.sum([p.class_sums for p in parts], axis=0),
        class_counts=np.sum([p.class_counts for p in parts], axis=0),
        noise_std=math.sqrt(sum(p.noise_std**2 for p in parts)),
    )


def project_psd(matrix: np.ndarray) -> np.ndarray:
    """Return the nearest (Frobenius) positive semidefinite matrix: eigenvalues below 0 set to 0 (Higham 1988).

    Higham 1988, "Computing a nearest symmetric positive semidefinite matrix". The noised Gram matrix (and the
    scatter matrices derived from it) can be indefinite; projecting onto the PSD cone is post-processing of the
    release, so it costs no privacy.
    """
    sym = (matrix + matrix.T) / 2
    values, vectors = np.linalg.eigh(sym)
    return (vectors * np.maximum(values, 0.0)) @ vectors.T


def noise_shift(stats: SufficientStats) -> float:
    """Return 2 * noise_std * sqrt(d): about the largest eigenvalue magnitude of the Gram matrix's noise.

    A symmetric d x d matrix of i.i.d. N(0, s^2) entries has its spectrum in [-2 s sqrt(d), 2 s sqrt(d)]
    as d grows (Wigner 1958, the semicircle law), so the noised Gram of "Analyze Gauss" (Dwork et al. 2014)
    is off by up to this much in every direction; used as extra ridge, it keeps the noised system positive
    definite with high probability and damps the directions the noise dominates. This shift is fedtl's
    choice (on the lab's validation splits it beat the plain ridge, see benchmarks/closed_form.py); it depends
    only on the public noise level and d, never on the data. 0 for exact statistics.
    """
    return 2.0 * stats.noise_std * math.sqrt(stats.dim)


def regularized(scatter: np.ndarray, stats: SufficientStats, ridge: float) -> np.ndarray:
    """Return the system matrix PSD(scatter) + (ridge + noise_shift) I of a noised solve.

    The explicit choice for the noised Gram: project it onto the PSD cone (`project_psd`), then add the
    user's ridge plus the noise-calibrated shift (`noise_shift`), so every eigenvalue is at least
    ridge > 0 and the directions the noise dominates are damped instead of amplified. Exact statistics get
    the plain ridge.
    """
    if not ridge > 0:
        raise ConfigError(f"`closed-form-ridge` must be > 0, got {ridge}")
    dim = scatter.shape[0]
    base = project_psd(scatter) if stats.noise_std > 0 else scatter
    return base + (ridge + noise_shift(stats)) * np.eye(dim)


def _counts(stats: SufficientStats) -> np.ndarray:
    """Return class counts clipped to >= 1 (noised counts can be small or negative)."""
    return np.maximum(stats.class_counts, 1.0)


def solve_ridge(stats: SufficientStats, *, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """Return (W (C, d), b (C,)) minimising ||Y - U W^T - 1 b^T||^2 + ridge ||W||^2 for one-hot targets Y.

    Ridge regression on the sufficient statistics (Sheffet 2017, "Differentially Private Ordinary Least
    Squares"; Chaudhuri et al. 2011 for private linear models): the unpenalised intercept b is handled by
    centring, G_c = G - s s^T / N with s = sum_c S_c and N = sum_c n_c, and U_c^T Y_c = S^T - s n^T / N, so
    W^T = (G_c + ridge I)^{-1} (S^T - s n^T / N) and b = (n - W s) / N. With noise the system matrix is
    `regularized` (PSD projection plus the noise shift).
    """
    counts = _counts(stats) if stats.noise_std > 0 else stats.class_counts
    total = float(counts.sum())
    s = stats.class_sums.sum(axis=0)  # (d,)
    centred_gram = stats.gram - np.outer(s, s) / total  # (d, d)
    cross = stats.class_sums.T - np.outer(s, counts) / total  # (d, C)
    weight = np.linalg.solve(regularized(centred_gram, stats, ridge), cross).T  # (C, d)
    bias = (counts - weight @ s) / total  # (C,)
    return weight, bias


def solve_lda(stats: SufficientStats, *, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """Return (W (C, d), b (C,)) of linear discriminant analysis with a shared, ridge-regularised covariance.

    Fisher 1936, the Gaussian shared-covariance classifier (Hastie, Tibshirani, Friedman, "The Elements of
    Statistical Learning", section 4.3). Class means mu_c = S_c / n_c, within-class scatter
    S_w = G - sum_c S_c S_c^T / n_c, covariance Sigma = (S_w + ridge I) / N, priors pi_c = n_c / N; the
    discriminant is linear in u:
    W_c = Sigma^{-1} mu_c, b_c = -mu_c^T Sigma^{-1} mu_c / 2 + log pi_c (its softmax is LDA's posterior).
    Noised counts are clipped to >= 1 before use; with noise S_w is `regularized` (PSD projection plus the
    noise shift). The same statistics as the private Gram release of Dwork et al. 2014 ("Analyze Gauss").
    """
    counts = _counts(stats)
    total = float(counts.sum())
    means = stats.class_sums / counts[:, None]  # (C, d)
    within = stats.gram - (stats.class_sums.T / counts) @ stats.class_sums  # (d, d)
    covariance = regularized(within, stats, ridge) / total
    weight = np.linalg.solve(covariance, means.T).T  # (C, d)
    bias = -0.5 * np.sum(weight * means, axis=1) + np.log(counts / total)
    return weight, bias


def solve_head(
    stats: SufficientStats,
    *,
    method: str,
    ridge: float,
    feature_dim: int,
    center: np.ndarray | None = None,
    projection: np.ndarray | None = None,
) -> "OrderedDict[str, np.ndarray]":
    """Return the tensors of a "linear" `Head` that computes the solved model on raw backbone features.

    The head normalises x, subtracts `center` and normalises again: the vectors the statistics saw before
    projection (`prepare_features`). The model W u + b with u = P z becomes W P z + b, so the projection folds
    into the head's weight (C, D). A projected row longer than 1 was clipped for the statistics but is not
    clipped at prediction: the head then sees the same direction scaled by its norm (random projections keep
    norms near 1, so few rows are affected and only by a few percent).

    Raises:
        ConfigError: unknown method, or the statistics' dimension does not match the projection.
    """
    if method not in METHODS:
        raise ConfigError(f"`closed-form` must be one of {', '.join(METHODS)}; got {method!r}")
    expected_dim = feature_dim if projection is None else projection.shape[0]
    if stats.dim != expected_dim:
        raise ConfigError(
            f"sufficient statistics are over {stats.dim} dims, expected {expected_dim} "
            f"({'projection-dim' if projection is not None else 'the feature dimension'})"
        )
    weight, bias = (solve_ridge if method == RIDGE else solve_lda)(stats, ridge=ridge)
    if projection is not None:
        weight = weight @ projection  # (C, d) @ (d, D) -> (C, D)
    centre = np.zeros(feature_dim) if center is None else np.asarray(center)
    return OrderedDict(
        [
            ("layers.0.weight", weight.astype(np.float32)),
            ("layers.0.bias", bias.astype(np.float32)),
            ("center", centre.astype(np.float32)),
        ]
    )


def check_release(
    arrays: dict[str, np.ndarray], *, dim: int, num_classes: int, num_examples: float, noise_multiplier: float
) -> str | None:
    """Return what is wrong with a site's released statistics, or None.

    Names, shapes, finiteness and symmetry are checked exactly. The true vector (Gram upper triangle, sums,
    counts) of n examples of norm <= 1 has L2 norm <= sqrt(3) n (each part <= n, see `sensitivity`); the noise
    adds about std * sqrt(m) over m entries, so a norm beyond sqrt(3) n + std (sqrt(m) + 10) is implausible
    (the noise norm exceeds its mean by 10 std with probability far below 1e-20).
    """
    expected = {k.GRAM: (dim, dim), k.CLASS_SUMS: (num_classes, dim), k.CLASS_COUNTS: (num_classes,)}
    if set(arrays) != set(expected):
        return f"released arrays {sorted(arrays)} differ from the expected {sorted(expected)}"
    for name, shape in expected.items():
        if tuple(arrays[name].shape) != shape:
            return f"`{name}` has shape {tuple(arrays[name].shape)}, expected {shape}"
        if not np.all(np.isfinite(arrays[name])):
            return f"`{name}` contains NaN or Inf"
    gram = np.asarray(arrays[k.GRAM], dtype=np.float64)
    if not np.array_equal(gram, gram.T):
        return "`gram` is not symmetric (a site mirrors its noised upper triangle)"
    if not (math.isfinite(num_examples) and num_examples > 0):
        return f"`num-examples` must be a count > 0, got {num_examples!r}"
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        return f"`noise-multiplier` must be a finite number >= 0, got {noise_multiplier!r}"
    upper = gram[np.triu_indices(dim)]
    released = [upper, np.ravel(arrays[k.CLASS_SUMS]), np.ravel(arrays[k.CLASS_COUNTS])]
    entries = sum(v.size for v in released)
    norm = math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in released))
    std = noise_multiplier * SENSITIVITY
    limit = SENSITIVITY * num_examples + std * (math.sqrt(entries) + 10.0) + 1e-6
    if norm > limit:
        return (
            f"released vector norm {norm:.4g} > {limit:.4g}, impossible for {num_examples:g} clipped examples "
            "plus the noise"
        )
    return None
