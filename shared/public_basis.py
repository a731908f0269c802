"""A data-independent projection for DP heads: principal directions of the backbone's features of synthetic images.

Noise added under differential privacy grows with the number of released coordinates, so a head trained on a
few directions that carry the data's variation beats one on all D backbone features (Tang et al. 2023,
"Differentially Private Image Classification by Learning Priors from Random Processes", learn such priors from
synthetic images; Baradad et al. 2021, "Learning to See by Looking at Noise", show random-process images
exercise pretrained features). Here the images are drawn from a seeded random process (dead leaves, strokes,
rectangles, at random blur), run through the public backbone, and their L2-normalised features give the
principal directions: nothing about any site's data enters, so the projection costs no privacy and every
party can recompute it. On the lab's data (digits, PneumoniaMNIST, BreastMNIST through EfficientNet-Lite0 at
64 px, seed 0) a non-private LDA on the top 64 directions scored 0.89 / 0.91 / 0.82 on the sites' local test
splits, against 0.86 / 0.90 / 0.83 on the top right singular vectors of the backbone's ImageNet classifier, the
other public candidate; at 32 directions 0.82 / 0.91 / 0.82 against 0.81 / 0.85 / 0.79
(`benchmarks/dp_heads.py --basis-report`). Pure numpy: no Flower.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from fedtl.shared.dataset import TEXTS
from fedtl.shared.errors import ConfigError

# Images: twice the largest projection dim (shared/dp_heads.PROJECTION_DIMS), so every direction is estimated. 1500
# before format 2; 512 scored the same within the spread of the draws on digits, PneumoniaMNIST and BreastMNIST at
# 64 and 224 px, epsilon 1, 3 and 8 (4 draws each, `benchmarks/dp_heads.py --public-counts`), and a cold run
# extracts them in a third of the time (3.2 s against 9.5 s at 224 px on 2 cores).
SYNTHETIC_COUNT = 512
SYNTHETIC_TEXT_COUNT = 1500  # texts: as measured for the text backbone (README, "bank sites"); not re-measured at 512
SYNTHETIC_SEED = 17  # fixed and public: every party draws the same images
SYNTHETIC_SIZE = 32  # px; the backbone's preprocessing resizes them like any image
# Bump when the generators below draw other inputs for the same constants: the features cached for the synthetic
# inputs and the stored bases are keyed by how the inputs are drawn (`synthetic_fingerprint`), so a run need not
# draw them to find its cache (tests/test_public_basis.py pins the images' digest to this format).
SYNTHETIC_FORMAT = 2  # 2: 512 images (the count seeds the draw, so every image changed); 1: 1500
WHITENING = 0.5  # direction i is scaled by (s_1 / s_i) ** WHITENING, s the synthetic singular values
SYNTHETIC_TEXT_WORDS = (8, 64)  # words per synthetic text: short notes to long narratives
# all-MiniLM-L6-v2 was trained with sentence-transformers' MultipleNegativesRankingLoss, whose logits are cosine
# similarities times 20: the scale at which its cosines are calibrated as logits (a public fact of the backbone).
ZERO_SHOT_SCALE = 20.0


@dataclass(frozen=True)
class PublicBasis:
    """A public projection of L2-normalised backbone features: u = P z, and the synthetic images' mean in u space."""

    projection: np.ndarray  # (k, D) float64; rows orthogonal, row i of norm (s_1 / s_i) ** whitening >= 1
    center: np.ndarray  # (k,) mean of the projected (clipped) synthetic features: a public centre

    @property
    def dim(self) -> int:
        """Return k, the projected dimension."""
        return int(self.projection.shape[0])


def synthetic_count(kind: str) -> int:
    """Return how many synthetic inputs of `kind` ("images" or "texts") the public basis is computed from."""
    return SYNTHETIC_TEXT_COUNT if kind == TEXTS else SYNTHETIC_COUNT


