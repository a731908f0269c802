"""Noise and sampling for real sites from a cryptographic generator, hardened against floating-point attacks.

A simulated site draws its noise from a generator seeded by the run (reproducible lab results). A real
site must not: torch's and numpy's generators are not cryptographic, so their outputs can in principle be
predicted from earlier ones. `SecureRandom` draws uniform bits from the ChaCha20 stream cipher of the
`cryptography` package (RFC 7539), keyed from the operating system's entropy (`os.urandom`), turns them
into Gaussians with the Box-Muller transform in float64, and returns each Gaussian as the sum of four
draws divided by two (the same N(0, std^2)): Holohan & Braghin 2021, "Secure Random Sampling in
Differential Privacy" (arXiv 2107.10138), section 5.1, the countermeasure Opacus' own `secure_mode`
uses against the floating-point attacks of Jin et al. 2022 (arXiv 2112.05307). This is what Opacus'
secure mode intends; Opacus needs `torchcsprng` for it, which is not built for the torch fedtl pins.
"""

from __future__ import annotations

import math
import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from scipy.special import gammaln

_MANTISSA = 2.0**-53
HARDENING_DRAWS = 4  # Holohan & Braghin's 2n draws with n = 2; their sum over 2 has the variance of one draw


class SecureRandom:
    """A cryptographic source of uniforms, Poisson masks and Gaussian noise (numpy `normal` compatible)."""

    def __init__(self) -> None:
        key, nonce = os.urandom(32), os.urandom(16)  # ChaCha20 takes a 256-bit key and a 128-bit nonce/counter
        self._stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()

    def uniform(self, size: int) -> np.ndarray:
        """Return `size` independent uniforms on (0, 1), float64 with 53 random bits each."""
        raw = np.frombuffer(self._stream.update(bytes(8 * size)), dtype=np.uint64)
        return ((raw >> np.uint64(11)).astype(np.float64) + 0.5) * _MANTISSA

    def standard_normal(self, size: int) -> np.ndarray:
        """Return `size` independent N(0, 1) draws (Box-Muller on two uniforms each), float64."""
        pairs = (size + 1) // 2
        u1, u2 = self.uniform(pairs), self.uniform(pairs)
        radius = np.sqrt(-2.0 * np.log(u1))
        z = np.concatenate([radius * np.cos(2 * math.pi * u2), radius * np.sin(2 * math.pi * u2)])
        return z[:size]

    def normal(self, loc: float = 0.0, scale: float = 1.0, size: int | tuple[int, ...] = 1) -> np.ndarray:
        """Return N(loc, scale^2) draws of shape `size`, each the hardened sum of HARDENING_DRAWS draws over 2."""
        shape = (size,) if isinstance(size, int) else tuple(size)
        count = int(np.prod(shape)) if shape else 1
        if scale == 0:
            return np.full(shape, float(loc))
        total = sum(self.standard_normal(count) for _ in range(HARDENING_DRAWS))
        return (loc + scale * total / math.sqrt(HARDENING_DRAWS)).reshape(shape)

    def poisson(self, lam: float, size: int | tuple[int, ...] = 1) -> np.ndarray:
        """Return Poisson(lam) draws of shape `size` (int64): the Skellam shares of secure aggregation.

        The algorithms numpy uses, fed by this generator's uniforms: for lam >= 10 Hormann's transformed
        rejection with squeeze (PTRS; Hormann 1993, "The transformed rejection method for generating Poisson
        random variables"), exact; below, Knuth's multiplication of uniforms.
        """
        shape = (size,) if isinstance(size, int) else tuple(size)
        count = int(np.prod(shape)) if shape else 1
        if not (lam >= 0 and math.isfinite(lam)):
            raise ValueError(f"poisson: lam must be a finite number >= 0, got {lam}")
        out = self._poisson_ptrs(lam, count) if lam >= 10 else self._poisson_small(lam, count)
        return out.reshape(shape)

    def _poisson_small(self, lam: float, count: int) -> np.ndarray:
        limit = math.exp(-lam)
        out = np.zeros(count, dtype=np.int64)
        product = np.ones(count)
        pending = np.arange(count)
        while pending.size:
            product[pending] *= self.uniform(pending.size)
            going = product[pending] > limit
            out[pending[going]] += 1
            pending = pending[going]
        return out

    def _poisson_ptrs(self, lam: float, count: int) -> np.ndarray:
        slam, loglam = math.sqrt(lam), math.log(lam)
        b = 0.931 + 2.53 * slam
        a = -0.059 + 0.02483 * b
        log_invalpha = math.log(1.1239 + 1.1328 / (b - 3.4))
        vr = 0.9277 - 3.6224 / (b - 2)
        out = np.zeros(count, dtype=np.int64)
        pending = np.arange(count)
        while pending.size:
            u = self.uniform(pending.size) - 0.5
            v = self.uniform(pending.size)
            us = 0.5 - np.abs(u)
            k = np.floor((2 * a / us + b) * u + lam + 0.43)
            quick = (us >= 0.07) & (v <= vr)
            usable = ~quick & (k >= 0) & ~((us < 0.013) & (v > us))
            with np.errstate(divide="ignore", invalid="ignore"):
                lhs = np.log(v) + log_invalpha - np.log(a / (us * us) + b)
                rhs = -lam + k * loglam - gammaln(np.where(usable, k, 0) + 1)
            accept = quick | (usable & (lhs <= rhs))
            out[pending[accept]] = k[accept].astype(np.int64)
            pending = pending[~accept]
        return out

    def bernoulli(self, size: int, p: float) -> np.ndarray:
        """Return a boolean mask of `size` independent coins with probability `p` (Poisson sampling)."""
        return self.uniform(size) < p
