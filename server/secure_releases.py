"""The feature centre and the closed form's statistics through the secure sum, with distributed Skellam noise.

With `secure-aggregation = true` the server never sees one site's feature sum or statistics: it picks the
central noise multiplier by a public rule (the smallest that keeps the run's releases within target-epsilon,
shared/privacy.find_skellam_noise_multiplier), asks the sites for a secure sum (server/secagg.py), and reads
the sum back from integers (shared/secure_sum.py). Each site adds 1 / t of the noise, so the sum carries the
noise one trusted curator would add as long as at least t summed sites are honest (`secagg-honest-sites`).
Solving and centring are post-processing of that sum, as without secure aggregation.

A securely summed release cannot be checked site by site (the server sees none of them): a site that sends
garbage corrupts the sum unnoticed, a known limit of secure aggregation without zero-knowledge proofs.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import ConfigRecord
from flwr.serverapp import Grid

from fedtl.server.secagg import SecureSumResult, secure_sum
from fedtl.shared import constants as k
from fedtl.shared.centering import CENTERING_BUDGET_SHARE, MAX_CENTER_NOISE_NORM
from fedtl.shared.config import RunConfig
from fedtl.shared.distributed_noise import quantization_shrink
from fedtl.shared.errors import PrivacyBudgetError
from fedtl.shared.privacy import PrivacyStep, compute_epsilon, find_skellam_noise_multiplier
from fedtl.shared.secure_sum import (
    feature_sum_scale,
    feature_sum_sensitivities,
    read_feature_sum,
)

log = logging.getLogger(__name__)

FEATURE_SUM = "feature-sum"  # client/secure_releases.RELEASES
SUFFICIENT_STATS = "sufficient-stats"
MECHANISM = "distributed Skellam noise (Agarwal et al. 2021) under SecAgg+ secure aggregation (Bell et al. 2020)"


def skellam_step(
    noise_multiplier: float,
    sensitivities: Callable[[float], tuple[float, float]],
    *,
    sample_rate: float = 1.0,
    steps: int = 1,
) -> PrivacyStep:
    """Return the accountant's view of `steps` Skellam releases at `noise_multiplier` (its scale follows from it)."""
    l2, l1 = sensitivities(noise_multiplier)
    return PrivacyStep(noise_multiplier, sample_rate, steps, l2_sensitivity=l2, l1_sensitivity=l1)


def plan_secure_noise(
    *,
    target_epsilon: float,
    target_delta: float,
    sensitivities: Callable[[float], tuple[float, float]],
    history: list[PrivacyStep] = (),  # type: ignore[assignment]
    sample_rate: float = 1.0,
    steps: int = 1,
) -> float:
    """Return the smallest noise multiplier (to 0.005) whose Skellam release keeps `history` + it within budget.

    `steps` releases, each on a Poisson sample at `sample_rate` (the secure DP-SGD steps), are planned together.

    The quantisation scale, hence the integer sensitivities, follows from the noise (shared/secure_sum: finer
    for less noise); the search is redone at the scale its answer implies until both agree (a coarser scale
    only adds to the integers' surcharge, so the noise only grows and the scale only falls: a few passes).

    Raises:
        PrivacyBudgetError: no noise meets the target after `history`.
    """
    search = functools.partial(
        find_skellam_noise_multiplier,
        target_epsilon=target_epsilon,
        target_delta=target_delta,
        history=history,
        sample_rate=sample_rate,
        steps=steps,
    )
    sigma = 1.0
    for _ in range(16):
        l2, l1 = sensitivities(sigma)
        found = search(l2_sensitivity=l2, l1_sensitivity=l1)
        if sensitivities(found) == (l2, l1):
            return found
        sigma = found
    raise PrivacyBudgetError(f"the secure release's noise and quantisation scale did not settle near {sigma:.3f}")


def secure_noise(cfg: RunConfig, sensitivities: Callable[[float], tuple[float, float]], **planned: Any) -> float:
    """Return a secure release's noise multiplier: 0 for a non-private run, the run's fixed `noise-multiplier`, or
    the smallest that keeps the planned release within target epsilon (`plan_secure_noise`: `history`,
    `sample_rate`, `steps`)."""
    if cfg.non_private:
        return 0.0
    if cfg.noise_multiplier is not None:
        return float(cfg.noise_multiplier)
    return plan_secure_noise(
        target_epsilon=cfg.target_epsilon, target_delta=cfg.target_delta, sensitivities=sensitivities, **planned
    )


def centre_sensitivities(dim: int) -> Callable[[float], tuple[float, float]]:
    """Return noise multiplier -> integer sensitivities of the feature-sum release over `dim` features."""
    return lambda sigma: feature_sum_sensitivities(dim, feature_sum_scale(sigma))


