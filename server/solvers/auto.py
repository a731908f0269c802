"""The auto head solver (issue 17): the method and schedule planned from public quantities only, then run.

`head-solver = "auto"` (the default) chooses from target epsilon and delta, the sites' training-example
counts (declared public: every training reply carries them), the feature dimension, the number of classes
and the backbone's public weights; never from anyone's data (shared/dp_heads.py has the rules and how each
constant was chosen). It composes the DP-SGD solver:

1. `configure` (before any site is asked anything): the plan's fixed schedule (the configured rounds, at least
   50 steps split over them, clip 1, noise planned by each site, no D-dim feature-centre round); or, where the
   plan does not apply (deeper fine-tuning, personalisation, an mlp head, FedAdam, client-level DP, a backbone
   that reads table rows or whose feature dim is too small), DP-SGD as configured, said in the run output;
2. `plan` (after set-up, before any release): every site's example count -> `plan_dp_head` -> the projected
   head's width k, full-batch DP-GD (batch size >= every count), the learning rate; printed with its reason
   and the keys it overrides, and recorded in config.json and summary.json;
3. `fit`: the public basis (the backbone's features of seeded synthetic images, or of texts of random vocabulary
   words led by the class names' directions, shared/public_basis.py) and the k-dim centre (the sites' noised
   projected sums when the plan releases one, else the synthetic inputs' own centre) go into the initial model as
   frozen buffers (a text head starts from the class names' zero-shot head); then the DP-SGD solver's rounds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from fedtl.server.centering import collect_feature_sums
from fedtl.server.report import failure_reason, reply_site_name
from fedtl.server.setup import Backbone, SiteSetup, ask, query_sites
from fedtl.server.solvers.base import Federation, PlanInputs, RunPlan, SolverResult
from fedtl.server.solvers.dp_sgd import DpSgdSolver
from fedtl.shared import constants as k
from fedtl.shared.backbones import get_backbone_spec, resolve_preprocessing
from fedtl.shared.config import PLANNED_SOLVERS, RunConfig, fedtl_home
from fedtl.shared.cut import Cut, inputs_at_cut
from fedtl.shared.dataset import IMAGES, TEXTS
from fedtl.shared.deep import FINAL_FEATURES, MIN_FEATURE_GRID, Adaptation, choose_feature_block
from fedtl.shared.dp_heads import MAX_GRAD_NORM, PROJECTION_DIMS, STEPS, HeadPlan, plan_dp_head
from fedtl.shared.encoders import minilm_words
from fedtl.shared.errors import FederationError, StorageError
from fedtl.shared.files import NPZ_READ_ERRORS, atomic_write_npz
from fedtl.shared.heads import PROJECTED, check_incoming_tensor
from fedtl.shared.public_basis import (
    SYNTHETIC_SEED,
    SYNTHETIC_SIZE,
    WHITENING,
    ZERO_SHOT_SCALE,
    compute_public_basis,
    generate_synthetic_images,
    generate_synthetic_texts,
    project_features,
    synthetic_count,
    synthetic_fingerprint,
    zero_shot_weight,
)

log = logging.getLogger(__name__)
progress = logging.getLogger("fedtl.progress")  # the user's terminal (cli/main.show_progress)

HEAD_PLAN = "head-plan"  # config.json and summary.json key
BASIS_FORMAT = 1  # bump when compute_public_basis changes: stored bases of the old rule are then recomputed
HEAD_WEIGHT = "layers.0.weight"  # the projected head's linear weight (C, k) (shared/heads.Head)


class AutoSolver:
    """Plan DP-GD on a public projection from public quantities (shared/dp_heads.py), then run DP-SGD rounds."""

    def __init__(self) -> None:
        self._dp_sgd = DpSgdSolver()
        self.fallback: str | None = None  # why DP-SGD runs as configured instead of the plan
        self.head_plan: HeadPlan | None = None
        self._asked: RunConfig | None = None  # the run config before the plan, to report what it overrides

    def configure(self, cfg: RunConfig) -> RunConfig:
        """Return the config with the plan's fixed schedule, or DP-SGD's as configured where the plan does not apply."""
        self._asked = cfg
        if cfg.resume and cfg.head == PROJECTED:  # a resumed run: its stored config was planned when it started
            return cfg
        self.fallback = fallback_reason(cfg)
        if self.fallback is not None:
            progress.info("head-solver auto: DP-SGD as configured, because %s", self.fallback)
            return self._dp_sgd.configure(cfg)
        # Independent of the counts, so sites check the same rounds at set-up as they will train. Rounds stay
        # the run config's: with full batches, lr x steps sets progress and noise, not how steps are split.
        return cfg.replace(
            local_epochs=math.ceil(STEPS / cfg.num_rounds),
            max_grad_norm=MAX_GRAD_NORM,
            noise_multiplier=None,
            feature_centering=False,
        )

    def plan(self, cfg: RunConfig, inputs: PlanInputs) -> RunPlan:
        """Ask every site its training-example count, plan the head from the counts, return the planned config.

        Raises:
            FederationError: fewer than min-train-sites (at least one) sites said how many examples they hold.
        """
        if self.fallback is not None:
            return RunPlan(cfg, inputs.setup, {HEAD_PLAN: {"method": "dp-sgd", "reason": self.fallback}})
        if cfg.resume and cfg.head == PROJECTED:
            stored = json.loads((Path(cfg.resume) / "config.json").read_text()).get(HEAD_PLAN, {})
            return RunPlan(cfg, inputs.setup, {HEAD_PLAN: stored} if stored else {})
        counts, setup = site_counts(cfg, inputs, least=1, what="the auto plan")
        sizes = [counts[n] for n in sorted(counts)]
        plan = plan_dp_head(
            target_epsilon=cfg.target_epsilon,
            target_delta=cfg.target_delta,
            site_sizes=sizes,
            feature_dim=inputs.backbone.feature_dim,
            num_classes=len(inputs.label_names),
            accountant=cfg.accountant,
            rounds=cfg.num_rounds,
        )
        self.head_plan = plan
        # Sample rate 1 at every site: full-batch DP-GD. Each site plans its noise within its ledger (a fresh
        # site lands on the plan's).
        planned = planned_config(cfg, plan, sizes, head=PROJECTED).replace(
            num_rounds=plan.num_rounds, noise_multiplier=None
        )
        overrides = overridden_keys(self._asked or cfg, planned)
        if cfg.non_private:  # the plan's noise and epsilon below would otherwise read as this run's
            progress.info(
                "head-solver auto: NON-PRIVATE run (non-private = true): the epsilon-%g plan below fixes only the "
                "head, projection and schedule; nothing is clipped, noised or charged (epsilon inf)",
                cfg.target_epsilon,
            )
        progress.info("head-solver auto: %s", plan.reason)
        if cfg.feature_block != FINAL_FEATURES:
            progress.info("head-solver auto: %s", feature_block_reason(cfg, inputs.backbone))
        if overrides:
            progress.info(
                "head-solver auto sets %s",
                ", ".join(f"{key} = {_shown(new)} (was {_shown(old)})" for key, (old, new) in overrides.items()),
            )
        record = {
            **plan_record(plan, setup, counts),
            "num-rounds": plan.num_rounds,
            "feature-block": cfg.feature_block,
            "overrides": {key: {"asked": old, "planned": new} for key, (old, new) in overrides.items()},
            "public-basis": {
                f"synthetic-{inputs.backbone.preprocessing.kind}": synthetic_count(inputs.backbone.preprocessing.kind),
                "class-names-leading": inputs.backbone.preprocessing.kind == TEXTS,
                "seed": SYNTHETIC_SEED,
                "size": SYNTHETIC_SIZE,
                "whitening": WHITENING,
            },
        }
        return RunPlan(planned, setup, {HEAD_PLAN: record})

    def fit(self, fed: Federation) -> SolverResult:
        """Put the public basis and the k-dim centre into the initial model (a new run), then run DP-SGD rounds."""
        if self.head_plan is not None and fed.run.checkpoint is None:
            projection, public_center, names = public_basis(fed.backbone, fed.cfg, fed.label_names)
            fed.initial["projection"] = projection
            fed.initial["center"] = center = self._center(fed, projection, public_center)
            if names is not None:  # a text backbone: DP-GD starts from the class names' zero-shot head (public)
                weight = zero_shot_weight(names, projection, center).astype(np.float32)
                fed.initial[HEAD_WEIGHT] = check_incoming_tensor(
                    HEAD_WEIGHT, weight, fed.initial[HEAD_WEIGHT].shape, source="the zero-shot head"
                )
                progress.info(
                    "head-solver auto: the head starts from the class names' zero-shot head (their features through "
                    "the backbone, cosine x %g; public, no release)",
                    ZERO_SHOT_SCALE,
                )
        return self._dp_sgd.fit(fed)

    def _center(self, fed: Federation, projection: np.ndarray, public_center: np.ndarray) -> np.ndarray:
        """Return the k-dim centre: the sites' noised projected sums if the plan releases them, else the public one."""
        plan = self.head_plan
        assert plan is not None
        if plan.center_noise_multiplier is None:
            progress.info("head-solver auto: centre of the synthetic images' projected features (public, no release)")
            return public_center
        sigma = 0.0 if fed.cfg.non_private else plan.center_noise_multiplier
        total, count, used = collect_feature_sums(
            fed.grid,
            fed.node_ids,
            fed.config,
            sigma=sigma,
            dim=plan.projection_dim,
            timeout=fed.cfg.round_timeout,
            projection=projection,
        )
        noise = sigma * math.sqrt(used * plan.projection_dim) / count
        progress.info(
            "head-solver auto: %d-dim centre from %d examples at %d sites (noise %.2f, expected noise norm %.3f)",
            plan.projection_dim,
            count,
            used,
            sigma,
            noise,
        )
        return (total / count).astype(np.float32)


