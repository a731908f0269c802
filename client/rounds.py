"""One round at a site, as plain functions: features -> DP head training -> privacy charge."""

from __future__ import annotations

import logging
import warnings
import zlib
from dataclasses import dataclass

import numpy as np

from fedtl.client.privacy_store import FEATURE_SUM, new_charge
from fedtl.client.site import Site, load_site_features
from fedtl.client.training import TrainResult, evaluate_head, steps_per_epoch, train_head
from fedtl.shared import constants as k
from fedtl.shared.errors import PrivacyBudgetError
from fedtl.shared.heads import build_head, load_head_arrays, normalize_features
from fedtl.shared.metrics import majority_rate
from fedtl.shared.privacy import PrivacyStep, compute_epsilon, find_noise_multiplier
from fedtl.shared.protocol import RoundSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainReport:
    """A site's training round: the new head tensors and its cumulative privacy spend."""

    result: TrainResult
    epsilon: float  # cumulative over every round the site ever ran, at `delta`
    delta: float


def plan_noise_multiplier(site: Site, settings: RoundSettings, *, sample_rate: float, steps_per_round: int) -> float:
    """Return this run's noise multiplier: the one given, or the one meeting target-epsilon over the run.

    The derived noise leaves room for every earlier run in the site's history, and is fixed at the
    first round of a run (later rounds read it back from the history), so all rounds of a run agree.

    Raises:
        PrivacyBudgetError: earlier runs already spent the target epsilon.
    """
    if settings.noise_multiplier >= 0:
        if settings.noise_multiplier == 0:
            warnings.warn("noise-multiplier is 0: this round releases non-private updates (epsilon = inf)")
        return settings.noise_multiplier
    store = site.privacy_store
    fixed = store.run_noise_multiplier(settings.run_id)
    if fixed is not None:
        return fixed
    return find_noise_multiplier(
        target_epsilon=settings.target_epsilon,
        target_delta=settings.target_delta,
        sample_rate=sample_rate,
        steps=steps_per_round * settings.num_rounds,
        history=store.history_outside_training(settings.run_id),
        accountant=settings.accountant,
    )


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
    store = site.privacy_store
    sample_rate, per_epoch = steps_per_epoch(len(feats.train_labels), settings.batch_size)
    steps = per_epoch * settings.local_epochs
    if settings.non_private:
        noise = None
        log.warning("site %s: NON-PRIVATE round %d (baseline mode): no clipping, no noise", site.name, server_round)
    else:
        noise = plan_noise_multiplier(site, settings, sample_rate=sample_rate, steps_per_round=steps)
        if noise > 0:
            check_budget(site, settings, PrivacyStep(noise, sample_rate, steps), what=f"round {server_round}")
    # Write-ahead: the round is paid for before it runs. Non-private rounds are recorded with
    # noise 0, so the site's epsilon honestly becomes infinite.
    store.charge(
        new_charge(
            run_id=settings.run_id,
            server_round=server_round,
            noise_multiplier=noise or 0.0,
            sample_rate=sample_rate,
            steps=steps,
            delta=settings.target_delta,
        )
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
    epsilon = store.epsilon(delta=settings.target_delta, accountant=settings.accountant)
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
    store = site.privacy_store
    noise = 0.0 if settings.non_private else noise_multiplier
    if noise > 0:
        check_budget(site, settings, PrivacyStep(noise, 1.0, 1), what="the feature-mean release")
    store.charge(
        new_charge(
            run_id=settings.run_id,
            server_round=0,
            noise_multiplier=noise,
            sample_rate=1.0,
            steps=1,
            delta=settings.target_delta,
            kind=FEATURE_SUM,
        )
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


def check_budget(site: Site, settings: RoundSettings, step: PrivacyStep, *, what: str) -> float:
    """Return the site's epsilon after `step`, refusing it when that exceeds target-epsilon.

    Raises:
        PrivacyBudgetError: the step would take the site past its budget (the message has the numbers).
    """
    history = site.privacy_store.history()  # read the ledger once
    projected = compute_epsilon(history + [step], delta=settings.target_delta, accountant=settings.accountant)
    # The planned noise meets the target exactly up to float rounding of the RDP sums.
    if projected > settings.target_epsilon * (1 + 1e-6):
        spent = compute_epsilon(history, delta=settings.target_delta, accountant=settings.accountant)
        raise PrivacyBudgetError(
            f"site {site.name} refuses {what}: its epsilon would reach {projected:.3f} > target-epsilon "
            f"{settings.target_epsilon} (delta {settings.target_delta}); spent so far {spent:.3f}. "
            "Raise the budget, or plan fewer rounds or more noise"
        )
    if projected >= 0.9 * settings.target_epsilon:
        log.warning(
            "site %s: %s brings epsilon to %.3f of target %.3g (budget nearly spent)",
            site.name,
            what,
            projected,
            settings.target_epsilon,
        )
    return projected
