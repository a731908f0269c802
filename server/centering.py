"""The federation's feature centre: the mean L2-normalised feature over all sites, from their noised sums.

The server picks the release's noise by a public rule (shared/centering.py: at most a share of the
target epsilon), each site checks it against its policy and charges it (client/centering.py), and the
server adds the sums up (post-processing) and drops a centre too noisy to help.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedtl.server.report import failure_reason, reply_site_name
from fedtl.server.secure_releases import secure_feature_center
from fedtl.server.setup import ask, query_sites
from fedtl.shared import constants as k
from fedtl.shared.centering import (
    CENTERING_BUDGET_SHARE,
    MAX_CENTER_NOISE_NORM,
    center_noise_norm,
    centering_noise_multiplier,
)
from fedtl.shared.config import RunConfig
from fedtl.shared.errors import FederationError

log = logging.getLogger(__name__)


def estimate_feature_center(
    grid: Grid, node_ids: list[int], config: ConfigRecord, cfg: RunConfig, *, dim: int, timeout: float
) -> np.ndarray:
    """Return the mean L2-normalised feature over all sites, from their Gaussian-noised sums.

    Each site charges its release to its own privacy budget (client/centering.py); the server
    only adds the noised sums up, which is post-processing.

    Raises:
        FederationError: no site released a usable sum (each site's reason is in the message).
    """
    if cfg.secure_aggregation:  # the server sees only the sum (server/secure_releases.py)
        return secure_feature_center(grid, node_ids, config, cfg, dim=dim, timeout=timeout)
    sigma = 0.0 if cfg.non_private else run_centering_noise(cfg)
    if sigma is None:
        log.warning(
            "feature centring off: no noise makes the centre release cost %.0f%% of target-epsilon %g or less; "
            "nothing is released",
            100 * CENTERING_BUDGET_SHARE,
            cfg.target_epsilon,
        )
        return np.zeros(dim, dtype=np.float32)
    total, count, used = collect_feature_sums(grid, node_ids, config, sigma=sigma, dim=dim, timeout=timeout)
    released = used
    noise = center_noise_norm(noise_multiplier=sigma, dim=dim, num_sites=released, count=count)
    if noise > MAX_CENTER_NOISE_NORM:
        log.warning(
            "feature centring off: the noise expected in the mean (norm %.2f, sigma %.2f over %d examples) exceeds "
            "%.2f, so the estimate would hurt; the release stays charged (raise the budget or pool more examples)",
            noise,
            sigma,
            count,
            MAX_CENTER_NOISE_NORM,
        )
        return np.zeros(dim, dtype=np.float32)
    log.info("feature mean estimated from %d examples at %d sites (noise norm %.3f)", count, released, noise)
    return (total / count).astype(np.float32)


def collect_feature_sums(
    grid: Grid,
    node_ids: list[int],
    config: ConfigRecord,
    *,
    sigma: float,
    dim: int,
    timeout: float,
    projection: np.ndarray | None = None,
) -> tuple[np.ndarray, int, int]:
    """Ask every site for its noised feature sum at noise `sigma`; return (sum of sums, examples, sites used).

    With a `projection` (dim, D) the sites sum their projected, clipped features (client/centering.py).
    Sums are added in site order, so the float sum does not depend on the order replies arrived in.

    Raises:
        FederationError: no site released a usable sum (each site's reason is in the message).
    """
    request = ask(config, k.ACTION_FEATURE_SUM, **{k.CENTERING_NOISE_MULTIPLIER: sigma})
    content = RecordDict({k.CONFIG: request})
    if projection is not None:
        content[k.ARRAYS] = ArrayRecord({"projection": Array(np.asarray(projection, dtype=np.float32))})
    replies = query_sites(grid, node_ids, content, timeout)
    total, count, used, reasons = None, 0, 0, []
    for reply in sorted(replies.values(), key=lambda m: (reply_site_name(m), m.metadata.src_node_id)):
        reason = failure_reason(reply)
        if reason is not None:
            log.warning("site %s did not release its feature sum: %s", reply_site_name(reply), reason)
            reasons.append(f"{reply_site_name(reply)}: {reason}")
            continue
        problem = _check_feature_sum(reply, dim, sigma=sigma)
        if problem:
            log.warning("site %s sent an unusable feature sum, ignored: %s", reply_site_name(reply), problem)
            reasons.append(f"{reply_site_name(reply)}: unusable feature sum ({problem})")
            continue
        arr = reply.content.array_records[k.ARRAYS][k.FEATURE_SUM].numpy().astype(np.float64)  # (dim,)
        n = int(reply.content.metric_records[k.METRICS][k.NUM_EXAMPLES])
        total = arr if total is None else total + arr
        count += n
        used += 1
    if total is None:
        raise FederationError(
            f"no site released its feature sum, so run {config[k.RUN_ID]} cannot start: "
            + ("; ".join(reasons) or "no site answered in time")
        )
    return total, count, used


def run_centering_noise(cfg: RunConfig) -> float | None:
    """Return the noise multiplier of the run's feature-centre release, None: no release (fedtl.shared.centering)."""
    sigma = centering_noise_multiplier(
        requested=cfg.centering_noise_multiplier,
        target_epsilon=cfg.target_epsilon,
        target_delta=cfg.target_delta,
        accountant=cfg.accountant,
    )
    if sigma != cfg.centering_noise_multiplier:
        log.info(
            "feature-centre release: noise %.2f instead of %.2f, so it spends at most %.0f%% of target-epsilon %g",
            sigma,
            cfg.centering_noise_multiplier,
            100 * CENTERING_BUDGET_SHARE,
            cfg.target_epsilon,
        )
    return sigma


def _check_feature_sum(reply: Message, dim: int, *, sigma: float) -> str | None:
    """Return what is wrong with a feature-sum reply, or None.

    A sum of n unit vectors has norm at most n; the Gaussian noise adds about sigma * sqrt(D), so a norm
    beyond n + sigma * (sqrt(D) + 10) is implausible (the noise norm exceeds its mean by 10 sigma with
    probability far below 1e-20).
    """
    arrays = reply.content.array_records.get(k.ARRAYS)
    metrics = reply.content.metric_records.get(k.METRICS)
    if arrays is None or k.FEATURE_SUM not in arrays or metrics is None or k.NUM_EXAMPLES not in metrics:
        return f"it needs `{k.ARRAYS}`/`{k.FEATURE_SUM}` and `{k.METRICS}`/`{k.NUM_EXAMPLES}`"
    arr = arrays[k.FEATURE_SUM].numpy()
    n = metrics[k.NUM_EXAMPLES]
    if tuple(arr.shape) != (dim,):
        return f"feature sum has shape {tuple(arr.shape)}, expected ({dim},)"
    if isinstance(n, (list, bool)) or not n > 0:
        return f"`{k.NUM_EXAMPLES}` must be a count > 0, got {n!r}"
    if not np.all(np.isfinite(arr)):
        return "feature sum contains NaN or Inf"
    limit = float(n) + sigma * (math.sqrt(dim) + 10.0) + 1e-3
    norm = float(np.linalg.norm(arr.astype(np.float64)))
    if norm > limit:
        return f"feature sum norm {norm:.4g} > {limit:.4g}, impossible for {n} unit vectors plus the noise"
    return None
