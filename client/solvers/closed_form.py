"""The site's side of the closed-form head solver: one noised release of sufficient statistics. No Flower here.

The site computes the Gram matrix, per-class sums and class counts of its training features as the head
sees them (shared/closed_form.py), pays for one Gaussian release through the release path
(client/release.py), then adds the noise. The server sums the sites' releases and solves a ridge or LDA
head: no DP-SGD rounds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from fedtl.client.inputs import load_site_inputs
from fedtl.client.release import ReleaseRequest, charge_release
from fedtl.client.site import Site
from fedtl.shared.closed_form import SufficientStats, compute_stats, prepare_features, random_projection, release_stats
from fedtl.shared.cut import Cut
from fedtl.shared.errors import ReplyError
from fedtl.shared.heads import zero_non_finite_rows
from fedtl.shared.mechanisms import SUFFICIENT_STATS
from fedtl.shared.protocol import RoundSettings

log = logging.getLogger(__name__)

STATS_ROUND = 1  # the ledger's server_round of the release: a closed-form run has this one round


@dataclass(frozen=True)
class StatsRelease:
    """What a site released: its noised statistics, the noise, and its cumulative spend after it."""

    stats: SufficientStats
    num_examples: int  # declared public, as in training replies (README, privacy model)
    noise_multiplier: float  # 0.0 in the non-private baseline
    epsilon: float  # cumulative over the site's whole ledger, at `delta`
    delta: float


def sufficient_stats_round(site: Site, settings: RoundSettings, *, center: np.ndarray | None = None) -> StatsRelease:
    """Release the site's noised sufficient statistics once, charged to its ledger first.

    The features are the head's input (normalised, minus the federation's `center`, normalised again),
    projected by the run's public seeded projection when `projection-dim` > 0 and clipped to norm 1; the
    release adds noise of std noise_multiplier * sqrt(3) to every entry (see `fedtl.shared.closed_form`).
    It is charged as one Gaussian mechanism (one step at sample rate 1) of its own ledger kind,
    `sufficient-stats`. With `non-private` the exact statistics are released (labelled like every
    non-private result).

    Raises:
        PrivacyBudgetError: the release would take the site past target-epsilon.
        PolicyRefusal: the noise is below the policy's minimum, or zero where the policy forbids it.
        ReplyError: `center` does not fit the site's features.
    """
    inputs = load_site_inputs(site, settings, cut=Cut.of(settings).at_end_cut())
    return release_sufficient_stats(site, settings, inputs.train_x, inputs.train_y, center=center)


def release_sufficient_stats(
    site: Site, settings: RoundSettings, features: np.ndarray, labels: np.ndarray, *, center: np.ndarray | None
) -> StatsRelease:
    """Charge, then return the noised statistics of `features` (N, D) and `labels` (sufficient_stats_round)."""
    dim = features.shape[1]
    if center is not None and (center.shape != (dim,) or not np.all(np.isfinite(center))):
        raise ReplyError(f"the feature centre sent has shape {center.shape} or non-finite values; expected ({dim},)")
    release = charge_release(
        site,
        settings,
        ReleaseRequest.once(
            SUFFICIENT_STATS,
            STATS_ROUND,
            f"the sufficient-statistics release of run {settings.run_id}",
            settings.noise_multiplier,
            num_examples=len(labels),
        ),
    )
    projection = random_projection(dim, settings.projection_dim, seed=settings.seed)
    features, dropped = zero_non_finite_rows(features)
    if dropped:
        log.warning(
            "site %s: %d example(s) with NaN/Inf features contribute nothing to the statistics", site.name, dropped
        )
    u = prepare_features(features, center=center, projection=projection)  # (N, d), norms <= 1
    exact = compute_stats(u, labels, settings.num_classes)
    released = release_stats(exact, noise_multiplier=release.noise_multiplier, rng=release.rng())
    log.info(
        "site %s: released sufficient statistics over %d dims of %d examples, sigma %.3f, cumulative epsilon %.3f",
        site.name,
        released.dim,
        len(u),
        release.noise_multiplier,
        release.epsilon,
    )
    return StatsRelease(released, len(u), release.noise_multiplier, release.epsilon, settings.target_delta)
