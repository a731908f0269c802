"""The arithmetic of secure aggregation: integer releases, masks in the ring Z_(2^64), and their exact sums.

Secure aggregation (Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine
Learning"; Bell et al. 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", SecAgg+)
lets the server learn the sum of the sites' vectors and nothing else: each site adds to its integer vector
a private self-mask and, for every other site, a pairwise mask that the other site subtracts; the masks
cancel in the sum, and the server removes the self-masks (and a dropped site's pairwise masks) from secret
shares the sites hand over (client/secagg.py, server/secagg.py).

Everything here is exact integer arithmetic modulo 2^64 on numpy uint64 (which wraps on overflow): the sum
of masked vectors equals the sum of the sites' integer vectors exactly, and its centred lift (int64) is that
sum whenever it lies in [-2^63, 2^63), which the releases' bounds guarantee. Masks are expanded from 32-byte
secrets with ChaCha20 (the `cryptography` package), a vetted stream cipher: not Flower's `pseudo_rand_gen`,
whose 32-bit seed (the XOR of the secret's words into numpy's Mersenne Twister) could be searched in hours.

The releases: a site's float statistics of unit-norm rows become integers (`quantize_rows`, deterministic
rounding with a norm bound), so the integer vector has exact L2 / L1 sensitivities for the Skellam noise
(shared/distributed_noise.py). Pure numpy and `cryptography`: no Flower here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedtl.shared.closed_form import SufficientStats
from fedtl.shared.distributed_noise import integer_scale, quantize_rows
from fedtl.shared.errors import ConfigError, ReplyError

RING_BITS = 64  # vectors are summed modulo 2^64 (numpy uint64 arithmetic)
EXACT_FLOAT = 2.0**52  # integers below this are exact in float64, so BLAS can compute integer Gram matrices
_MASK_INFO = b"fedtl secure aggregation mask v1"  # HKDF domain separation of mask keys


def shamir_threshold(num_sites: int, honest_sites: int) -> int:
    """Return k, the shares that rebuild a site's secrets, for n sites with at least t honest: n - ceil(t/2) + 1.

    Each honest site answers one unmask request, handing for every other site either a share of its self-mask
    seed (it sent a masked vector) or of its mask key (it dropped), never both. A server that tells some sites
    that site u dropped and others that it did not, helped by the c = n - t sites that may collude with it
    (they hand both kinds), gets both secrets of u only if two disjoint sets of honest answers each reach
    k - c; with k = c + floor(t / 2) + 1 they cannot, as 2 (k - c) > t (Bonawitz et al. 2017, section 4 and
    Bell et al. 2020 rely on the same counting). Also k > c, so the colluders alone never hold enough shares.
    All t = n sites honest gives a strict majority, floor(n / 2) + 1; every dropout beyond n - k stops the sum.
    """
    if num_sites < 2:
        raise ConfigError(f"secure aggregation needs at least 2 sites, got {num_sites}")
    if not 1 <= honest_sites <= num_sites:
        raise ConfigError(
            f"`secagg-honest-sites` must be in [1, {num_sites}] (the sites of the sum), got {honest_sites}"
        )
    return max(2, num_sites - math.ceil(honest_sites / 2) + 1)


def private_scalar(private_key_pem: bytes) -> bytes:
    """Return the private scalar of an EC P-384 key (48 bytes): what is secret-shared, not the 300-byte PEM.

    Sharing the scalar instead of Flower's PEM encoding cuts the Shamir work and the shares fivefold; the
    server rebuilds the key with `private_key_from_scalar`.
    """
    key = serialization.load_pem_private_key(private_key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
        raise ReplyError("a secure-aggregation mask key must be an EC P-384 private key")
    return key.private_numbers().private_value.to_bytes(48, "big")


def private_key_from_scalar(scalar: bytes) -> ec.EllipticCurvePrivateKey:
    """Return the EC P-384 private key of a 48-byte scalar (`private_scalar`)."""
    return ec.derive_private_key(int.from_bytes(scalar, "big"), ec.SECP384R1())


def to_ring(values: np.ndarray) -> np.ndarray:
    """Return int64 values as elements of Z_(2^64) (uint64, two's complement: no copy of the bits' meaning)."""
    return np.ascontiguousarray(values, dtype=np.int64).view(np.uint64)


def from_ring(values: np.ndarray) -> np.ndarray:
    """Return ring elements as their centred lift in [-2^63, 2^63) (int64)."""
    return np.ascontiguousarray(values, dtype=np.uint64).view(np.int64)


def expand_mask(secret: bytes, length: int) -> np.ndarray:
    """Return `length` uniform elements of Z_(2^64) expanded from a high-entropy `secret` (ChaCha20 keystream).

    The key is HKDF-SHA256(secret) under fedtl's label; every secret is fresh per secure sum (new key pairs and
    seeds each time), so the all-zero nonce is never reused with one key. 2^64 is a power of two, so the
    keystream's 64-bit words are uniform in the ring without rejection.
    """
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_MASK_INFO).derive(secret)
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(8 * length))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64, copy=False)


def mask_vector(values: np.ndarray, *, self_secret: bytes, pairwise: list[tuple[bytes, int]]) -> np.ndarray:
    """Return int64 `values` masked in Z_(2^64): + the self-mask, + or - each pairwise mask (sign +1 / -1)."""
    masked = to_ring(values).copy()
    masked += expand_mask(self_secret, len(masked))
    for secret, sign in pairwise:
        if sign > 0:
            masked += expand_mask(secret, len(masked))
        else:
            masked -= expand_mask(secret, len(masked))
    return masked


def pairwise_sign(own_index: int, other_index: int) -> int:
    """Return the sign of the pairwise mask of `own_index` with `other_index`: +1 above it, -1 below (they cancel)."""
    return 1 if own_index > other_index else -1


def sum_ring(vectors: list[np.ndarray]) -> np.ndarray:
    """Return the sum of ring vectors (uint64, modulo 2^64)."""
    if not vectors:
        raise ReplyError("no masked vectors to sum")
    total = np.zeros(len(vectors[0]), dtype=np.uint64)
    for vector in vectors:
        if vector.shape != total.shape or vector.dtype != np.uint64:
            raise ReplyError(f"masked vector of shape {vector.shape} / {vector.dtype}, expected {total.shape} / uint64")
        total += vector
    return total


# --- integer releases ----------------------------------------------------------------------------

FEATURE_SUM_BITS = 16  # finest quantisation of the feature-centre sum: 2^16 levels per unit
STATS_BITS = 10  # of the closed form's statistics (the Gram is quadratic in it: 2^20 per unit)


def feature_sum_scale(noise_multiplier: float) -> int:
    """Return the public quantisation scale of the feature-sum release at this noise (shared/distributed_noise)."""
    return integer_scale(noise_multiplier=noise_multiplier, l2_per_scale=1.0, degree=1, max_bits=FEATURE_SUM_BITS)


def stats_scale(noise_multiplier: float) -> int:
    """Return the public quantisation scale of the sufficient-statistics release at this noise."""
    return integer_scale(noise_multiplier=noise_multiplier, l2_per_scale=math.sqrt(3.0), degree=2, max_bits=STATS_BITS)


@dataclass(frozen=True)
class IntegerRelease:
    """A release as integers: the vector, its L2 / L1 sensitivities in integer units, and how to read it back."""

    values: np.ndarray  # (m,) int64
    l2_sensitivity: float
    l1_sensitivity: float
    scale: int  # gamma: integer units per unit of the quantised rows
    shrink: float  # c of `quantize_rows`: rows were scaled by scale x c


def feature_sum_release(rows: np.ndarray, scale: int) -> IntegerRelease:
    """Return the integer sum of unit-norm rows (N, D) quantised at `scale`.

    One example's integer row has L2 norm <= scale and L1 norm <= sqrt(D) x scale, so the sum's sensitivities
    are those. Read back with `read_feature_sum`: each coordinate of the sum is within N / (2 scale c) of the
    float sum.
    """
    quantized, shrink = quantize_rows(rows, scale)
    _check_magnitude(len(rows) * float(scale), what="feature sum")
    return IntegerRelease(quantized.sum(axis=0), *feature_sum_sensitivities(rows.shape[1], scale), scale, shrink)


def feature_sum_sensitivities(dim: int, scale: int) -> tuple[float, float]:
    """Return the (L2, L1) sensitivities of `feature_sum_release` over `dim` dims at `scale`: (gamma, sqrt(D) gamma)."""
    return float(scale), math.sqrt(dim) * scale


def read_feature_sum(total: np.ndarray, release_scale: int, shrink: float) -> np.ndarray:
    """Return the float sum of rows from the integer sum of their quantised rows (float64)."""
    return np.asarray(total, dtype=np.float64) / (release_scale * shrink)


def stats_release(rows: np.ndarray, labels: np.ndarray, num_classes: int, scale: int) -> IntegerRelease:
    """Return the closed form's sufficient statistics of prepared rows u (N, d) as one integer vector.

    With q the quantised rows (||q|| <= gamma = `scale`): the Gram's upper triangle (incl. the diagonal) of
    sum q q^T, gamma x the class sums of q, gamma^2 x the class counts, so every part has L2 sensitivity
    gamma^2 (as the float release's parts have 1; shared/closed_form.sensitivity): together sqrt(3) gamma^2.
    L1: (||q||_1^2 + ||q||_2^2) / 2 + gamma ||q||_1 + gamma^2 <= gamma^2 ((d + 1) / 2 + sqrt(d) + 1), by
    ||q||_1 <= sqrt(d) ||q||_2. The Gram is computed in float64 by BLAS, exact because every partial sum is an
    integer below 2^52 (checked).
    """
    quantized, shrink = quantize_rows(rows, scale)
    count, dim = quantized.shape
    _check_magnitude(count * float(scale) ** 2, what="Gram matrix")
    q = quantized.astype(np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    onehot = np.eye(num_classes, dtype=np.float64)[labels]  # (N, C)
    gram = (q.T @ q)[np.triu_indices(dim)]  # (d (d + 1) / 2,)
    sums = (onehot.T @ q).ravel() * scale  # (C d,)
    counts = onehot.sum(axis=0) * scale**2  # (C,)
    values = np.rint(np.concatenate([gram, sums, counts])).astype(np.int64)
    return IntegerRelease(values, *stats_sensitivities(dim, scale), scale, shrink)


def stats_sensitivities(dim: int, scale: int) -> tuple[float, float]:
    """Return the (L2, L1) sensitivities of `stats_release` over d = `dim` at `scale` (derived there)."""
    return math.sqrt(3.0) * float(scale) ** 2, float(scale) ** 2 * ((dim + 1) / 2 + math.sqrt(dim) + 1)


def stats_length(dim: int, num_classes: int) -> int:
    """Return the length of the integer vector of `stats_release` for d dims and C classes."""
    return dim * (dim + 1) // 2 + num_classes * dim + num_classes


def read_stats(
    total: np.ndarray, *, dim: int, num_classes: int, scale: int, shrink: float, noise_std: float
) -> SufficientStats:
    """Return the summed statistics in the units of the rows u from the integer sum of `stats_release` vectors.

    The Gram divides by (gamma c)^2, the class sums by gamma^2 c, the counts by gamma^2; `noise_std` is the noise
    std of the Gram in these units (the largest of the three parts').
    """
    total = np.asarray(total, dtype=np.float64)
    if total.shape != (stats_length(dim, num_classes),):
        raise ReplyError(f"summed statistics have {total.shape} entries, expected {stats_length(dim, num_classes)}")
    upper = dim * (dim + 1) // 2
    gram = np.zeros((dim, dim))
    gram[np.triu_indices(dim)] = total[:upper] / (scale * shrink) ** 2
    gram = gram + np.triu(gram, 1).T
    sums = total[upper : upper + num_classes * dim].reshape(num_classes, dim) / (scale**2 * shrink)
    counts = total[upper + num_classes * dim :] / scale**2
    return SufficientStats(gram=gram, class_sums=sums, class_counts=counts, noise_std=noise_std)


def _check_magnitude(bound: float, *, what: str) -> None:
    """Refuse a release whose integers could leave the exact range (far beyond any real site's data)."""
    if bound >= EXACT_FLOAT / 1024:  # 1024 sites' sums still fit in 2^63
        raise ConfigError(f"the {what} of this many examples at this quantisation scale exceeds 2^42: too many rows")
