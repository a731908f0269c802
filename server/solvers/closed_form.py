"""The closed-form head solver: every site releases noised sufficient statistics once; the server sums and solves.

Each site charges its release to its own ledger before making it (client/solvers/closed_form.py); the
server only validates, adds and solves (ridge or LDA, shared/closed_form.py), which is post-processing.
One round, no DP-SGD.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict

from fedtl.server.report import failure_reason, reply_site_name
from fedtl.server.secagg import secure_sum
from fedtl.server.secure_releases import SUFFICIENT_STATS, secure_centre_history, secure_noise, trust_record
from fedtl.server.setup import ask, query_sites
from fedtl.server.solvers.base import Federation, SolverResult, plan_as_configured
from fedtl.shared import constants as k
from fedtl.shared.closed_form import (
    SENSITIVITY,
    SufficientStats,
    check_projection_dim,
    check_release,
    random_projection,
    solve_head,
    sum_stats,
)
from fedtl.shared.config import RunConfig
from fedtl.shared.cut import Cut
from fedtl.shared.distributed_noise import quantization_shrink
from fedtl.shared.errors import FederationError
from fedtl.shared.secure_sum import read_stats, stats_length, stats_scale, stats_sensitivities

log = logging.getLogger(__name__)

STATS_ROUND = 1  # the one round of a closed-form run


class ClosedFormSolver:
    """One noised release of sufficient statistics per site, solved once (ridge or LDA)."""

    @staticmethod
    def configure(cfg: RunConfig) -> RunConfig:
        """Return the config of a closed-form run: one round (one release, one solve), projection-dim checked.

        Called before any site is asked anything, so a projection the backbone cannot take costs no release.

        Raises:
            ConfigError: projection-dim is not below the backbone's feature dimension.
        """
        if cfg.projection_dim:
            check_projection_dim(Cut.of(cfg, backbone_fingerprint="unchecked").feature_dim, cfg.projection_dim)
        return cfg.replace(num_rounds=1)

    plan = staticmethod(plan_as_configured)

    def fit(self, fed: Federation) -> SolverResult:
        """Fit the head in one release, record that round (central scores, per-site epsilon) and checkpoint nothing."""
        arrays = fit_closed_form_head(fed)
        record = ArrayRecord({name: Array(v) for name, v in arrays.items()})
        scores = fed.central(record) if fed.central is not None else None
        fed.recorder.finish_round(STATS_ROUND, scores)
        return SolverResult(record)


def fit_closed_form_head(fed: Federation) -> "OrderedDict[str, np.ndarray]":
    """Ask every site for its noised sufficient statistics once, sum them in site order, and solve the head.

    Each site charges its release to its own ledger before making it (client/solvers/closed_form.py); the
    server only validates, adds and solves, which is post-processing. A reply that is a refusal, an error, or
    fails `check_release` (names, shapes, finite values, symmetry, a plausible norm) is logged and left out.

    `fed` gives the sites taking part, the round config they receive, the run configuration (closed-form,
    closed-form-ridge, projection-dim, seed), D (the backbone's feature dimension), C (its labels), the
    feature centre sent to the sites (`fed.initial["center"]`, absent: none) and the recorder that each
    accepted site's cumulative epsilon and delta go into.

    Returns:
        The tensors of a "linear" head (`layers.0.weight` (C, D), `layers.0.bias` (C,), `center` (D,)).

    Raises:
        FederationError: fewer sites than min-train-sites (at least one) released usable statistics.
    """
    if fed.cfg.secure_aggregation:  # the server sees only the sum (server/secure_releases.py)
        return fit_secure_closed_form_head(fed)
    grid, node_ids, config, cfg, recorder = fed.grid, fed.node_ids, fed.config, fed.cfg, fed.recorder
    feature_dim, num_classes, center = fed.backbone.feature_dim, len(fed.label_names), fed.initial.get("center")
    timeout = cfg.round_timeout
    projection = random_projection(feature_dim, cfg.projection_dim, seed=cfg.seed)
    dim = feature_dim if projection is None else cfg.projection_dim
    content = RecordDict({k.CONFIG: ask(config, k.ACTION_SUFFICIENT_STATS)})
    if center is not None:
        content[k.ARRAYS] = ArrayRecord({"center": Array(np.asarray(center, dtype=np.float32))})
    replies = query_sites(grid, node_ids, content, timeout).values()
    parts: list[SufficientStats] = []
    examples = 0
    # In site order, so the float sum does not depend on the order replies arrived in.
    for reply in sorted(replies, key=lambda m: (reply_site_name(m), m.metadata.src_node_id)):
        name = reply_site_name(reply)
        problem = failure_reason(reply) or _reply_problem(reply, dim=dim, num_classes=num_classes)
        if problem:
            log.warning("site %s: no usable sufficient statistics, left out: %s", name, problem)
            continue
        arrays = {key: a.numpy().astype(np.float64) for key, a in reply.content.array_records[k.ARRAYS].items()}
        metrics = reply.content.metric_records[k.METRICS]
        noise = float(metrics[k.NOISE_MULTIPLIER])
        parts.append(
            SufficientStats(
                gram=arrays[k.GRAM],
                class_sums=arrays[k.CLASS_SUMS],
                class_counts=arrays[k.CLASS_COUNTS],
                noise_std=noise * SENSITIVITY,
            )
        )
        examples += int(metrics[k.NUM_EXAMPLES])
        if recorder is not None:
            recorder.site_epsilon[name] = float(metrics[k.EPSILON])
            recorder.site_delta[name] = float(metrics[k.DELTA])
        log.info("site %s released sufficient statistics: sigma %.3f, epsilon %.3f", name, noise, metrics[k.EPSILON])
    if len(parts) < max(cfg.min_train_sites, 1):
        raise FederationError(
            f"only {len(parts)} of {len(node_ids)} sites released usable sufficient statistics "
            f"(min-train-sites {cfg.min_train_sites}); see the warnings above for each site's reason"
        )
    total = sum_stats(parts)
    log.info(
        "closed-form %s head from %d sites, %d examples, %d dims, noise std %.3f per entry, ridge %g",
        cfg.closed_form,
        len(parts),
        examples,
        dim,
        total.noise_std,
        cfg.closed_form_ridge,
    )
    return solve_configured_head(cfg, total, feature_dim=feature_dim, center=center, projection=projection)


def _reply_problem(reply: Message, *, dim: int, num_classes: int) -> str | None:
    """Return what is wrong with a stats reply's records, or None."""
    content = reply.content
    needed = (k.NUM_EXAMPLES, k.EPSILON, k.DELTA, k.NOISE_MULTIPLIER)
    if k.ARRAYS not in content.array_records or k.METRICS not in content.metric_records:
        return f"the reply needs the ArrayRecord `{k.ARRAYS}` and the MetricRecord `{k.METRICS}`"
    metrics = content.metric_records[k.METRICS]
    if any(key not in metrics or isinstance(metrics[key], list) for key in needed):
        return f"the reply's metrics {sorted(metrics)} need one number for each of {', '.join(needed)}"
    if math.isnan(float(metrics[k.EPSILON])):
        return "`epsilon` is NaN"
    arrays = {key: a.numpy() for key, a in content.array_records[k.ARRAYS].items()}
    return check_release(
        arrays,
        dim=dim,
        num_classes=num_classes,
        num_examples=float(metrics[k.NUM_EXAMPLES]),
        noise_multiplier=float(metrics[k.NOISE_MULTIPLIER]),
    )


def fit_secure_closed_form_head(fed: Federation) -> "OrderedDict[str, np.ndarray]":
    """Securely sum the sites' quantised, Skellam-noised sufficient statistics once and solve the head.

    The noise multiplier is the run's `noise-multiplier` when fixed, else the smallest that keeps the run's
    centre release (if any) plus this one within target-epsilon: a public rule every site checks through its
    release path (policy, budget) before adding its share.

    Raises:
        FederationError: the secure sum failed, or fewer than min-train-sites sites are in it.
    """
    grid, node_ids, config, cfg, recorder = fed.grid, fed.node_ids, fed.config, fed.cfg, fed.recorder
    feature_dim, num_classes, center = fed.backbone.feature_dim, len(fed.label_names), fed.initial.get("center")
    timeout = cfg.round_timeout
    projection = random_projection(feature_dim, cfg.projection_dim, seed=cfg.seed)
    dim = feature_dim if projection is None else cfg.projection_dim
    history, sigma_centre = secure_centre_history(cfg, feature_dim)
    sensitivities = lambda sigma: stats_sensitivities(dim, stats_scale(sigma))  # noqa: E731
    sigma = secure_noise(cfg, sensitivities, history=history)
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
