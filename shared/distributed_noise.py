"""Distributed DP noise that survives modular arithmetic: the Skellam mechanism, its shares and its RDP.

Under secure aggregation (shared/secure_sum.py) the server sees only the sum of the sites' integer vectors
modulo 2^64, so noise must be integer and must add up: a symmetric Skellam variable of variance mu,
Poisson(mu / 2) - Poisson(mu / 2), is a sum of independent Skellams whose variances add to mu (Poisson
variables add). Each of the sites adds a share of variance mu / t; as long as at least t honest sites' shares
are in the sum, it carries Skellam noise of variance >= mu, what one trusted curator would add (Agarwal,
Kairouz, Liu 2021, "The Skellam Mechanism for Differentially Private Federated Learning"; Kairouz, Liu,
Steinke 2021, "The Distributed Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation",
for the setting).

Accounting (Agarwal et al. 2021, Theorem 3.5): adding independent Skellam noise of variance mu to every
coordinate of an integer vector whose L2 / L1 sensitivities are D2 / D1 is (alpha, eps(alpha))-RDP for every
integer alpha > 1 with

    eps(alpha) = alpha D2^2 / (2 mu) + min( ((2 alpha - 1) D2^2 + 6 D1) / (4 mu^2),  3 D1 / (2 mu) ).

The first term is the Gaussian mechanism's; the second is the price of integers, negligible once D2 is large
(fine quantisation). With mu = (noise_multiplier x D2)^2 the first term is alpha / (2 noise_multiplier^2).
More noise only lowers every term, so a sum with more than t honest shares is at least as private.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import gammaln, logsumexp

from fedtl.shared.errors import ConfigError

# Integer orders only (the bound holds for integer alpha > 1): Opacus' integer default orders 2..63, and
# larger ones for the large noise of small epsilons.
SKELLAM_ORDERS: tuple[int, ...] = (*range(2, 64), 64, 80, 96, 112, 128, 160, 192, 256, 384, 512, 768, 1024)

# numpy's Poisson sampler works in float64: a mean above 2^48 would leave too few bits below the unit. The
# quantisation scale of a release is chosen so that no site's Poisson mean exceeds this (`integer_scale`).
POISSON_MAX_MEAN = 2.0**48


def skellam_rdp(order: int, *, noise_multiplier: float, l2_sensitivity: float, l1_sensitivity: float) -> float:
    """Return the RDP at integer `order` > 1 of one Skellam release of variance (noise_multiplier x l2)^2.

    Sensitivities are in the integer units the noise is added in (Agarwal et al. 2021, Theorem 3.5).
    """
    if order <= 1 or order != int(order):
        raise ConfigError(f"the Skellam RDP bound holds for integer orders > 1, got {order}")
    if noise_multiplier == 0:
        return math.inf
    d2, d1 = l2_sensitivity, l1_sensitivity
    mu = (noise_multiplier * d2) ** 2
    gaussian = order * d2**2 / (2 * mu)
    return gaussian + min(((2 * order - 1) * d2**2 + 6 * d1) / (4 * mu**2), 3 * d1 / (2 * mu))


def subsampled_rdp(orders: list[int], *, sample_rate: float, rdp: np.ndarray) -> np.ndarray:
    """Return the RDP at integer `orders` of a mechanism run on a Poisson sample at `sample_rate`.

    `rdp[l]` is the unsampled mechanism's RDP at order l for every l = 0 .. max(orders) (entries 0 and 1 unused).
    The general upper bound for any mechanism (Zhu & Wang 2019, "Poisson Subsampled Renyi Differential Privacy",
    Theorem 6), at integer alpha >= 2, q the sample rate:

        (1 / (alpha - 1)) log[ (1 - q)^(alpha - 1) (alpha q - q + 1) + C(alpha, 2) q^2 (1 - q)^(alpha - 2) e^eps(2)
                               + 3 sum_{l=3..alpha} C(alpha, l) q^l (1 - q)^(alpha - l) e^((l - 1) eps(l)) ],

    and never more than the unsampled mechanism's (subsampling cannot hurt). For the Gaussian its terms are Mironov
    et al. 2019's exact ones, but for the factor 3 (the price of not knowing the mechanism's privacy loss shape).
    """
    q = float(sample_rate)
    if not 0 < q <= 1:
        raise ConfigError(f"`sample-rate` must be in (0, 1], got {q}")
    out = np.array([rdp[a] for a in orders], dtype=np.float64)
    if q == 1:
        return out
    log_q, log_1q = math.log(q), math.log1p(-q)
    for i, a in enumerate(orders):
        ells = np.arange(2, a + 1)
        log_binom = gammaln(a + 1) - gammaln(ells + 1) - gammaln(a - ells + 1)
        terms = log_binom + ells * log_q + (a - ells) * log_1q + (ells - 1) * rdp[2 : a + 1]
        terms[1:] += math.log(3.0)  # l >= 3
        first = (a - 1) * log_1q + math.log1p((a - 1) * q)
        bound = logsumexp(np.concatenate([[first], terms])) / (a - 1)
        out[i] = min(out[i], bound)
    return out


def share_variance(*, noise_multiplier: float, l2_sensitivity: float, honest_sites: int) -> float:
    """Return the variance of the Skellam share one site adds: mu / t, mu = (noise_multiplier x l2)^2."""
    if honest_sites < 1:
        raise ConfigError(f"`secagg-honest-sites` must be >= 1 once resolved, got {honest_sites}")
    return (noise_multiplier * l2_sensitivity) ** 2 / honest_sites


def sample_skellam(rng: np.random.Generator, *, variance: float, size: int) -> np.ndarray:
    """Return `size` i.i.d. symmetric Skellam draws of `variance` (int64): Poisson(v / 2) - Poisson(v / 2).

    numpy's float Poisson sampler stands in for an exact one (as the Gaussian path's float noise does); the
    release's quantisation keeps its mean <= POISSON_MAX_MEAN, where float64 resolves every integer.
    """
    if variance == 0:
        return np.zeros(size, dtype=np.int64)
    if not (math.isfinite(variance) and 0 < variance / 2 <= POISSON_MAX_MEAN):
        raise ConfigError(
            f"Skellam variance {variance:.4g} is outside (0, {2 * POISSON_MAX_MEAN:.4g}]; the release's quantisation "
            "scale must be chosen with `integer_scale`"
        )
    lam = variance / 2
    return rng.poisson(lam, size=size).astype(np.int64) - rng.poisson(lam, size=size).astype(np.int64)


def integer_scale(
    *, noise_multiplier: float, l2_per_scale: float, degree: int, max_bits: int, min_bits: int = 6
) -> int:
    """Return the quantisation scale gamma = 2^b: the finest (b <= max_bits) keeping every Poisson mean in range.

    A release whose integer L2 sensitivity is `l2_per_scale` x gamma^`degree` gets per-site Poisson means up to
    (noise_multiplier x sensitivity)^2 / 2 (t = 1); gamma is the largest power of two keeping that <= POISSON_MAX_MEAN.
    It depends only on public values (the noise multiplier, the release's shape), never on data.

    Raises:
        ConfigError: even 2^min_bits is too fine for this noise (an absurdly large noise multiplier).
    """
    for bits in range(max_bits, min_bits - 1, -1):
        sensitivity = l2_per_scale * float(2**bits) ** degree
        if (noise_multiplier * sensitivity) ** 2 / 2 <= POISSON_MAX_MEAN:
            return 2**bits
    raise ConfigError(
        f"noise multiplier {noise_multiplier:g} is too large for a quantised release (scale 2^{min_bits} already "
        f"gives Poisson means above {POISSON_MAX_MEAN:.3g}); lower the noise or raise target-epsilon"
    )


def quantize_rows(rows: np.ndarray, scale: int) -> tuple[np.ndarray, float]:
    """Return rows (N, d) of L2 norm <= 1 as integers of L2 norm <= `scale`, and the factor c they were scaled by.

    Each row is scaled by scale x c with c = 1 - sqrt(d) / (2 scale), then rounded to the nearest integers: the
    rounding moves a row by at most sqrt(d) / 2 in L2, so its integer norm is at most scale x c + sqrt(d) / 2 =
    scale, for every row, deterministically (the sensitivity bound must hold for every example). Dequantise by
    dividing by scale x c: each coordinate is then within 1 / (2 scale c) of the row's.

    Raises:
        ConfigError: the scale is too coarse for d (c <= 1/2), or a row's norm exceeds 1.
    """
    rows = np.asarray(rows, dtype=np.float64)
    shrink = quantization_shrink(rows.shape[1], scale)
    norms = np.linalg.norm(rows, axis=1)
    if len(rows) and norms.max() > 1 + 1e-5:
        raise ConfigError(f"rows to quantise must have L2 norm <= 1, got {norms.max():.6f}")
    rows = rows / np.maximum(norms, 1.0)[:, None]  # float32 rounding can leave a unit row at 1 + 1e-7
    quantized = np.rint(rows * (scale * shrink)).astype(np.int64)  # (N, d)
    return quantized, shrink


def quantization_shrink(dim: int, scale: int) -> float:
    """Return c = 1 - sqrt(d) / (2 scale), the factor `quantize_rows` scales rows by so rounding keeps norms <= scale.

    Raises:
        ConfigError: c <= 1/2 (the scale is too coarse for d dims).
    """
    shrink = 1.0 - math.sqrt(dim) / (2 * scale)
    if shrink <= 0.5:
        raise ConfigError(f"quantisation scale {scale} is too coarse for {dim} dims; it needs scale >= sqrt(d)")
    return shrink
