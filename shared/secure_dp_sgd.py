"""The maths of distributed DP-FedSGD on a linear head (head-solver "secure-dp-sgd"): inputs, clipped rows, samples.

Each step a site computes, on a Poisson sample of its cached features, every example's cross-entropy gradient of
the current head W u + b, clipped jointly (weight and bias, as Opacus' flat clipping) to max-grad-norm C, and
divided by C: rows of L2 norm <= 1 that the secure sum's quantisation turns into integers of a known sensitivity
(shared/secure_sum.feature_sum_release). The server reads the sum back, multiplies by C and divides by the
expected total batch. Pure numpy: no Flower.
"""

from __future__ import annotations

import numpy as np

from fedtl.shared.errors import ReplyError
from fedtl.shared.public_basis import centre_features, project_features
from fedtl.shared.secure_noise import SecureRandom


def head_inputs(features: np.ndarray, *, center: np.ndarray, projection: np.ndarray | None) -> np.ndarray:
    """Return the head's input u (N, d) float64, as shared/heads.Head computes it (unit rows).

    Projected head: normalise(clip1(P normalise(x)) - c); linear head: normalise(normalise(x) - c).
    """
    x = np.asarray(features, dtype=np.float64)
    if projection is not None:
        return centre_features(project_features(x, projection), center)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return centre_features(x, center)


def clipped_gradient_rows(
    u: np.ndarray,
    labels: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    *,
    max_grad_norm: float,
    fit_bias: bool = True,
) -> np.ndarray:
    """Return each example's cross-entropy gradient of W u + b, clipped to `max_grad_norm`, divided by it (N, C(d+1)).

    The gradient of an example is (p - y) [u; 1]^T; row layout: the weight's (C, d) entries row by row, then the
    bias's C entries (the head's `layers.0.weight` and `layers.0.bias`, flattened). Every row has norm <= 1.
    `fit_bias` False (a projected head, whose bias is held: shared/heads.py): (p - y) u^T only, rows (N, C d).
    """
    u = np.asarray(u, dtype=np.float64)
    logits = u @ np.asarray(weight, dtype=np.float64).T + np.asarray(bias, dtype=np.float64)  # (N, C)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    g = p - np.eye(weight.shape[0])[np.asarray(labels, dtype=np.int64)]  # (N, C)
    norms = np.linalg.norm(g, axis=1) * np.sqrt(np.sum(u * u, axis=1) + float(fit_bias))  # ||(p - y) [u; 1]^T||_F
    factor = np.minimum(1.0 / max_grad_norm, 1.0 / np.maximum(norms, 1e-12))  # clip to C, then divide by C
    g = g * factor[:, None]
    rows = (g[:, :, None] * u[:, None, :]).reshape(len(u), -1)  # (N, C d)
    return np.concatenate([rows, g], axis=1) if fit_bias else rows


def poisson_sample(rng: np.random.Generator | SecureRandom, count: int, sample_rate: float) -> np.ndarray:
    """Return a boolean mask keeping each of `count` examples with probability `sample_rate` (all of them at 1)."""
    if sample_rate >= 1:
        return np.ones(count, dtype=bool)
    if isinstance(rng, SecureRandom):
        return rng.bernoulli(count, sample_rate)
    return rng.random(count) < sample_rate


def split_gradient(
    total: np.ndarray, *, num_classes: int, dim: int, fit_bias: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Return (weight (C, d), bias (C,)) of a flat gradient in `clipped_gradient_rows`' layout (bias 0 if held)."""
    expected = num_classes * (dim + int(fit_bias))
    if total.shape != (expected,):
        raise ReplyError(f"a head gradient of {total.shape} entries, expected {expected}")
    bias = total[num_classes * dim :] if fit_bias else np.zeros(num_classes)
    return total[: num_classes * dim].reshape(num_classes, dim), bias


def check_head_tensors(
    arrays: dict[str, np.ndarray], *, feature_dim: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Return (weight, bias, center, projection or None) sent for a secure step, checked (ReplyError names the fix)."""
    for name in ("layers.0.weight", "layers.0.bias", "center"):
        if name not in arrays:
            raise ReplyError(f"a secure DP-SGD step needs the head tensor `{name}`; got {sorted(arrays)}")
    weight, bias, center = (
        np.asarray(arrays[n], dtype=np.float64) for n in ("layers.0.weight", "layers.0.bias", "center")
    )
    projection = arrays.get("projection")
    dim = feature_dim if projection is None else projection.shape[0]
    expected = {"layers.0.weight": (num_classes, dim), "layers.0.bias": (num_classes,), "center": (dim,)}
    if projection is not None:
        projection = np.asarray(projection, dtype=np.float64)
        expected["projection"] = (dim, feature_dim)
    for name, shape in expected.items():
        value = arrays[name]
        if tuple(value.shape) != shape or not np.all(np.isfinite(value)):
            raise ReplyError(
                f"the head tensor `{name}` sent has shape {tuple(value.shape)} or non-finite values; expected {shape}"
            )
    return weight, bias, center, projection