def synthetic_fingerprint(kind: str) -> str:
    """Return the data fingerprint of the synthetic inputs of `kind` ("images" or "texts"): how they are drawn."""
    low, high = SYNTHETIC_TEXT_WORDS
    drawn = f"count-{synthetic_count(kind)}/seed-{SYNTHETIC_SEED}/size-{SYNTHETIC_SIZE}/words-{low}-{high}"
    return f"synthetic-{kind}/format-{SYNTHETIC_FORMAT}/{drawn}"


def generate_synthetic_images(
    count: int = SYNTHETIC_COUNT, *, seed: int = SYNTHETIC_SEED, size: int = SYNTHETIC_SIZE
) -> np.ndarray:
    """Return `count` grey uint8 images (count, size, size) drawn from a seeded random process, no real data.

    A third each of dead leaves (random ellipses occluding each other, Lee, Mumford, Huang 2001), thick
    strokes and rectangles, 2 to 29 shapes of random grey levels on a random background, then a random
    box blur of 1, 2 or 4 px. numpy's Generator draws the same images on every platform. Drawn once per
    process (about a second for the default 512) and copied out, as they depend on the arguments alone.
    """
    if count < 1 or size < 4 or size % 4:
        raise ConfigError(f"synthetic images need count >= 1 and a size that is a multiple of 4, got {count}, {size}")
    return _draw_synthetic_images(count, seed, size).copy()


