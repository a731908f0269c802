"""A site's answer to the server's `rank` query: transferability scores of one backbone on its cached features.

PRIVACY SHORTCUT: the scores are exact (noise-free) functions of the site's private features and labels,
released without differential privacy and NOT charged to the site's epsilon, like federated evaluation
metrics. A site releases them only where its policy sets `release-evaluation-metrics = true` (simulated
sites: always), and it logs a warning each time it does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from fedtl.client.inputs import load_site_inputs
from fedtl.client.site import Site
from fedtl.client.transferability import hscore, logme_score
from fedtl.shared import constants as k
from fedtl.shared.cut import Cut
from fedtl.shared.heads import normalize_features
from fedtl.shared.protocol import RoundSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteScores:
    """One site's transferability scores of one backbone, and the training examples they were computed on."""

    num_examples: int
    scores: dict[str, float]  # estimator (k.RANK_ESTIMATORS) -> score, larger = predicted to transfer better


def score_site(site: Site, settings: RoundSettings) -> SiteScores:
    """Return LogME and H-score of the announced backbone on the site's training split.

    The features are L2-normalised per example first, as the head's first step does (shared/heads.py),
    so the scores judge what the head is trained on. Extracting them is the same cached step as training's.

    Raises:
        BackboneError: the backbone is not in the site's cache (the server installs it first).
        DataError: the site's data is unusable (labels differ from the federation's, too few examples).
    """
    inputs = load_site_inputs(site, settings, cut=Cut.of(settings).at_end_cut())
    z = normalize_features(inputs.train_x).astype(np.float64)  # (N, D), rows of norm 1
    labels = inputs.train_y
    scores = {k.LOGME: logme_score(z, labels), k.H_SCORE: hscore(z, labels)}
    # PRIVACY SHORTCUT (flagged here and in the log): exact scores and the example count leave the site, no DP.
    log.warning(
        "site %s releases transferability scores of backbone %s (%s) on %d examples WITHOUT differential privacy: "
        "exact functions of its private features and labels, not covered by its epsilon",
        site.name,
        settings.backbone_name,
        ", ".join(f"{name} {value:.4g}" for name, value in scores.items()),
        len(labels),
    )
    return SiteScores(num_examples=len(labels), scores=scores)
