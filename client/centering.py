"""The site's feature-centre release: the Gaussian-noised sum of its L2-normalised training features. No Flower here.

The head subtracts the federation's mean normalised feature (shared/heads.Head); the server estimates it
from these sums (server/centering.py), with a noise it picks by a public rule (shared/centering.py, or the
auto plan, shared/dp_heads.py) and each site checks against its policy and pays for through the release
path (client/release.py). Under the auto plan the features are first projected on the server's public
basis (k dims, each row clipped to norm 1), so the release is k-dim and its sensitivity is still 1.
"""

from __future__ import annotations

import logging

import numpy as np

from fedtl.client.inputs import load_site_inputs
from fedtl.client.release import Release, ReleaseRequest, charge_release
from fedtl.client.site import Site
from fedtl.shared.cut import Cut
from fedtl.shared.heads import normalize_features, zero_non_finite_rows
from fedtl.shared.mechanisms import FEATURE_SUM
from fedtl.shared.protocol import RoundSettings
from fedtl.shared.public_basis import project_features

log = logging.getLogger(__name__)

CENTER_ROUND = 0  # the ledger's server_round of the release: before the run's first round


def feature_sum_round(
    site: Site, settings: RoundSettings, *, noise_multiplier: float, projection: np.ndarray | None = None
) -> tuple[np.ndarray, int, Release]:
    """Return the Gaussian-noised sum of the site's L2-normalised training features, their count, and the release.

    Each normalised feature has norm 1, so adding or removing one example moves the sum by at most 1
    (L2 sensitivity 1); noise N(0, sigma^2 I) makes the release one Gaussian mechanism, which the
    accountant composes as one DP-SGD step at sample rate 1. It is charged before it is computed.
    With `non-private` the exact sum is released (labelled like every non-private result). With a
    `projection` (k, D) each feature is mapped to clip1(P normalise(x)) first (norm <= 1: sensitivity 1).

    Raises:
        PrivacyBudgetError: the release would take the site past target-epsilon.
        PolicyRefusal: the noise is below the policy's minimum.
    """
    features = load_site_inputs(site, settings, cut=Cut.of(settings).at_end_cut()).train_x  # whatever trains
    return release_feature_sum(site, settings, features, noise_multiplier=noise_multiplier, projection=projection)


def release_feature_sum(
    site: Site,
    settings: RoundSettings,
    features: np.ndarray,
    *,
    noise_multiplier: float,
    projection: np.ndarray | None = None,
) -> tuple[np.ndarray, int, Release]:
    """Charge, then return the noised sum of `features` (N, D) normalised (and projected), their count, the release."""
    release = charge_release(
        site,
        settings,
        ReleaseRequest.once(
            FEATURE_SUM,
            CENTER_ROUND,
            f"the {'projected ' if projection is not None else ''}feature-mean release of run {settings.run_id}",
            noise_multiplier,
            num_examples=len(features),
        ),
    )
    features, dropped = zero_non_finite_rows(features)
    if dropped:
        log.warning(
            "site %s: %d example(s) with NaN/Inf features contribute nothing to the feature sum", site.name, dropped
        )
    if projection is None:
        z = normalize_features(features)  # (N, D), every row norm 1 (0 for a zeroed one)
    else:
        z = project_features(features, projection)  # (N, k), every row norm <= 1
    noise = release.rng().normal(0.0, release.noise_multiplier * FEATURE_SUM.sensitivity, size=z.shape[1])
    total = z.astype(np.float64).sum(axis=0) + noise
    return total.astype(np.float32), len(z), release
