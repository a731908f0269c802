"""Baselines every lab report needs beside a federation: majority class, centralised, local-only.

They answer "does federating help here?": the majority-class rate says what a useless model scores;
a centralised head trained on the pooled data (non-private, and DP-SGD at the same epsilon) is what
federation approximates at best; a site training alone at the same epsilon is what each site gets
without the federation. Per-site *transfer gain* = federated minus local-only accuracy on that
site's test split; a negative gain is negative transfer (the federation hurt that site).

The baselines read the simulated sites' cached features through the same site code the ClientApp
uses (so they see exactly the sites' partitions, and extract nothing twice), and train heads with
the sites' own DP-SGD loop. They are lab computations on one machine: no site ledger is charged,
and their epsilon is computed directly with the same accountant.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord

from fedtl.client.site import SIMULATION_ENV, BackboneStore, load_site_features, resolve_site
from fedtl.client.training import evaluate_head, steps_per_epoch, train_head
from fedtl.server.server_app import (
    Backbone,
    CentralEvaluation,
    federation_label_names,
    load_server_backbone,
    round_config,
    run_centering_noise,
)
from fedtl.shared import constants as k
from fedtl.shared.centering import MAX_CENTER_NOISE_NORM, center_noise_norm
from fedtl.shared.config import AUTO, RunConfig
from fedtl.shared.data import load_dataset
from fedtl.shared.heads import Head, build_head, head_arrays, load_head_arrays, normalize_features
from fedtl.shared.privacy import PrivacyStep, compute_epsilon, find_noise_multiplier
from fedtl.shared.protocol import RoundSettings, SimulationSettings, decode

MAJORITY = "majority"
CENTRAL = "central"
CENTRAL_DP = "central-dp"
LOCAL = "local"
FEDERATED_NONPRIVATE = "federated-nonprivate"
BASELINES = (MAJORITY, CENTRAL, CENTRAL_DP, LOCAL, FEDERATED_NONPRIVATE)


@dataclass(frozen=True)
class LabSite:
    """One simulated site's cached features, as its ClientApp sees them."""

    name: str
    train_features: np.ndarray  # (N_train, D)
    train_labels: np.ndarray  # (N_train,)
    test_features: np.ndarray  # (N_test, D)
    test_labels: np.ndarray  # (N_test,)

    def class_counts(self, num_classes: int) -> list[int]:
        """Training examples per class."""
        return np.bincount(self.train_labels, minlength=num_classes).tolist()


@dataclass(frozen=True)
class LabFederation:
    """What the baselines of one (data, backbone, sites, partition, seed) need."""

    cfg: RunConfig
    backbone: Backbone
    label_names: tuple[str, ...]
    sites: list[LabSite]
    central: CentralEvaluation | None  # the server's held-out test set, when the data has one

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


@dataclass(frozen=True)
class BaselineScore:
    """One baseline's scores: held-out accuracy, pooled site-test accuracy, per-site accuracy, epsilon."""

    method: str
    target_epsilon: float  # inf for the non-private ones
    accuracy: float  # server held-out (nan without one)
    balanced_accuracy: float
    site_accuracy: float  # test-size-weighted mean over the sites' local test splits
    per_site: dict[str, float]
    epsilon_spent: float


