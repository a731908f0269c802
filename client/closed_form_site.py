"""A site's one-shot release of noised sufficient statistics for the closed-form head, charged before it is made.

The site computes the Gram matrix, per-class sums and class counts of its training features as the head sees
them (shared/closed_form.py), pays for one Gaussian release in its ledger, then adds the noise and replies.
The server sums the sites' releases and solves a ridge or LDA head: no DP-SGD rounds.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedtl.client.ledger import FEATURE_SUM, new_charge
from fedtl.client.rounds import charge, round_seed, site_accountant
from fedtl.client.site import Site, load_site_features
from fedtl.shared import constants as k
from fedtl.shared.closed_form import (
    SufficientStats,
    compute_stats,
    prepare_features,
    random_projection,
    release_stats,
)
from fedtl.shared.errors import ReplyError
from fedtl.shared.privacy import find_noise_multiplier
from fedtl.shared.protocol import RoundSettings, decode

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


def plan_release_noise(site: Site, settings: RoundSettings) -> float:
    """Return the noise multiplier of the release: the one given, or the smallest meeting target-epsilon.

    One Gaussian release is one step at sample rate 1 for the accountant. The derived noise leaves room for
    everything the site's ledger already holds (earlier runs, this run's feature-centre release), as
    `plan_noise_multiplier` does for DP-SGD, and is never below the policy's `min-noise-multiplier`.

    Raises:
        PrivacyBudgetError: the ledger already spends the target epsilon.
    """
    if settings.non_private:
        return 0.0
    if settings.noise_multiplier >= 0:
        if settings.noise_multiplier == 0:
            warnings.warn("noise-multiplier is 0: the sufficient statistics are released without noise (epsilon = inf)")
        return settings.noise_multiplier
    noise = find_noise_multiplier(
        target_epsilon=settings.target_epsilon,
        target_delta=settings.target_delta,
        sample_rate=1.0,
        steps=1,
        history=site.ledger.history_outside_training(settings.run_id),
        accountant=site_accountant(site, settings),
    )
    if site.policy is not None and noise < site.policy.min_noise_multiplier:
        log.info(
            "site %s: the budget allows noise %.3f on the statistics; the policy's minimum %.3f is used",
            site.name,
            noise,
            site.policy.min_noise_multiplier,
        )
        noise = site.policy.min_noise_multiplier
    return noise


def sufficient_stats_round(
    site: Site, settings: RoundSettings, *, projection_dim: int, center: np.ndarray | None = None
) -> StatsRelease:
    """Release the site's noised sufficient statistics once, charged to its ledger first.

    The features are the head's input (normalised, minus the federation's `center`, normalised again),
    projected by the run's public seeded projection when `projection_dim` > 0 and clipped to norm 1; the
    release adds noise of std noise_multiplier * sqrt(3) to every entry (see `fedtl.shared.closed_form`).
    It is charged as one Gaussian mechanism (one step at sample rate 1) with the ledger's FEATURE_SUM kind,
    whose meaning is exactly that. With `non-private` the exact statistics are released (labelled like every
    non-private result).

    Raises:
        PrivacyBudgetError: the release would take the site past target-epsilon.
        PolicyRefusal: the noise is below the policy's minimum, or zero where the policy forbids it.
        ReplyError: `center` does not fit the site's features.
    """
    feats = load_site_features(site, settings)
    dim = feats.train_features.shape[1]
    if center is not None and (center.shape != (dim,) or not np.all(np.isfinite(center))):
        raise ReplyError(f"the feature centre sent has shape {center.shape} or non-finite values; expected ({dim},)")
    what = f"the sufficient-statistics release of run {settings.run_id}"
    noise = plan_release_noise(site, settings)
    if settings.non_private:
        log.warning("site %s: NON-PRIVATE %s (baseline mode): exact statistics, no noise", site.name, what)
    elif site.policy is not None:
        site.policy.check_noise(noise, what=what)
    epsilon = charge(
        site,
        settings,
        new_charge(
            run_id=settings.run_id,
            server_round=STATS_ROUND,
            noise_multiplier=noise,
            sample_rate=1.0,
            steps=1,
            delta=settings.target_delta,
            kind=FEATURE_SUM,
        ),
        what=what,
    )
    projection = random_projection(dim, projection_dim, seed=settings.seed)
    u = prepare_features(feats.train_features, center=center, projection=projection)  # (N, d), norms <= 1
    exact = compute_stats(u, feats.train_labels, settings.num_classes)
    rng = np.random.default_rng(round_seed(site, settings, STATS_ROUND))  # seed None: OS entropy
    released = release_stats(exact, noise_multiplier=noise, rng=rng)
    log.info(
        "site %s: released sufficient statistics over %d dims of %d examples, sigma %.3f, cumulative epsilon %.3f",
        site.name,
        released.dim,
        len(u),
        noise,
        epsilon,
    )
    return StatsRelease(released, len(u), noise, epsilon, settings.target_delta)


def answer_stats_query(msg: Message, config: ConfigRecord, site: Site) -> RecordDict:
    """Reply to a `sufficient-stats` query with the noised statistics (float64) and the release's privacy metrics.

    The ClientApp's `query` has already checked the settings against the site's policy. The message may carry
    the federation's feature centre as the ArrayRecord `arrays` (tensor `center`).

    Raises:
        ReplyError: the query lacks `projection-dim`, or its centre is malformed.
    """
    settings = decode(RoundSettings, config)
    if not isinstance(config.get(k.PROJECTION_DIM), int) or isinstance(config[k.PROJECTION_DIM], bool):
        raise ReplyError(f"the {k.ACTION_SUFFICIENT_STATS} query needs an integer `{k.PROJECTION_DIM}`")
    center = None
    record = msg.content.array_records.get(k.ARRAYS)
    if record is not None and "center" in record:
        center = record["center"].numpy().astype(np.float32)
    release = sufficient_stats_round(site, settings, projection_dim=int(config[k.PROJECTION_DIM]), center=center)
    arrays = ArrayRecord({name: Array(np.ascontiguousarray(v)) for name, v in release.stats.arrays().items()})
    metrics = MetricRecord(
        {
            k.NUM_EXAMPLES: release.num_examples,
            k.EPSILON: release.epsilon,
            k.DELTA: release.delta,
            k.NOISE_MULTIPLIER: release.noise_multiplier,
        }
    )
    site_record = ConfigRecord({k.SITE_NAME: site.name, k.BACKBONE_FINGERPRINT: settings.backbone_fingerprint})
    return RecordDict({k.ARRAYS: arrays, k.METRICS: metrics, k.SITE: site_record})
