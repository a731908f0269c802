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
import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedtl.server.report import RunRecorder, reply_site_name
from fedtl.server.secagg import SecureSumResult, secure_sum
from fedtl.shared import constants as k
from fedtl.shared.centering import CENTERING_BUDGET_SHARE, MAX_CENTER_NOISE_NORM
from fedtl.shared.closed_form import SENSITIVITY, random_projection, solve_head
from fedtl.shared.config import RunConfig
from fedtl.shared.distributed_noise import quantization_shrink
from fedtl.shared.errors import FederationError, PrivacyBudgetError
from fedtl.shared.privacy import PrivacyStep, compute_epsilon, find_skellam_noise_multiplier
from fedtl.shared.secure_sum import (
    feature_sum_scale,
    feature_sum_sensitivities,
    read_feature_sum,
    read_stats,
    stats_length,
    stats_scale,
    stats_sensitivities,
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
    sigma = 1.0
    for _ in range(16):
        l2, l1 = sensitivities(sigma)
        found = find_skellam_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            l2_sensitivity=l2,
            l1_sensitivity=l1,
            history=history,
            sample_rate=sample_rate,
            steps=steps,
        )
        if sensitivities(found) == (l2, l1):
            return found
        sigma = found
    raise PrivacyBudgetError(f"the secure release's noise and quantisation scale did not settle near {sigma:.3f}")


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


def fit_secure_closed_form_head(
    grid: Grid,
    node_ids: list[int],
    config: ConfigRecord,
    cfg: RunConfig,
    *,
    feature_dim: int,
    num_classes: int,
    center: np.ndarray | None,
    recorder: RunRecorder | None,
    timeout: float,
) -> "OrderedDict[str, np.ndarray]":
    """Securely sum the sites' quantised, Skellam-noised sufficient statistics once and solve the head.

    The noise multiplier is the run's `noise-multiplier` when fixed, else the smallest that keeps the run's
    centre release (if any) plus this one within target-epsilon: a public rule every site checks through its
    release path (policy, budget) before adding its share.

    Raises:
        FederationError: the secure sum failed, or fewer than min-train-sites sites are in it.
    """
    projection = random_projection(feature_dim, cfg.projection_dim, seed=cfg.seed)
    dim = feature_dim if projection is None else cfg.projection_dim
    history, sigma_centre = _centre_history(cfg, feature_dim)
    sensitivities = lambda sigma: stats_sensitivities(dim, stats_scale(sigma))  # noqa: E731
    if cfg.non_private:
        sigma = 0.0
    elif cfg.noise_multiplier is not None:
        sigma = float(cfg.noise_multiplier)
    else:
        sigma = plan_secure_noise(
            target_epsilon=cfg.target_epsilon,
            target_delta=cfg.target_delta,
            sensitivities=sensitivities,
            history=history,
        )
    arrays = None
    if center is not None:
        arrays = ArrayRecord({"center": Array(np.asarray(center, dtype=np.float32))})
    result = secure_sum(
        grid,
        node_ids,
        config,
        release=SUFFICIENT_STATS,
        length=stats_length(dim, num_classes),
        honest_sites=cfg.secagg_honest_sites,
        noise_multiplier=sigma,
        arrays=arrays,
        timeout=timeout,
    )
    if len(result.replies) < max(cfg.min_train_sites, 1):
        raise FederationError(
            f"only {len(result.replies)} sites are in the secure sum of sufficient statistics "
            f"(min-train-sites {cfg.min_train_sites})"
        )
    scale = stats_scale(sigma)
    shrink = quantization_shrink(dim, scale)
    summed = len(result.replies)
    noise_std = sigma * SENSITIVITY * math.sqrt(summed / result.honest_sites) / shrink**2
    stats = read_stats(result.total, dim=dim, num_classes=num_classes, scale=scale, shrink=shrink, noise_std=noise_std)
    examples = 0
    for reply in result.replies.values():
        metrics = reply.content.metric_records[k.METRICS]
        examples += int(metrics[k.NUM_EXAMPLES])
        if recorder is not None:
            recorder.site_epsilon[reply_site_name(reply)] = float(metrics[k.EPSILON])
            recorder.site_delta[reply_site_name(reply)] = float(metrics[k.DELTA])
    if recorder is not None:
        recorder.trust.update(
            trust_record(
                cfg, result, sigma=sigma, sigma_centre=sigma_centre, history=history, sensitivities=sensitivities
            )
        )
    log.info(
        "closed-form %s head from a secure sum of %d of %d sites (t = %d honest assumed), %d examples, %d dims, "
        "noise std %.3f per entry",
        cfg.closed_form,
        summed,
        result.num_sites,
        result.honest_sites,
        examples,
        dim,
        stats.noise_std,
    )
    return solve_configured_head(cfg, stats, feature_dim=feature_dim, center=center, projection=projection)


def solve_configured_head(cfg: RunConfig, stats, *, feature_dim: int, center, projection):  # type: ignore[no-untyped-def]
    """Return the closed-form head of `cfg` (method, ridge) solved from summed statistics, plain or secure."""
    return solve_head(
        stats,
        method=cfg.closed_form,
        ridge=cfg.closed_form_ridge,
        feature_dim=feature_dim,
        center=center,
        projection=projection,
    )


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


def _centre_history(cfg: RunConfig, feature_dim: int) -> tuple[list[PrivacyStep], float | None]:
    """Return the run's securely summed centre release as the accountant sees it (empty without one)."""
    if cfg.non_private or not cfg.feature_centering:
        return [], None
    sigma = secure_centering_noise(cfg, feature_dim)
    if sigma is None:
        return [], None
    return [skellam_step(sigma, centre_sensitivities(feature_dim))], sigma