def load_lab_federation(cfg: RunConfig, num_sites: int) -> LabFederation:
    """Return the simulated sites of `cfg` (their features from the shared site cache) and the server test set.

    The backbone is installed in a site's cache when missing, as the ServerApp would send it.
    """
    backbone = load_server_backbone(cfg)
    splits = load_dataset(cfg.data, seed=cfg.seed, test_fraction=cfg.test_fraction)
    label_names = federation_label_names(cfg, splits)
    with tempfile.TemporaryDirectory(prefix="fedtl-lab-") as tmp:
        config = round_config(cfg, backbone, label_names, run_id="lab-baselines", run_dir=Path(tmp))
    settings = decode(RoundSettings, config)
    simulation = decode(SimulationSettings, config, what="simulation config")
    previous = os.environ.get(SIMULATION_ENV)
    os.environ[SIMULATION_ENV] = "1"
    try:
        sites = []
        for pid in range(num_sites):
            site = resolve_site({k.PARTITION_ID: pid, k.NUM_PARTITIONS: num_sites}, simulation)
            _install(site.backbones, backbone)
            feats = load_site_features(site, settings, progress=False)
            sites.append(
                LabSite(site.name, feats.train_features, feats.train_labels, feats.test_features, feats.test_labels)
            )
    finally:
        if previous is None:
            os.environ.pop(SIMULATION_ENV, None)
        else:
            os.environ[SIMULATION_ENV] = previous
    central = CentralEvaluation(cfg, backbone, splits.test, label_names) if splits.test is not None else None
    return LabFederation(cfg, backbone, label_names, sites, central)


def _install(store: BackboneStore, backbone: Backbone) -> None:
    if not store.has(backbone.fingerprint):
        store.install(backbone.name, backbone.fingerprint, backbone.state)


def site_accuracies(lab: LabFederation, arrays: dict[str, np.ndarray]) -> dict[str, float]:
    """Return the accuracy of one head (`arrays`) on every site's local test split."""
    head = _head(lab)
    load_head_arrays(head, arrays, source="a run's model")
    return {s.name: evaluate_head(head, s.test_features, s.test_labels)[k.ACCURACY] for s in lab.sites}


def pooled_accuracy(lab: LabFederation, per_site: dict[str, float]) -> float:
    """Return the test-size-weighted mean of per-site accuracies (the accuracy over all site test examples)."""
    sizes = {s.name: len(s.test_labels) for s in lab.sites}
    names = [n for n in per_site if math.isfinite(per_site[n])]
    total = sum(sizes[n] for n in names)
    return sum(per_site[n] * sizes[n] for n in names) / total if total else math.nan


def run_baselines(lab: LabFederation, *, epsilons: list[float], seed: int) -> list[BaselineScore]:
    """Return majority, centralised (non-private), and for each epsilon centralised DP-SGD and local-only scores."""
    pooled_x = np.concatenate([s.train_features for s in lab.sites])
    pooled_y = np.concatenate([s.train_labels for s in lab.sites])
    out = [_majority(lab, pooled_y)]
    central = train_baseline_head(lab, pooled_x, pooled_y, target_epsilon=None, seed=seed)
    out.append(_score(lab, CENTRAL, math.inf, central.head, spent=math.inf))
    for eps in epsilons:
        dp = train_baseline_head(lab, pooled_x, pooled_y, target_epsilon=eps, seed=seed)
        out.append(_score(lab, CENTRAL_DP, eps, dp.head, spent=dp.epsilon))
        per_site, spent = {}, 0.0
        for i, s in enumerate(lab.sites):
            alone = train_baseline_head(lab, s.train_features, s.train_labels, target_epsilon=eps, seed=seed + 7919 * i)
            per_site[s.name] = evaluate_head(alone.head, s.test_features, s.test_labels)[k.ACCURACY]
            spent = max(spent, alone.epsilon)
        out.append(BaselineScore(LOCAL, eps, math.nan, math.nan, pooled_accuracy(lab, per_site), per_site, spent))
    return out


@dataclass(frozen=True)
class BaselineHead:
    """A head trained by a baseline and the epsilon it spent (inf: non-private)."""

    head: Head
    epsilon: float