def feature_block_reason(cfg: RunConfig, backbone: Backbone) -> str:
    """Return the run output's line saying which block's features the head reads, and why (`choose_feature_block`)."""
    size = backbone.preprocessing.image_size
    why = (
        f"the last block whose output is at least {MIN_FEATURE_GRID} px a side at {size} px (a rule of the "
        "architecture and image size only, shared/deep.py)"
        if cfg.feature_block == choose_feature_block(cfg.backbone, size)
        else "as feature-block sets"
    )
    return (
        f"the head reads the {backbone.feature_dim} features of MBConv block {cfg.feature_block}'s pooled output, "
        f"{why}; the blocks above it are not run"
    )


def resolve_feature_block(cfg: RunConfig) -> RunConfig:
    """Return `cfg` with `feature-block` "auto" resolved from public quantities: the plan's block, or -1.

    Where the auto plan applies (head-solver auto or secure-dp-sgd, no fallback), the head reads the features after
    the block `choose_feature_block` picks from the architecture and image size alone (shared/deep.py says how
    that rule was chosen); everywhere else, and for backbones without MBConv blocks, the backbone's own features.
    A set value is kept (sites check it against the backbone).
    """
    if cfg.feature_block is not None:
        return cfg
    block = FINAL_FEATURES
    if cfg.head_solver in PLANNED_SOLVERS and fallback_reason(cfg) is None:
        image_size = resolve_preprocessing(cfg.backbone, cfg.image_size, schema=None).image_size
        block = choose_feature_block(cfg.backbone, image_size)
    return cfg.replace(feature_block=block)