@functools.lru_cache(maxsize=4)
def _draw_synthetic_images(count: int, seed: int, size: int) -> np.ndarray:
    """Return the images `generate_synthetic_images` describes (cached: callers get copies)."""
    rng = np.random.default_rng([seed, count, size])
    yy, xx = np.mgrid[0:size, 0:size] / size  # (S, S) each
    out = np.zeros((count, size, size))
    for i in range(count):
        img = np.full((size, size), rng.uniform(0, 1) ** 2)
        kind = i % 3
        for _ in range(rng.integers(2, 30)):
            cx, cy = rng.uniform(0, 1, 2)
            value = rng.uniform()
            if kind == 0:  # dead leaves: ellipses
                a, b = rng.uniform(0.03, 0.4, 2)
                th = rng.uniform(0, math.pi)
                along = (xx - cx) * math.cos(th) + (yy - cy) * math.sin(th)
                across = -(xx - cx) * math.sin(th) + (yy - cy) * math.cos(th)
                img[(along / a) ** 2 + (across / b) ** 2 < 1] = value
            elif kind == 1:  # strokes: thick segments
                angle = rng.uniform(0, math.pi)
                length, width = rng.uniform(0.1, 0.6), rng.uniform(0.02, 0.1)
                dx, dy = math.cos(angle), math.sin(angle)
                along = (xx - cx) * dx + (yy - cy) * dy
                across = np.abs(-(xx - cx) * dy + (yy - cy) * dx)
                img[(np.abs(along) < length / 2) & (across < width)] = value
            else:  # rectangles
                half_w, half_h = rng.uniform(0.03, 0.3, 2)
                img[(np.abs(xx - cx) < half_w) & (np.abs(yy - cy) < half_h)] = value
        blur = int(rng.choice([1, 2, 4]))
        if blur > 1:
            img = img.reshape(size // blur, blur, size // blur, blur).mean((1, 3)).repeat(blur, 0).repeat(blur, 1)
        out[i] = img
    return np.round(out * 255).astype(np.uint8)


def generate_synthetic_texts(
    words: list[str], count: int = SYNTHETIC_TEXT_COUNT, *, seed: int = SYNTHETIC_SEED
) -> np.ndarray:
    """Return `count` texts (count,) object of uniformly drawn `words`, 8 to 64 of them each: no real text.

    The texts' analogue of `generate_synthetic_images`: a seeded random process over the text backbone's own
    vocabulary (its whole words), so nothing about any site's data enters and every party draws the same texts.
    """
    if count < 1 or not words:
        raise ConfigError(
            f"synthetic texts need count >= 1 and a non-empty vocabulary, got {count}, {len(words)} words"
        )
    rng = np.random.default_rng([seed, count])
    low, high = SYNTHETIC_TEXT_WORDS
    vocab = np.asarray(sorted(words), dtype=object)
    return np.array([" ".join(rng.choice(vocab, int(rng.integers(low, high + 1)))) for _ in range(count)], dtype=object)


def compute_public_basis(
    features: np.ndarray, *, dim: int, whitening: float = WHITENING, leading: np.ndarray | None = None
) -> PublicBasis:
    """Return the top-`dim` principal directions of public features (M, D), partly whitened.

    The features are L2-normalised and centred; the right singular vectors v_i with singular values s_i give
    P = diag((s_1 / s_i) ** whitening) V^T (k, D). Whitening 0 is plain PCA; 1 gives every direction the
    same variance on the synthetic images. Partial whitening lets DP-GD reach a given margin in fewer
    lr x steps (less accumulated noise) than on the raw directions, where the first few dominate.
    `leading` (m, D), public vectors (a text backbone's features of the class names): their L2-normalised
    offsets from the public features' mean become the first m orthonormal directions (unit rows), and the
    principal directions are taken in what they leave out; m must be below `dim`.

    Raises:
        ConfigError: `dim` outside [1, min(M, D)], `leading` not (m < dim, D), or a negative `whitening`.
    """
    z = np.asarray(features, dtype=np.float64)
    if not 1 <= dim <= min(z.shape):
        raise ConfigError(
            f"`projection-dim` must be in [1, {min(z.shape)}] for {z.shape[0]} public features of dim "
            f"{z.shape[1]}, got {dim}"
        )
    if not whitening >= 0:
        raise ConfigError(f"`whitening` must be >= 0, got {whitening}")
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    first = np.zeros((0, z.shape[1]))
    if leading is not None:
        lead = np.asarray(leading, dtype=np.float64)
        if lead.ndim != 2 or lead.shape[1] != z.shape[1] or not 1 <= len(lead) < dim:
            raise ConfigError(
                f"`leading` directions must be (m, {z.shape[1]}) with 1 <= m < projection dim {dim}, got {lead.shape}"
            )
        lead = lead / np.maximum(np.linalg.norm(lead, axis=1, keepdims=True), 1e-12) - z.mean(axis=0)
        q, r = np.linalg.qr(lead.T)  # (D, m): Gram-Schmidt in the given order
        first = q[:, np.abs(np.diag(r)) > 1e-9].T
        z = z - (z @ first.T) @ first  # principal directions of what the leading ones leave out
    rest = dim - len(first)
    _, values, vt = np.linalg.svd(z - z.mean(axis=0), full_matrices=False)
    scale = (values[0] / np.maximum(values[:rest], values[0] * 1e-6)) ** whitening  # (k - m,) >= 1
    projection = np.concatenate([first, scale[:, None] * vt[:rest]])  # (k, D)
    center = project_features(features, projection).mean(axis=0)
    return PublicBasis(projection=projection, center=center)


def project_features(features: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """Return z = P normalise(x) (N, k) with every row clipped to norm <= 1.

    Whitened rows of P have norm >= 1, so P z can be longer than z: the clip keeps each example's
    contribution to any released sum at most 1, which every sensitivity bound downstream relies on.
    """
    x = np.asarray(features, dtype=np.float64)
    z = (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)) @ np.asarray(projection, dtype=np.float64).T
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1.0)


def zero_shot_weight(
    class_features: np.ndarray, projection: np.ndarray, center: np.ndarray, *, scale: float = ZERO_SHOT_SCALE
) -> np.ndarray:
    """Return a linear head's weight (C, k) that scores u by `scale` x cos(u, class name's u): a zero-shot head.

    The class names are public (the federation declares them), so their features through the public backbone
    cost no privacy; starting DP-GD from this head instead of a random one spends none of the budget on what
    the names already say (as zero-shot heads initialise linear probes of CLIP, Kumar et al. 2022, "Fine-Tuning
    can Distort Pretrained Features": LP-FT).
    """
    return scale * centre_features(project_features(class_features, projection), center)


def centre_features(projected: np.ndarray, center: np.ndarray) -> np.ndarray:
    """Return the head's input u = normalise(z - center) (N, k): unit rows, so one example moves a sum by <= 1."""
    u = np.asarray(projected, dtype=np.float64) - np.asarray(center, dtype=np.float64)
    return u / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
