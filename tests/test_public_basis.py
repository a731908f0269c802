"""The public synthetic-image basis: deterministic images, PCA against scikit-learn, clipped projections."""

import hashlib

import numpy as np
import pytest
from sklearn.decomposition import PCA

from fedtl.shared.dp_heads import PROJECTION_DIMS
from fedtl.shared.errors import ConfigError
from fedtl.shared.public_basis import (
    SYNTHETIC_COUNT,
    SYNTHETIC_FORMAT,
    SYNTHETIC_TEXT_COUNT,
    centre_features,
    compute_public_basis,
    generate_synthetic_images,
    generate_synthetic_texts,
    project_features,
    synthetic_count,
    synthetic_fingerprint,
    zero_shot_weight,
)

# The default synthetic images of each SYNTHETIC_FORMAT. Caches are keyed by the format, not by the pixels, so a
# generator that draws other images must bump the format (and add its digest here), or runs would read the features
# and bases of the old images as the new ones'.
SYNTHETIC_IMAGES_SHA256 = {
    1: "90e8184412b6084ef2ffd070cc6f8b0a235271a0bd0715daaddb4f035e5324a4",  # 1500 images
    2: "544421665fd60181f6dd8b4b4c01efca0c10d25104ea22c046dd52a7449b69c0",  # 512
}


def test_synthetic_images_depend_on_the_seed_only():
    first = generate_synthetic_images(12, seed=3, size=16)
    assert first.dtype == np.uint8 and first.shape == (12, 16, 16)
    assert np.array_equal(first, generate_synthetic_images(12, seed=3, size=16))
    assert not np.array_equal(first, generate_synthetic_images(12, seed=4, size=16))
    assert first.std() > 0  # not blank


def test_the_default_synthetic_images_are_the_ones_their_format_names():
    digest = hashlib.sha256(generate_synthetic_images().tobytes()).hexdigest()
    assert digest == SYNTHETIC_IMAGES_SHA256.get(SYNTHETIC_FORMAT), (
        "generate_synthetic_images draws other images than its format's: bump SYNTHETIC_FORMAT and pin the new digest"
    )
    assert synthetic_fingerprint("images").startswith(f"synthetic-images/format-{SYNTHETIC_FORMAT}/")


def test_images_and_texts_are_drawn_in_their_own_counts_which_their_fingerprints_name():
    assert synthetic_count("images") == SYNTHETIC_COUNT >= 2 * max(PROJECTION_DIMS)  # every direction estimated
    assert synthetic_count("texts") == SYNTHETIC_TEXT_COUNT
    assert f"/count-{SYNTHETIC_COUNT}/" in synthetic_fingerprint("images")
    assert f"/count-{SYNTHETIC_TEXT_COUNT}/" in synthetic_fingerprint("texts")
    assert len(generate_synthetic_images()) == SYNTHETIC_COUNT


def test_synthetic_images_refuse_a_size_the_blur_cannot_take():
    with pytest.raises(ConfigError, match="multiple of 4"):
        generate_synthetic_images(3, size=30)


def test_the_unwhitened_basis_is_scikit_learns_pca_of_the_normalised_features():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(80, 10)) @ rng.normal(size=(10, 10)) + 3.0  # (M, D), correlated, off-centre
    basis = compute_public_basis(feats, dim=4, whitening=0.0)
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    oracle = PCA(n_components=4).fit(unit).components_  # (4, D)
    assert np.allclose(np.abs(np.sum(basis.projection * oracle, axis=1)), 1.0, atol=1e-8)  # same axes up to sign
    assert np.allclose(basis.projection @ basis.projection.T, np.eye(4), atol=1e-10)


def test_whitening_scales_each_direction_by_the_inverse_root_of_its_spread():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(200, 6)) * np.array([5.0, 3.0, 2.0, 1.0, 1.0, 1.0]) + 10.0
    plain = compute_public_basis(feats, dim=3, whitening=0.0)
    half = compute_public_basis(feats, dim=3, whitening=0.5)
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    spread = np.std((unit - unit.mean(0)) @ plain.projection.T, axis=0)  # (3,) proportional to s_i
    expected = np.sqrt(spread[0] / spread)
    assert np.allclose(np.linalg.norm(half.projection, axis=1), expected, rtol=1e-8)