def fallback_reason(cfg: RunConfig) -> str | None:
    """Return why the auto plan (a linear head on frozen features, FedAvg) does not apply to `cfg`, or None."""
    if cfg.trainable_blocks or cfg.lora_rank:
        return "deeper fine-tuning (trainable-blocks, lora-rank) trains backbone tensors; the plan is for a head"
    if cfg.personalization != "none":
        return f"personalization = {cfg.personalization!r} adds local steps the plan does not schedule"
    if cfg.head == "mlp":
        return 'head = "mlp": the plan trains a linear head on a public projection'
    if cfg.strategy == "fedadam":
        return "strategy = fedadam: the plan's learning rate assumes the server averages the updates"
    if cfg.client_dp != "off":
        return (
            f"client-dp = {cfg.client_dp!r} clips each round's update to client-clipping-norm, which the plan's "
            "learning rate does not account for"
        )
    spec = get_backbone_spec(cfg.backbone)
    if spec.kind not in (IMAGES, TEXTS):
        return (
            f"backbone {cfg.backbone!r} reads {spec.kind}; the plan's public basis is its features of synthetic "
            "images or texts"
        )
    dim = spec.feature_dim
    if dim <= min(PROJECTION_DIMS):
        return f"the backbone's {dim} features leave no projection dim of {PROJECTION_DIMS} below them"
    return None


