"""Baselines every lab report needs beside a federation: majority class, centralised, local-only.

They answer "does federating help here?": the majority-class rate says what a useless model scores;
a centralised head trained on the pooled data (non-private, and DP-SGD at the same epsilon) is what
federation approximates at best; a site training alone at the same epsilon is what each site gets
without the federation. Per-site *transfer gain* = federated minus local-only accuracy on that
site's test split; a negative gain is negative transfer (the federation hurt that site).

The baselines read the simulated sites' cached features through the same site code the ClientApp
uses (so they see exactly the sites' partitions, and extract nothing twice), and train heads with
the sites' own DP-SGD loop. Each baseline head is a lab site of its own with a scratch ledger: its
centre release and its DP-SGD steps go through the sites' one release path (client/release.py), so
its noise and epsilon are planned and accounted exactly as a site's; no real site's ledger is charged.

A baseline trains as a one-site run of the same config would: where the run's head solver is `auto` and its
plan applies, the head is the plan for that one site's example count (shared/dp_heads.plan_dp_head: the public
projection, the k-dim centre release, full-batch DP-GD), so the centralised baseline has one curator's noise
and the local one a lone site's; otherwise DP-SGD on the configured head and schedule.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import tempfile
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedtl.client.centering import release_feature_sum
from fedtl.client.inputs import SiteInputs, load_site_inputs
from fedtl.client.site import Site
from fedtl.client.solvers.dp_sgd import charged_training
from fedtl.client.training import evaluate_model
from fedtl.server.centering import run_centering_noise
from fedtl.server.evaluation import CentralEvaluation
from fedtl.server.setup import Backbone, federation_label_names, load_server_backbone, load_server_data
from fedtl.server.solvers.auto import fallback_reason, planned_config, public_basis, resolve_feature_block
from fedtl.shared import constants as k
from fedtl.shared.centering import MAX_CENTER_NOISE_NORM, center_noise_norm
from fedtl.shared.config import RunConfig
from fedtl.shared.dp_heads import HeadPlan, plan_dp_head
from fedtl.shared.errors import ConfigError
from fedtl.shared.heads import (
    FROZEN_ARRAYS,
    PROJECTED,
    Head,
    build_head,
    head_arrays,
    load_head_arrays,
    predict_proba,
)
from fedtl.shared.metrics import classification_metrics
from fedtl.shared.protocol import RoundSettings, SimulationSettings
from fedtl.shared.public_basis import zero_shot_weight
from fedtl.simulations.federation import lab_settings, lab_sites, simulated_sites

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
    settings: RoundSettings  # what the simulated sites were sent (their features' cut, the run's schedule)
    simulation: SimulationSettings
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
    cfg = resolve_feature_block(cfg)  # the features the run reads, as the server resolves them
    backbone = load_server_backbone(cfg)
    splits = load_server_data(cfg)
    label_names = federation_label_names(cfg, splits)
    settings, simulation = lab_settings(cfg, backbone, label_names)
    sites = []
    with simulated_sites():
        for site in lab_sites(num_sites, simulation, backbone):
            inputs = load_site_inputs(site, settings, progress=False)
            sites.append(LabSite(site.name, inputs.train_x, inputs.train_y, inputs.test_x, inputs.test_y))
    central = CentralEvaluation(cfg, backbone, splits.test, label_names) if splits.test is not None else None
    return LabFederation(cfg, backbone, label_names, settings, simulation, sites, central)


def site_accuracies(lab: LabFederation, arrays: dict[str, np.ndarray], head: Head | None = None) -> dict[str, float]:
    """Return the accuracy of one head (`arrays`; into `head`, default the lab config's) on every site's test split."""
    head = head if head is not None else _head(lab)
    load_head_arrays(head, arrays, source="a run's model")
    return {s.name: evaluate_model(head, s.test_features, s.test_labels)[k.ACCURACY] for s in lab.sites}


def pooled_accuracy(lab: LabFederation, per_site: dict[str, float]) -> float:
    """Return the test-size-weighted mean of per-site accuracies (the accuracy over all site test examples)."""
    sizes = {s.name: len(s.test_labels) for s in lab.sites}
    names = [n for n in per_site if math.isfinite(per_site[n])]
    total = sum(sizes[n] for n in names)
    return sum(per_site[n] * sizes[n] for n in names) / total if total else math.nan


def run_baselines(
    lab: LabFederation, *, epsilons: list[float], seed: int, methods: Collection[str] = BASELINES
) -> list[BaselineScore]:
    """Return the scores of the baselines in `methods`, each trained only when asked for.

    Majority and centralised (non-private) once; centralised DP and local-only at each epsilon.
    `federated-nonprivate` is a run of its own (the sweep runs it), not trained here.
    """
    pooled_x = np.concatenate([s.train_features for s in lab.sites])
    pooled_y = np.concatenate([s.train_labels for s in lab.sites])
    out = [_majority(lab, pooled_y)] if MAJORITY in methods else []
    if CENTRAL in methods:
        central = train_baseline_head(lab, pooled_x, pooled_y, target_epsilon=None, seed=seed)
        out.append(_score(lab, CENTRAL, math.inf, central.head, spent=math.inf))
    for eps in epsilons:
        if CENTRAL_DP in methods:
            dp = train_baseline_head(lab, pooled_x, pooled_y, target_epsilon=eps, seed=seed)
            out.append(_score(lab, CENTRAL_DP, eps, dp.head, spent=dp.epsilon))
        if LOCAL not in methods:
            continue
        per_site, spent = {}, 0.0
        for i, s in enumerate(lab.sites):
            alone = train_baseline_head(lab, s.train_features, s.train_labels, target_epsilon=eps, seed=seed + 7919 * i)
            per_site[s.name] = evaluate_model(alone.head, s.test_features, s.test_labels)[k.ACCURACY]
            spent = max(spent, alone.epsilon)
        out.append(BaselineScore(LOCAL, eps, math.nan, math.nan, pooled_accuracy(lab, per_site), per_site, spent))
    return out


@dataclass(frozen=True)
class BaselineHead:
    """A head trained by a baseline and the epsilon it spent (inf: non-private)."""

    head: Head
    epsilon: float


def train_baseline_head(
    lab: LabFederation,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    target_epsilon: float | None,
    seed: int,
    frozen: dict[str, np.ndarray] | None = None,
) -> BaselineHead:
    """Train one head on (features, labels) as a single site of the run would, over the run's whole schedule.

    Where the run's head solver is `auto` and its plan applies: the plan for one site of len(labels) examples
    (`auto_plan`), trained by `_train_planned_head`. Otherwise the schedule is the federation's:
    `num-rounds x local-epochs` epochs at its batch size, learning rate and clipping. With a target epsilon, the
    feature centre is one noised release (the server's noise rule and its "too noisy: no centre" rule) and DP-SGD's
    noise is planned so that both together spend at most the target, through the sites' release path with a
    scratch ledger (seeded by `seed`); without one, the exact mean and plain SGD (the non-private baseline).
    `frozen`: buffers the run fixed (a planned projected head's public projection and its centre, from the
    run's model file), loaded before training and never trained: the head is then the run's configured one on
    the run's map (the audit's shadow models), not a plan of its own.
    """
    cfg = lab.cfg
    plan = (
        None
        if frozen
        else auto_plan(lab, len(labels), cfg.target_epsilon if target_epsilon is None else target_epsilon)
    )
    if plan is not None:
        return _train_planned_head(lab, features, labels, plan, target_epsilon=target_epsilon, seed=seed)
    head = _head(lab, seed=cfg.seed)
    if frozen:
        arrays = head_arrays(head)
        arrays.update({name: value for name, value in frozen.items() if name in FROZEN_ARRAYS})
        load_head_arrays(head, arrays, source="the run's frozen buffers")
    elif cfg.head == PROJECTED:
        raise ConfigError(
            'a baseline of a projected head (head-solver "auto") needs the run\'s public projection and centre: '
            "pass `frozen` from the run's model file"
        )
    epochs = cfg.num_rounds * cfg.local_epochs
    private = target_epsilon is not None
    settings = _one_site_settings(lab.settings, seed=seed, target_epsilon=target_epsilon, epochs=epochs)
    with _scratch_site(lab) as site:
        arrays = head_arrays(head)
        if cfg.feature_centering:
            sigma = run_centering_noise(cfg.replace(target_epsilon=target_epsilon)) if private else 0.0
            center = np.zeros(features.shape[1], dtype=np.float32)
            if sigma is not None:  # the sites' release: same noise rule, same "too noisy: no centre" rule
                total, count, _ = release_feature_sum(site, settings, features, noise_multiplier=sigma)
                noise_norm = center_noise_norm(noise_multiplier=sigma, dim=len(total), num_sites=1, count=count)
                if noise_norm <= MAX_CENTER_NOISE_NORM:
                    center = total / count
            arrays["center"] = center.astype(np.float32)
            load_head_arrays(head, arrays, source="the baseline's feature centre")
        return _charged_training(site, settings, head, features, labels, lab, epochs=epochs)


def auto_plan(lab: LabFederation, num_examples: int, target_epsilon: float) -> HeadPlan | None:
    """Return the auto plan of a one-site run of the lab's config on `num_examples` (None: the run's head is not it).

    A non-private baseline takes the plan at the run's own target epsilon, as a non-private auto run does: only
    its head, projection and schedule are used.
    """
    cfg = lab.cfg
    if cfg.head_solver != "auto" or fallback_reason(cfg) is not None:
        return None
    return plan_dp_head(
        target_epsilon=target_epsilon,
        target_delta=cfg.target_delta,
        site_sizes=[num_examples],
        feature_dim=lab.backbone.feature_dim,
        num_classes=lab.num_classes,
        accountant=cfg.accountant,
        rounds=cfg.num_rounds,
    )


def _train_planned_head(
    lab: LabFederation,
    features: np.ndarray,
    labels: np.ndarray,
    plan: HeadPlan,
    *,
    target_epsilon: float | None,
    seed: int,
) -> BaselineHead:
    """Train the auto plan's projected head on (features, labels) as the only site of a run, as the run's solver does.

    The public basis and the centre (released through the site's release path when the plan releases one, else the
    synthetic inputs' public one) go into the head's frozen buffers; a text head starts from the class names'
    zero-shot head; then the plan's full-batch DP-GD steps, charged to a scratch ledger as one site's.
    `target_epsilon` None: the non-private baseline (no clipping, no noise, the exact centre).
    """
    private = target_epsilon is not None
    cfg = planned_config(lab.cfg, plan, [len(labels)], head=PROJECTED)
    projection, public_center, names = public_basis(lab.backbone, cfg, lab.label_names)
    head = build_head(
        PROJECTED, lab.backbone.feature_dim, lab.num_classes, seed=cfg.seed, projection_dim=cfg.projection_dim
    )
    planned, _ = lab_settings(cfg, lab.backbone, lab.label_names)  # what the sites of the planned run are sent
    settings = _one_site_settings(planned, seed=seed, target_epsilon=target_epsilon, epochs=plan.steps)
    with _scratch_site(lab) as site:
        center = public_center
        if plan.center_noise_multiplier is not None:
            sigma = plan.center_noise_multiplier if private else 0.0
            total, count, _ = release_feature_sum(
                site, settings, features, noise_multiplier=sigma, projection=projection
            )
            center = total / count
        arrays = head_arrays(head)
        arrays.update(projection=projection.astype(np.float32), center=np.asarray(center, dtype=np.float32))
        if names is not None:  # a text backbone: DP-GD starts from the class names' zero-shot head (public)
            arrays["layers.0.weight"] = zero_shot_weight(names, projection, center).astype(np.float32)
        load_head_arrays(head, arrays, source="the baseline's public basis and centre")
        return _charged_training(site, settings, head, features, labels, lab, epochs=plan.steps)


def _one_site_settings(
    settings: RoundSettings, *, seed: int, target_epsilon: float | None, epochs: int
) -> RoundSettings:
    """Return `settings` (a run's) as a baseline's one site is sent them: one round of `epochs`, no personalisation.

    `target_epsilon` None: the non-private baseline (the run's target stays in the settings, unused).
    """
    return dataclasses.replace(
        settings,
        run_id=f"baseline-{seed}",
        num_rounds=1,
        local_epochs=epochs,
        personalization="none",
        non_private=target_epsilon is None,
        target_epsilon=settings.target_epsilon if target_epsilon is None else target_epsilon,
        seed=seed,
    )


@contextlib.contextmanager
def _scratch_site(lab: LabFederation) -> Iterator[Site]:
    """Yield a lab site of its own with a scratch ledger, gone afterwards (no real site's ledger is charged)."""
    with tempfile.TemporaryDirectory(prefix="fedtl-baseline-") as tmp:
        yield Site(name="baseline", state_dir=Path(tmp), cache_dir=Path(tmp), data="", simulation=lab.simulation)


def _charged_training(
    site: Site,
    settings: RoundSettings,
    head: Head,
    features: np.ndarray,
    labels: np.ndarray,
    lab: LabFederation,
    *,
    epochs: int,
) -> BaselineHead:
    """Train `head` on (features, labels) through the site's release path; return it with the epsilon it spent."""
    inputs = SiteInputs(features, labels, features[:0], labels[:0], lab.label_names, 0)
    _, epsilon, _ = charged_training(site, settings, head, inputs, server_round=1, epochs=epochs, what="training")
    return BaselineHead(head, math.inf if settings.non_private else epsilon)


def _head(lab: LabFederation, seed: int = 0) -> Head:
    cfg = lab.cfg
    return build_head(
        cfg.head,
        lab.backbone.feature_dim,
        lab.num_classes,
        hidden=cfg.head_hidden,
        seed=seed,
        projection_dim=cfg.projection_dim if cfg.head == PROJECTED else 0,
    )


def _score(lab: LabFederation, method: str, eps: float, head: Head, *, spent: float) -> BaselineScore:
    per_site = {s.name: evaluate_model(head, s.test_features, s.test_labels)[k.ACCURACY] for s in lab.sites}
    held_out = (
        classification_metrics(lab.central.labels, predict_proba(head, lab.central.inputs)) if lab.central else {}
    )
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
    """Always predict the most frequent class of the pooled training data; score it as every other row is scored.

    Accuracy and balanced accuracy are both of that one predictor on the server's held-out split, by the
    metrics every run uses (balanced accuracy is 1/C only when the split holds every class).
    """
    majority = int(np.bincount(pooled_train_labels, minlength=lab.num_classes).argmax())
    per_site = {s.name: float(np.mean(s.test_labels == majority)) for s in lab.sites}
    held_out: dict[str, float] = {}
    if lab.central is not None:
        constant = np.zeros((len(lab.central.labels), lab.num_classes))
        constant[:, majority] = 1.0
        held_out = classification_metrics(lab.central.labels, constant)
    # Reading the pooled labels is not private: no epsilon bounds it.
    return BaselineScore(
        MAJORITY,
        math.inf,
        held_out.get(k.ACCURACY, math.nan),
        held_out.get(k.BALANCED_ACCURACY, math.nan),
        pooled_accuracy(lab, per_site),
        per_site,
        math.inf,
    )
