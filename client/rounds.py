"""One round at a site, as plain functions: features -> DP head training -> privacy charge."""

from __future__ import annotations

import logging
import math
import warnings
import zlib
from dataclasses import dataclass

import numpy as np

from fedtl.client.ledger import FEATURE_SUM, PrivacyCharge, new_charge
from fedtl.client.site import Site, load_site_features
from fedtl.client.training import TrainResult, evaluate_head, steps_per_epoch, train_head
from fedtl.shared import constants as k
from fedtl.shared.heads import build_head, load_head_arrays, normalize_features
from fedtl.shared.metrics import majority_rate
from fedtl.shared.privacy import find_noise_multiplier
from fedtl.shared.protocol import RoundSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainReport:
    """A site's training round: the new head tensors and its cumulative privacy spend."""

    result: TrainResult
    epsilon: float  # cumulative over every round the site ever ran, at `delta`
    delta: float


def site_accountant(site: Site, settings: RoundSettings) -> str:
    """Return the accountant the site counts with: its policy's, or the run's for a simulated site."""
    return site.policy.accountant if site.policy is not None else settings.accountant


def plan_noise_multiplier(site: Site, settings: RoundSettings, *, sample_rate: float, steps_per_round: int) -> float:
    """Return this run's noise multiplier: the one given, or the one meeting target-epsilon over the run.

    The derived noise leaves room for every earlier run in the site's ledger, is never below the
    policy's `min-noise-multiplier`, and is fixed at the first round of a run (later rounds read it
    back from the ledger), so all rounds of a run agree.

    Raises:
        PrivacyBudgetError: earlier runs already spent the target epsilon.
    """
    if settings.noise_multiplier >= 0:
        if settings.noise_multiplier == 0:
            warnings.warn("noise-multiplier is 0: this round releases non-private updates (epsilon = inf)")
        return settings.noise_multiplier
    ledger = site.ledger
    fixed = ledger.run_noise_multiplier(settings.run_id)
    if fixed is not None:
        return fixed
    noise = find_noise_multiplier(
        target_epsilon=settings.target_epsilon,
        target_delta=settings.target_delta,
        sample_rate=sample_rate,
        steps=steps_per_round * settings.num_rounds,
        history=ledger.history_outside_training(settings.run_id),
        accountant=site_accountant(site, settings),
    )
    if site.policy is not None and noise < site.policy.min_noise_multiplier:
        log.info(
            "site %s: the run's budget allows noise %.3f; the policy's minimum %.3f is used (spends less)",
            site.name,
            noise,
            site.policy.min_noise_multiplier,
        )
        noise = site.policy.min_noise_multiplier
    return noise


def round_seed(site: Site, settings: RoundSettings, server_round: int) -> int | None:
    """Return the seed of a round's sampling and noise: reproducible in simulation, None (OS entropy) at real sites."""
    if site.simulation is None:
        return None
    # Simulation only: the noise is reproducible from the run seed, which a real server would know.
    return zlib.crc32(f"{settings.seed}/{site.name}/{server_round}".encode())


def train_round(
    site: Site,
    settings: RoundSettings,
    global_arrays: dict[str, np.ndarray],
    *,
    server_round: int,
    proximal_mu: float = 0.0,
) -> TrainReport:
    """Train the site's head for one round and return its tensors and cumulative epsilon.

    The round's privacy cost is charged to the site's history before training starts.

    Raises:
        PrivacyBudgetError: the round would take the site past target-epsilon.
        ReplyError: the global head tensors do not fit the announced head.
    """
    feats = load_site_features(site, settings)
    head = build_head(settings.head, feats.train_features.shape[1], settings.num_classes, hidden=settings.head_hidden)
    load_head_arrays(head, global_arrays, source="the server's global head")
    sample_rate, per_epoch = steps_per_epoch(len(feats.train_labels), settings.batch_size)
    steps = per_epoch * settings.local_epochs
    if settings.non_private:
        noise = None
        log.warning("site %s: NON-PRIVATE round %d (baseline mode): no clipping, no noise", site.name, server_round)
    else:
        noise = plan_noise_multiplier(site, settings, sample_rate=sample_rate, steps_per_round=steps)
    # Write-ahead: the round is paid for before it runs. Non-private rounds are recorded with
    # noise 0, so the site's epsilon honestly becomes infinite.
    charge(
        site,
        settings,
        new_charge(
            run_id=settings.run_id,
            server_round=server_round,
            noise_multiplier=noise or 0.0,
            sample_rate=sample_rate,
            steps=steps,
            delta=settings.target_delta,
        ),
        what=f"round {server_round} of run {settings.run_id}",
    )
    result = train_head(
        head,
        feats.train_features,
        feats.train_labels,
        epochs=settings.local_epochs,
        batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        max_grad_norm=settings.max_grad_norm,
        noise_multiplier=noise,
        seed=round_seed(site, settings, server_round),
        global_arrays=global_arrays,
        proximal_mu=proximal_mu,
    )
    epsilon = site.ledger.epsilon(delta=settings.target_delta, accountant=site_accountant(site, settings))
    log.info(
        "site %s round %d: loss %.4f, sigma %s, cumulative epsilon %.3f",
        site.name,
        server_round,
        result.train_loss,
        noise,
        epsilon,
    )
    return TrainReport(result=result, epsilon=epsilon, delta=settings.target_delta)