def overridden_keys(asked: RunConfig, planned: RunConfig) -> dict[str, tuple[Any, Any]]:
    """Return kebab-case key -> (asked, planned) for every run-config value the plan changed."""
    before, after = asked.to_mapping(), planned.to_mapping()
    return {key: (before[key], after[key]) for key in after if before[key] != after[key]}


def _shown(value: Any) -> str:
    """Return a run-config value as the run output shows it: floats to 4 significant digits, others as repr."""
    return f"{value:.4g}" if isinstance(value, float) else repr(value)


def site_counts(cfg: RunConfig, inputs: PlanInputs, *, least: int, what: str) -> tuple[dict[int, int], SiteSetup]:
    """Return every answering site's training-example count and the set-up with the sites that refused added.

    Raises:
        FederationError: fewer than max(least, min-train-sites) sites said how many examples they hold.
    """
    counts, refused = count_examples(inputs.grid, inputs.node_ids, inputs.config, timeout=cfg.round_timeout)
    setup = dataclasses.replace(inputs.setup, refused={**inputs.setup.refused, **refused})
    if len(counts) < max(cfg.min_train_sites, least):
        raise FederationError(
            f"only {len(counts)} site(s) said how many training examples they hold (at least {least} and "
            f"min-train-sites {cfg.min_train_sites} needed), so {what} cannot be made; refusals: "
            f"{sorted(refused.values())}"
        )
    return counts, setup


def planned_config(cfg: RunConfig, plan: HeadPlan, sizes: list[int], *, head: str) -> RunConfig:
    """Return `cfg` with a DP head plan's schedule: full batches (batch size >= every site's count), no D-dim centre."""
    return cfg.replace(
        head=head,
        projection_dim=plan.projection_dim,
        batch_size=max(sizes),
        local_epochs=plan.local_steps,
        learning_rate=plan.learning_rate,
        max_grad_norm=plan.max_grad_norm,
        feature_centering=False,
    )


def plan_record(plan: HeadPlan, setup: SiteSetup, counts: dict[int, int]) -> dict[str, Any]:
    """Return what config.json and summary.json record of a plan: its fields and every site's declared count."""
    return {
        **{key.replace("_", "-"): value for key, value in dataclasses.asdict(plan).items()},
        "site-sizes": {setup.names.get(n, f"node-{n}"): counts[n] for n in sorted(counts)},
    }


