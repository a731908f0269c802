"""The public synthetic-image basis: deterministic images, PCA against scikit-learn, clipped projections."""

import numpy as np
import pytest
from sklearn.decomposition import PCA

from fedtl.shared.errors import ConfigError
from fedtl.shared.public_basis import (
    centre_features,
    compute_public_basis,
    generate_synthetic_images,
    project_features,
)


def test_synthetic_images_depend_on_the_seed_only():
    first = generate_synthetic_images(12, seed=3, size=16)
    assert first.dtype == np.uint8 and first.shape == (12, 16, 16)
    assert np.array_equal(first, generate_synthetic_images(12, seed=3, size=16))
    assert not np.array_equal(first, generate_synthetic_images(12, seed=4, size=16))
    assert first.std() > 0  # not blank


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