def test_projected_rows_are_clipped_to_norm_one_and_centred_rows_are_unit():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(50, 8))
    projection = 3.0 * np.eye(8)[:4]  # stretches: many rows would exceed norm 1
    z = project_features(feats, projection)
    assert np.all(np.linalg.norm(z, axis=1) <= 1.0 + 1e-12)
    short = np.linalg.norm(3.0 * (feats / np.linalg.norm(feats, axis=1, keepdims=True))[:, :4], axis=1) <= 1.0
    assert np.allclose(z[short], 3.0 * (feats / np.linalg.norm(feats, axis=1, keepdims=True))[short, :4])
    u = centre_features(z, z.mean(0))
    assert np.allclose(np.linalg.norm(u, axis=1), 1.0)


def test_a_basis_larger_than_the_public_sample_is_refused():
    with pytest.raises(ConfigError, match=r"projection-dim.*\[1, 5\]"):
        compute_public_basis(np.ones((5, 9)) + np.arange(9), dim=6)


def test_synthetic_texts_are_seeded_draws_of_the_given_words():
    words = ["alpha", "beta", "gamma", "delta"]
    texts = generate_synthetic_texts(words, 30, seed=3)
    assert texts.shape == (30,) and np.array_equal(texts, generate_synthetic_texts(words[::-1], 30, seed=3))
    assert not np.array_equal(texts, generate_synthetic_texts(words, 30, seed=4))
    counts = [len(t.split()) for t in texts]
    assert min(counts) >= 8 and max(counts) <= 64 and {w for t in texts for w in t.split()} <= set(words)


def test_synthetic_texts_refuse_an_empty_vocabulary():
    with pytest.raises(ConfigError, match="non-empty vocabulary"):
        generate_synthetic_texts([], 3)


def test_leading_directions_come_first_and_the_rest_is_the_pca_of_what_they_leave():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(90, 12)) @ rng.normal(size=(12, 12)) + 2.0  # (M, D)
    names = rng.normal(size=(2, 12)) + 2.0  # (m, D) public "class name" features
    basis = compute_public_basis(feats, dim=5, whitening=0.0, leading=names)
    p = basis.projection
    assert np.allclose(p @ p.T, np.eye(5), atol=1e-10)
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    offsets = names / np.linalg.norm(names, axis=1, keepdims=True) - unit.mean(axis=0)
    # Gram-Schmidt oracle: the first row is the first offset's direction; the two rows span both offsets.
    assert np.isclose(abs(p[0] @ offsets[0]) / np.linalg.norm(offsets[0]), 1.0)
    assert np.allclose(offsets @ p[:2].T @ p[:2], offsets, atol=1e-10)
    # The other rows are scikit-learn's PCA of the features with the offsets' span removed.
    deflated = unit - unit @ p[:2].T @ p[:2]
    oracle = PCA(n_components=3).fit(deflated).components_
    assert np.allclose(np.abs(np.sum(p[2:] * oracle, axis=1)), 1.0, atol=1e-8)


@pytest.mark.parametrize("shape", [(5, 12), (2, 11), (0, 12), (12,)])
def test_leading_directions_must_be_fewer_than_the_dim_and_match_the_features(shape):
    feats = np.random.default_rng(3).normal(size=(40, 12))
    with pytest.raises(ConfigError, match=r"`leading` directions must be \(m, 12\) with 1 <= m < projection dim 5"):
        compute_public_basis(feats, dim=5, leading=np.ones(shape))


def test_the_zero_shot_weight_scores_cosines_to_the_class_names_in_head_space():
    rng = np.random.default_rng(4)
    proj = np.linalg.qr(rng.normal(size=(10, 4)))[0].T  # (k, D) orthonormal rows
    names, centre, x = rng.normal(size=(3, 10)), rng.normal(size=4) * 0.1, rng.normal(size=(6, 10))
    w = zero_shot_weight(names, proj, centre, scale=20.0)
    u, v = centre_features(project_features(x, proj), centre), centre_features(project_features(names, proj), centre)
    cosines = (u @ v.T) / np.outer(np.linalg.norm(u, axis=1), np.linalg.norm(v, axis=1))
    np.testing.assert_allclose(u @ w.T, 20.0 * cosines, atol=1e-10)