def count_examples(
    grid: Grid, node_ids: list[int], config: ConfigRecord, *, timeout: float
) -> tuple[dict[int, int], dict[int, str]]:
    """Ask every site for its training-example count; return (node id -> count, node id -> "site: refusal")."""
    replies = query_sites(grid, node_ids, RecordDict({k.CONFIG: ask(config, k.ACTION_COUNT_EXAMPLES)}), timeout)
    counts: dict[int, int] = {}
    refused: dict[int, str] = {}
    for node_id in node_ids:
        reply = replies.get(node_id)
        if reply is None:
            refused[node_id] = f"node-{node_id}: no answer to the example-count query within {timeout:.0f} s"
            continue
        name = reply_site_name(reply)
        reason = failure_reason(reply)
        metrics = None if reason else reply.content.metric_records.get(k.METRICS)
        count = metrics.get(k.NUM_EXAMPLES) if metrics is not None else None
        if reason is None and (not isinstance(count, int) or isinstance(count, bool) or count < 1):
            reason = f"malformed example-count reply: `{k.NUM_EXAMPLES}` must be a count >= 1, got {count!r}"
        if reason is not None:
            log.warning("site %s refused the example-count query and is left out of this run: %s", name, reason)
            refused[node_id] = f"{name}: {reason}"
            continue
        counts[node_id] = int(count)  # type: ignore[arg-type]
    return counts, refused


# (backbone fingerprint, preprocessing, synthetic inputs, block, device, k, class names) -> (P, centre, names'
# features or None): public, deterministic, a few MiB at most.
_PUBLIC_BASES: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}