def feature_sum_round(site: Site, settings: RoundSettings, *, noise_multiplier: float) -> tuple[np.ndarray, int]:
    """Return the Gaussian-noised sum of the site's L2-normalised training features, and their count.

    Each normalised feature has norm 1, so adding or removing one example moves the sum by at most 1
    (L2 sensitivity 1); noise N(0, sigma^2 I) makes the release one Gaussian mechanism, which the
    accountant composes as one DP-SGD step at sample rate 1. It is charged before it is computed.
    With `non-private` the exact sum is released (labelled like every non-private result).

    Raises:
        PrivacyBudgetError: the release would take the site past target-epsilon.
    """
    feats = load_site_features(site, settings)
    noise = 0.0 if settings.non_private else noise_multiplier
    if site.policy is not None and not settings.non_private:
        site.policy.check_noise(noise, what="the feature-mean release")
    charge(
        site,
        settings,
        new_charge(
            run_id=settings.run_id,
            server_round=0,
            noise_multiplier=noise,
            sample_rate=1.0,
            steps=1,
            delta=settings.target_delta,
            kind=FEATURE_SUM,
        ),
        what=f"the feature-mean release of run {settings.run_id}",
    )
    z = normalize_features(feats.train_features)  # (N, D), every row norm 1
    seed = round_seed(site, settings, 0)
    rng = np.random.default_rng(seed)  # seed None: OS entropy
    total = z.astype(np.float64).sum(axis=0) + rng.normal(0.0, noise, size=z.shape[1])
    return total.astype(np.float32), len(z)


def evaluate_round(
    site: Site, settings: RoundSettings, global_arrays: dict[str, np.ndarray]
) -> tuple[dict[str, float], int]:
    """Return the global head's metrics on the site's local test split, and that split's size."""
    feats = load_site_features(site, settings)
    head = build_head(settings.head, feats.test_features.shape[1], settings.num_classes, hidden=settings.head_hidden)
    load_head_arrays(head, global_arrays, source="the server's global head")
    scores = evaluate_head(head, feats.test_features, feats.test_labels)
    scores[k.MAJORITY_RATE] = majority_rate(feats.test_labels)
    return scores, len(feats.test_labels)


def charge(site: Site, settings: RoundSettings, release: PrivacyCharge, *, what: str) -> float:
    """Charge `release` to the site's ledger before it happens, within the run's and the policy's budget.

    The run's target-epsilon is at most the policy's max-epsilon (larger requests are refused by
    `SitePolicy.check_settings`) and its delta at most the policy's, so staying within the run's
    target at its delta keeps the site within its lifetime budget too.

    Returns:
        The site's cumulative epsilon including `release`.

    Raises:
        PrivacyBudgetError: the release would take the site past its budget (the message has the numbers).
    """
    budget = math.inf if release.noise_multiplier == 0 else settings.target_epsilon
    projected = site.ledger.charge(
        release,
        max_epsilon=budget,
        delta=settings.target_delta,
        accountant=site_accountant(site, settings),
        what=f"{what} at site {site.name}",
    )
    if math.isfinite(budget) and projected >= 0.9 * budget:
        log.warning(
            "site %s: %s brings epsilon to %.3f of %.3g (budget nearly spent)", site.name, what, projected, budget
        )
    return projected