def train_baseline_head(
    lab: LabFederation, features: np.ndarray, labels: np.ndarray, *, target_epsilon: float | None, seed: int
) -> BaselineHead:
    """Train one head on (features, labels) as a single site of the run would, over the run's whole schedule.

    The schedule is the federation's: `num-rounds x local-epochs` epochs at its batch size, learning
    rate and clipping. With a target epsilon, the feature centre is one Gaussian release (the sites'
    feature-sum mechanism) and DP-SGD's noise is derived so that both together spend exactly the
    target; without one, the exact mean and plain SGD (the non-private baseline).
    """
    cfg = lab.cfg
    head = _head(lab, seed=cfg.seed)
    epochs = cfg.num_rounds * cfg.local_epochs
    sample_rate, per_epoch = steps_per_epoch(len(labels), cfg.batch_size)
    rng = np.random.default_rng(seed)
    unit = normalize_features(features).astype(np.float64)  # (N, D), rows of norm 1: sensitivity 1
    history: list[PrivacyStep] = []
    if target_epsilon is None:
        center = unit.mean(axis=0)
        noise = None
    else:
        sigma = run_centering_noise(cfg.replace(target_epsilon=target_epsilon)) if cfg.feature_centering else None
        center = np.zeros(unit.shape[1])
        if sigma is not None:  # the sites' release: same noise rule, same "too noisy: no centre" rule
            center = (unit.sum(axis=0) + rng.normal(0.0, sigma, size=unit.shape[1])) / len(unit)
            history.append(PrivacyStep(sigma, 1.0, 1))
            noise_norm = center_noise_norm(noise_multiplier=sigma, dim=unit.shape[1], num_sites=1, count=len(unit))
            if noise_norm > MAX_CENTER_NOISE_NORM:
                center = np.zeros_like(center)
        if cfg.noise_multiplier == AUTO:
            noise = find_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=cfg.target_delta,
                sample_rate=sample_rate,
                steps=per_epoch * epochs,
                history=history,
                accountant=cfg.accountant,
            )
        else:
            noise = float(cfg.noise_multiplier)
    arrays = head_arrays(head)
    if cfg.feature_centering:
        arrays["center"] = center.astype(np.float32)
        load_head_arrays(head, arrays, source="the baseline's feature centre")
    train_head(
        head,
        features,
        labels,
        epochs=epochs,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        max_grad_norm=cfg.max_grad_norm,
        noise_multiplier=noise,
        seed=seed,
    )
    if noise is None:
        return BaselineHead(head, math.inf)
    history.append(PrivacyStep(noise, sample_rate, per_epoch * epochs))
    return BaselineHead(head, compute_epsilon(history, delta=cfg.target_delta, accountant=cfg.accountant))


def _head(lab: LabFederation, seed: int = 0) -> Head:
    cfg = lab.cfg
    return build_head(cfg.head, lab.backbone.feature_dim, lab.num_classes, hidden=cfg.head_hidden, seed=seed)


def _score(lab: LabFederation, method: str, eps: float, head: Head, *, spent: float) -> BaselineScore:
    arrays = head_arrays(head)
    per_site = site_accuracies(lab, arrays)
    held_out = lab.central(ArrayRecord({n: Array(v) for n, v in arrays.items()})) if lab.central else {}
    return BaselineScore(
        method,
        eps,
        held_out.get(k.ACCURACY, math.nan),
        held_out.get(k.BALANCED_ACCURACY, math.nan),
        pooled_accuracy(lab, per_site),
        per_site,
        spent,
    )


def _majority(lab: LabFederation, pooled_train_labels: np.ndarray) -> BaselineScore:
    """Always predict the most frequent class of the pooled training data."""
    majority = int(np.bincount(pooled_train_labels, minlength=lab.num_classes).argmax())
    per_site = {s.name: float(np.mean(s.test_labels == majority)) for s in lab.sites}
    held_out = math.nan
    if lab.central is not None:
        held_out = float(np.mean(lab.central.labels == majority))
    # Reading the pooled labels is not private: no epsilon bounds it.
    return BaselineScore(
        MAJORITY, math.inf, held_out, 1.0 / lab.num_classes, pooled_accuracy(lab, per_site), per_site, math.inf
    )