def public_basis(
    backbone: Backbone, cfg: RunConfig, label_names: tuple[str, ...] = ()
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Return the public projection P (k, D), its synthetic centre (k,) and the class names' features (C, D) or None.

    The backbone's features of fedtl's seeded synthetic inputs (shared/public_basis.py): images for an image
    backbone; for a text backbone, texts of random words of its own vocabulary, with the class names' features as
    the first directions (whitening 0: the names' directions stay unit rows), returned for the zero-shot head DP-GD
    starts from (`shared/public_basis.zero_shot_weight`). Extracted once per backbone and preprocessing, cached with
    the server's other features (and the basis kept in this process). Nothing private enters (the class names are
    the federation's public classes), so it costs no privacy; the server sends P and the head to the sites, so
    nothing can differ between machines.
    """
    names = basis_names(backbone, label_names)
    key = (
        backbone.fingerprint,
        backbone.preprocessing.key(),
        synthetic_fingerprint(backbone.preprocessing.kind),  # how the inputs are drawn: count, seed, size, format
        cfg.feature_block,
        cfg.device,
        cfg.projection_dim,
        names,
    )
    if key not in _PUBLIC_BASES:  # the same public inputs give the same basis: a sweep computes it once
        stored = _BasisFile(fedtl_home() / "server-cache" / "public-basis", key)
        found = stored.load(cfg.projection_dim)  # a later run: no synthetic inputs drawn, no SVD
        if found is None:
            found = _compute_public_basis(backbone, cfg, names)
            stored.save(*found)
        _PUBLIC_BASES[key] = found
    projection, center, names_at = _PUBLIC_BASES[key]  # copies: callers may write to what they get
    return projection.copy(), center.copy(), None if names_at is None else names_at.copy()


def basis_names(backbone: Backbone, label_names: tuple[str, ...]) -> tuple[str, ...]:
    """Return the class names the public basis leads with: a text backbone's classes, none for images."""
    return tuple(label_names) if backbone.preprocessing.kind == TEXTS else ()


def _compute_public_basis(
    backbone: Backbone, cfg: RunConfig, names: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Return (P, centre, class names' features or None) from the backbone's features of the synthetic inputs."""
    features, name_features = public_features(backbone, cfg, names)
    if name_features is not None:
        # More names than directions: the basis is the synthetic texts' alone; the zero-shot head still applies.
        leading = name_features if len(names) < cfg.projection_dim else None
        basis = compute_public_basis(features, dim=cfg.projection_dim, whitening=0.0, leading=leading)
    else:
        basis = compute_public_basis(features, dim=cfg.projection_dim)
    projection = basis.projection.astype(np.float32)
    # The centre is computed with the float32 projection every party applies.
    center = project_features(features, projection).mean(axis=0).astype(np.float32)
    return projection, center, name_features


def public_features(
    backbone: Backbone, cfg: RunConfig, names: tuple[str, ...] = (), *, progress: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Return the backbone's features of the seeded synthetic inputs (M, D), and of the class names (C, D) or None.

    Extracted once per backbone, cut and preprocessing into the server's feature cache; the lab extracts them
    before its engine starts (simulations/federation.prepare_simulated_sites), with a bar, in its main thread.
    """
    kind = backbone.preprocessing.kind
    draw = (lambda: generate_synthetic_texts(minilm_words())) if kind == TEXTS else generate_synthetic_images
    features = _public_features(
        backbone,
        cfg,
        draw,
        synthetic_count(kind),
        synthetic_fingerprint(kind),
        "public synthetic inputs",
        progress=progress,
    )
    if not names:
        return features, None
    texts, digest = np.asarray(names, dtype=object), hashlib.sha256("\n".join(names).encode()).hexdigest()
    fingerprint = "class-names/" + digest
    return features, _public_features(backbone, cfg, texts, len(names), fingerprint, "class names", progress=progress)


@dataclasses.dataclass(frozen=True)
class _BasisFile:
    """The public basis of one backbone, preprocessing and width, kept on disk beside the server's features.

    Public and derived only from public inputs, so storing it costs no privacy; a later run (a new process: each
    `fedtl simulate`, each ServerApp of a deployment) skips drawing the synthetic inputs and the SVD. Its key
    holds everything the basis depends on, the synthetic inputs' constants included; an unreadable or
    mis-shaped file is recomputed and rewritten (atomically), never trusted.
    """

    root: Path
    key: tuple

    @property
    def path(self) -> Path:
        digest = hashlib.sha256(json.dumps([list(self.key), WHITENING, BASIS_FORMAT], default=str).encode()).hexdigest()
        return self.root / f"{digest}.npz"

    def load(self, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
        """Return (projection, center, class names' features or None), or None when absent or unreadable."""
        if not self.path.is_file():
            return None
        try:
            with np.load(self.path) as data:
                projection, center = data["projection"], data["center"]
                names = data["names"] if "names" in data.files else None
        except NPZ_READ_ERRORS as exc:
            log.warning("public basis file %s is unreadable (%s); recomputing it", self.path, exc)
            return None
        if projection.ndim != 2 or len(projection) != dim or center.shape != (dim,):
            log.warning(
                "public basis file %s has shape %s, not (%d, D); recomputing it", self.path, projection.shape, dim
            )
            return None
        return projection, center, names

    def save(self, projection: np.ndarray, center: np.ndarray, names: np.ndarray | None) -> None:
        """Store the basis atomically; a full or read-only disk only costs the next run the SVD again."""
        arrays = {"projection": projection, "center": center} | ({} if names is None else {"names": names})
        try:
            atomic_write_npz(self.path, **arrays)
        except StorageError as exc:
            log.warning("public basis not stored (%s); the next run computes it again", exc)


def _public_features(
    backbone: Backbone,
    cfg: RunConfig,
    inputs: np.ndarray | Callable[[], np.ndarray],
    count: int,
    fingerprint: str,
    desc: str,
    *,
    progress: bool,
) -> np.ndarray:
    """Return the backbone's features of `count` public inputs (or of those `inputs()` draws on a cache miss)."""
    features, _, _ = inputs_at_cut(
        fedtl_home() / "server-cache",
        Cut(
            backbone.name,
            backbone.fingerprint,
            backbone.preprocessing,
            Adaptation.of(cfg).head_only(),
        ),
        backbone.build,
        images=inputs,
        labels=np.zeros(count, dtype=np.int64),
        data_fingerprint=fingerprint,
        batch_size=cfg.feature_batch_size,
        device=cfg.device,
        progress=progress,
        desc=desc,
    )
    return features
