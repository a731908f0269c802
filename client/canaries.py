"""Audit canaries in a simulated site's data: mislabelled held-out images, each included with probability 1/2.

The one-run audit (Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1) Training Run") needs m
examples whose inclusion in training is decided by independent fair coins the auditor can reproduce. With
`audit-canaries = m`, simulated site 0 (CANARY_SITE) draws m images from the server's held-out test split
(held out of every site, so no site already trains on them), gives each a random WRONG label, and appends
those whose coin came up heads to its training split, in canary order. The coins and labels come from the
run seed alone (`draw_canaries`), so `fedtl audit` reconstructs them from the run's config.

Why mislabelled real images: the head learns from frozen backbone features, so a canary must be an image
the site's own pipeline extracts (feature-space canaries would bypass it). A correctly labelled image is
predicted well whether or not it was trained on (weak signal); with a wrong label the head predicts its
true class unless the canary itself was learned, so its loss on the wrong label separates IN from OUT per
canary. Synthetic images (noise) were rejected: the backbone maps them to nearly the same feature, so their
random labels conflict and their signals interfere.

Real sites never alter their data: a real site asked for canaries refuses (`refuse_canaries`).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedtl.client.policy import PolicyRefusal
from fedtl.shared.data import ImageDataset
from fedtl.shared.errors import ConfigError

CANARY_SITE = 0  # partition id of the simulated site that holds the canaries
CANARY_STREAM = zlib.crc32(b"fedtl-audit-canaries")  # keeps the canaries' random stream apart from the run's others


@dataclass(frozen=True)
class Canaries:
    """The canaries of one run: which held-out images, the wrong label each is trained with, and its coin."""

    indices: np.ndarray  # (m,) positions in the server's held-out test split
    labels: np.ndarray  # (m,) int64 wrong labels, never the image's own
    included: np.ndarray  # (m,) bool: appended to site 0's training split

    def __len__(self) -> int:
        """Number of canaries m."""
        return int(self.indices.shape[0])


def draw_canaries(pool_labels: np.ndarray, num_classes: int, *, count: int, seed: int) -> Canaries:
    """Return `count` canaries drawn from a pool of held-out examples, reproducibly from the run seed.

    Each canary is a distinct pool example with a label drawn uniformly from the other classes, included
    independently with probability 1/2 (the auditor's secret bits; independent of the data and the model).

    Raises:
        ConfigError: `count` exceeds the pool, or there are fewer than 2 classes to mislabel with.
    """
    pool_labels = np.asarray(pool_labels, dtype=np.int64)
    if count < 1 or count > len(pool_labels):
        raise ConfigError(
            f"`audit-canaries` must be between 1 and the {len(pool_labels)} images of the server's held-out test "
            f"split (the canaries are drawn from it), got {count}; lower it or raise `test-fraction`"
        )
    if num_classes < 2:
        raise ConfigError(f"canaries get a wrong label, which needs >= 2 classes; the data has {num_classes}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, CANARY_STREAM]))
    indices = rng.choice(len(pool_labels), size=count, replace=False)
    labels = (pool_labels[indices] + rng.integers(1, num_classes, size=count)) % num_classes
    included = rng.random(count) < 0.5
    return Canaries(indices.astype(np.int64), labels.astype(np.int64), included)


def add_canaries(train: ImageDataset, pool: ImageDataset | None, *, count: int, seed: int) -> ImageDataset:
    """Return site 0's training split with the included canaries of the run appended (in canary order).

    The result's fingerprint differs from `train`'s, so the site's feature cache keys the canaried data
    apart from the clean data. Site ids are dropped: the partition is already made.

    Raises:
        ConfigError: the data has no held-out test split to draw canaries from, or `count` is too large.
    """
    if pool is None or len(pool) == 0:
        raise ConfigError(
            "`audit-canaries` draws the canaries from the server's held-out test split, but the data has none; "
            "use data with a test split (or one that `test-fraction` splits), or set audit-canaries = 0"
        )
    canaries = draw_canaries(pool.labels, len(pool.label_names), count=count, seed=seed)
    chosen = canaries.indices[canaries.included]
    return ImageDataset(
        images=np.concatenate([train.images, pool.images[chosen]]),
        labels=np.concatenate([train.labels, canaries.labels[canaries.included]]),
        label_names=train.label_names,
        source=f"{train.source} + {len(chosen)} audit canaries",
    )


def requested_canaries(simulation: Any) -> int:
    """Return the canary count the server asked for in its simulation settings (0 when they carry none).

    Read leniently because `audit-canaries` travels in `SimulationSettings`: settings of a server that
    does not send the field ask for no canaries.
    """
    return int(getattr(simulation, "audit_canaries", 0) or 0)


def refuse_canaries(site_name: str, count: int) -> None:
    """Refuse a request for audit canaries at a real site (policy): its data is never altered.

    Raises:
        PolicyRefusal: always when `count` > 0.
    """
    if count > 0:
        raise PolicyRefusal(
            f"site {site_name} refuses `audit-canaries = {count}`: canaries are a simulation-only audit and a real "
            "site never adds examples to its data; set audit-canaries = 0, and audit a deployment with "
            "`fedtl audit MODEL --members DATA --non-members DATA`"
        )