def secure_centering_noise(cfg: RunConfig, dim: int) -> float | None:
    """Return the centre release's noise: `centering-noise-multiplier`, or more so that it costs <= the budget share.

    The public rule of shared/centering.py with the Skellam accountant; None: no noise makes one release that
    cheap, so nothing is released and the head uses no centre.
    """
    share = CENTERING_BUDGET_SHARE * cfg.target_epsilon
    requested = cfg.centering_noise_multiplier
    step = skellam_step(requested, centre_sensitivities(dim))
    if compute_epsilon([step], delta=cfg.target_delta) <= share:
        return requested
    try:
        return plan_secure_noise(
            target_epsilon=share, target_delta=cfg.target_delta, sensitivities=centre_sensitivities(dim)
        )
    except PrivacyBudgetError:
        return None


def secure_feature_center(
    grid: Grid, node_ids: list[int], config: ConfigRecord, cfg: RunConfig, *, dim: int, timeout: float
) -> np.ndarray:
    """Return the mean L2-normalised feature over all sites from their secure sum (no site's sum is seen).

    Raises:
        FederationError: the secure sum failed (too few sites at some stage; each site's reason is logged).
    """
    sigma = 0.0 if cfg.non_private else secure_centering_noise(cfg, dim)
    if sigma is None:
        log.warning(
            "feature centring off: no noise makes the centre release cost %.0f%% of target-epsilon %g or less",
            100 * CENTERING_BUDGET_SHARE,
            cfg.target_epsilon,
        )
        return np.zeros(dim, dtype=np.float32)
    result = secure_sum(
        grid,
        node_ids,
        config,
        release=FEATURE_SUM,
        length=dim,
        honest_sites=cfg.secagg_honest_sites,
        noise_multiplier=sigma,
        timeout=timeout,
    )
    scale = feature_sum_scale(sigma)
    shrink = quantization_shrink(dim, scale)
    count = sum(int(r.content.metric_records[k.METRICS][k.NUM_EXAMPLES]) for r in result.replies.values())
    total = read_feature_sum(result.total, scale, shrink)  # (D,)
    # Each of the a summed sites added variance (sigma gamma)^2 / t, in units of gamma c per feature.
    noise = sigma * math.sqrt(len(result.replies) / result.honest_sites) / shrink * math.sqrt(dim) / max(count, 1)
    if count <= 0 or noise > MAX_CENTER_NOISE_NORM:
        log.warning(
            "feature centring off: the noise expected in the securely summed mean (norm %.2f over %d examples) "
            "exceeds %.2f; the release stays charged",
            noise,
            count,
            MAX_CENTER_NOISE_NORM,
        )
        return np.zeros(dim, dtype=np.float32)
    log.info(
        "feature mean from a secure sum of %d sites, %d examples (noise norm %.3f)", len(result.replies), count, noise
    )
    return (total / count).astype(np.float32)


def trust_record(
    cfg: RunConfig,
    result: SecureSumResult,
    *,
    sigma: float,
    sigma_centre: float | None,
    history: list[PrivacyStep],
    sensitivities: Callable[[float], tuple[float, float]],
    sample_rate: float = 1.0,
    steps: int = 1,
) -> dict[str, Any]:
    """Return what the summary and the model card state next to epsilon: the assumption it holds under.

    `epsilon-if-alone` is the run's epsilon for a site if every other site colluded with the server: then only
    its own share, variance 1 / t of the noise (noise multiplier / sqrt(t)), protects it.
    """
    t = result.honest_sites
    released = history + (
        [skellam_step(sigma, sensitivities, sample_rate=sample_rate, steps=steps)] if sigma > 0 else []
    )
    alone = [dataclasses.replace(s, noise_multiplier=s.noise_multiplier / math.sqrt(t)) for s in released]
    eps_alone = compute_epsilon(alone, delta=cfg.target_delta) if sigma > 0 else math.inf
    return {
        "mechanism": MECHANISM,
        "honest-sites": t,
        "sites": result.num_sites,
        "sites-in-sum": len(result.replies),
        "threshold": result.threshold,
        "noise-multiplier": sigma,
        "centering-noise-multiplier": sigma_centre,
        "epsilon-if-alone": eps_alone,
        "dropped": dict(result.dropped),
        "assumption": (
            f"each site's epsilon holds if at least {t} of the {result.num_sites} sites of each secure sum are honest "
            "(they add their noise share and do not collude with the server); the server, and any sites colluding "
            "with it, learn only the sum of the summed sites' releases. If every other site colluded with the "
            f"server, a site's epsilon for this run would be {eps_alone:.3f}"
        ),
    }


def secure_centre_history(cfg: RunConfig, feature_dim: int) -> tuple[list[PrivacyStep], float | None]:
    """Return the run's securely summed centre release as the accountant sees it (empty without one)."""
    if cfg.non_private or not cfg.feature_centering:
        return [], None
    sigma = secure_centering_noise(cfg, feature_dim)
    if sigma is None:
        return [], None
    return [skellam_step(sigma, centre_sensitivities(feature_dim))], sigma
