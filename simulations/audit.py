"""`fedtl audit`: membership-inference attacks on an adapted model, and empirical epsilon lower bounds.

For a run of the lab (`fedtl audit runs/<id>/model.safetensors`) the run folder beside the model holds
everything: config.json rebuilds every simulated site's partition (members: the sites' training splits;
non-members: their local test splits and the server's held-out set) through the sites' own feature cache
(`simulations/baselines.load_lab_federation`), and summary.json gives the accounted epsilon per site. A
deployment's operator supplies the two sets instead (`--members DATA --non-members DATA`, loaded like site
data, features through the model's own backbone); the run folder, when present, still gives the schedule
the shadow models need.

Attacks: loss threshold (Yeom et al. 2018) and LiRA (Carlini et al. 2022) with shadow heads. Each is
summarised by AUC, TPR at 1% and 0.1% FPR and an empirical epsilon lower bound (simulations/attacks.py). A run
with `audit-canaries` also gets the one-run canary bound (Steinke, Nasr & Jagielski 2023) on site 0, the
only bound here that is rigorous for a single training run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtl.client.canaries import CANARY_SITE, draw_canaries
from fedtl.server.model_file import AdaptedModel, load_model
from fedtl.server.predict import load_model_backbone
from fedtl.server.setup import Backbone
from fedtl.shared.backbones import backbone_state_dict
from fedtl.shared.config import RunConfig
from fedtl.shared.errors import ConfigError, DataError, ModelFileError
from fedtl.shared.features import extract_features
from fedtl.shared.files import atomic_write_bytes
from fedtl.shared.heads import FROZEN_ARRAYS, head_arrays
from fedtl.shared.loaders import load_site_dataset
from fedtl.shared.protocol import jsonable
from fedtl.simulations.attacks import (
    LOW_FPRS,
    AttackResult,
    OneRunAudit,
    lira_scores,
    logit_confidence,
    loss_scores,
    one_run_audit,
    shadow_assignments,
    summarize_attack,
)
from fedtl.simulations.baselines import LabFederation, lab_settings, load_lab_federation, train_baseline_head

log = logging.getLogger(__name__)

LOSS = "loss-threshold"
LIRA_ONLINE = "lira-online"
LIRA_OFFLINE = "lira-offline"
LIRA_VARIANTS = ("online", "offline")
DEFAULT_SHADOWS = 8
PER_EXAMPLE_VARIANCE_SHADOWS = 64  # below this LiRA fits one pooled variance (Carlini et al. 2022, Sec. VI-A)
AUDIT_JSON = "audit.json"
AUDIT_MD = "audit.md"
COMPARE_STEM = "audit-compare"


@dataclass(frozen=True)
class CanaryFeatures:
    """The canaries as the auditor scores them: features, the wrong label each was trained with, its coin."""

    features: np.ndarray  # (m, D)
    labels: np.ndarray  # (m,)
    included: np.ndarray  # (m,) bool


@dataclass(frozen=True)
class AuditSets:
    """Known members and non-members (features and labels), the canaries, and what the shadows need."""

    member_features: np.ndarray  # (N1, D)
    member_labels: np.ndarray  # (N1,)
    non_member_features: np.ndarray  # (N0, D)
    non_member_labels: np.ndarray  # (N0,)
    description: str
    lab: LabFederation | None  # the run's schedule, for shadow heads (None: no run config, no LiRA)
    canaries: CanaryFeatures | None = None


@dataclass(frozen=True)
class ModelAudit:
    """Everything `fedtl audit` found about one model, as written to audit.json."""

    model: str
    run_id: str
    non_private: bool
    target_epsilon: float  # the run's budget per site (inf: the non-private baseline)
    accounted_epsilon: float  # the largest cumulative epsilon any site spent
    canary_site_epsilon: float  # what site 0 (the canaries' site) spent; nan without canaries
    delta: float
    members: str
    attacks: tuple[AttackResult, ...]
    canary: OneRunAudit | None
    shadows: int
    confidence: float
    notes: tuple[str, ...]
    seconds: float


def audit_model(
    model: str | Path,
    *,
    members: str | None = None,
    non_members: str | None = None,
    shadows: int = DEFAULT_SHADOWS,
    lira: str = "online",
    require_canaries: bool = False,
    confidence: float = 0.95,
    seed: int = 0,
    weights_file: str | Path | None = None,
    device: str = "auto",
) -> ModelAudit:
    """Run the membership-inference attacks (and the canary audit) on one adapted model.

    Args:
        model: the model file, or the run folder holding model.safetensors.
        members, non_members: data sources of known members and non-members (a deployment's audit);
            both or neither. Neither: the simulated run's own partitions, rebuilt from config.json.
        shadows: shadow heads for LiRA (an even number >= 2); 0 skips LiRA.
        lira: "online" (IN and OUT shadows) or "offline" (OUT shadows only).
        require_canaries: fail unless the run inserted canaries (the one-run audit is wanted).
        confidence: of every epsilon lower bound.
        seed: of the shadows' halves and the threshold split (the audit's own randomness).
        weights_file: backbone weights for `members`/`non_members` when the registry's differ.
        device: for feature extraction of `members`/`non_members`.

    Returns:
        The audit; `write_audit` puts it beside the model.

    Raises:
        ModelFileError: the model file is unreadable.
        ConfigError: a bad option, a missing run config where one is needed, or canaries required but absent.
        DataError: the member or non-member data is unusable.
    """
    t0 = time.perf_counter()
    if lira not in LIRA_VARIANTS:
        raise ConfigError(f"`lira` must be one of {', '.join(LIRA_VARIANTS)}, got {lira!r}")
    if shadows < 0 or shadows == 1:
        raise ConfigError(f"`shadows` must be 0 (no LiRA) or >= 2, got {shadows}")
    if (members is None) != (non_members is None):
        raise ConfigError(
            "give both --members and --non-members (known training data and data the model never saw), or neither "
            "to audit a simulated run from its own config"
        )
    path = resolve_model_path(model)
    adapted = load_model(path)
    run_dir = path.parent
    cfg = read_run_config(run_dir)
    if members is not None and non_members is not None:
        sets = operator_sets(adapted, cfg, members, non_members, weights_file=weights_file, device=device)
    else:
        if cfg is None:
            raise ConfigError(
                f"{run_dir} has no readable config.json: auditing a simulated run rebuilds its members from the run "
                "config; for any other model pass --members DATA --non-members DATA"
            )
        sets = simulated_sets(cfg, num_sites=simulated_site_count(cfg, adapted.sites))
    epsilons, delta = run_epsilons(run_dir, adapted)
    if require_canaries and sets.canaries is None:
        if members is not None:
            raise ConfigError(
                "--canaries audits a simulated run's own canaries, and --members/--non-members replace the run's "
                "sets; drop one of them"
            )
        raise ConfigError(
            f"--canaries: run {adapted.run_id} inserted no audit canaries (audit-canaries = 0); rerun it with "
            "--set audit-canaries=100, or drop --canaries"
        )
    head = adapted.build_head()
    notes: list[str] = []
    attacks = [
        summarize_attack(
            LOSS,
            loss_scores(head_logits(head, sets.member_features), sets.member_labels),
            loss_scores(head_logits(head, sets.non_member_features), sets.non_member_labels),
            delta=delta,
            confidence=confidence,
            seed=seed,
        )
    ]
    if shadows and sets.lab is None:
        notes.append("LiRA skipped: no run config beside the model, so the shadows' training schedule is unknown.")
    elif shadows:
        attacks.append(
            _lira(head, sets, shadows=shadows, online=lira == "online", delta=delta, conf=confidence, seed=seed)
        )
        notes.append(_shadow_note(sets.lab.cfg, shadows))
    canary = None
    if sets.canaries is not None:
        c = sets.canaries
        scores = logit_confidence(head_logits(head, c.features), c.labels)
        canary = one_run_audit(scores, c.included, delta=delta, confidence=confidence)
    notes += _notes(attacks[0], canary)
    site0 = f"site-{CANARY_SITE}"
    return ModelAudit(
        model=str(path),
        run_id=adapted.run_id,
        non_private=adapted.non_private,
        target_epsilon=math.inf if adapted.non_private else (cfg.target_epsilon if cfg else math.nan),
        accounted_epsilon=max(epsilons.values(), default=math.nan),
        canary_site_epsilon=epsilons.get(site0, math.nan) if canary is not None else math.nan,
        delta=delta,
        members=sets.description,
        attacks=tuple(attacks),
        canary=canary,
        shadows=shadows if sets.lab is not None else 0,
        confidence=confidence,
        notes=tuple(notes),
        seconds=time.perf_counter() - t0,
    )


def resolve_model_path(model: str | Path) -> Path:
    """Return the model file named by `model`: the file itself, or model.safetensors in a run folder."""
    path = Path(model).expanduser()
    return path / "model.safetensors" if path.is_dir() else path


def read_run_config(run_dir: Path) -> RunConfig | None:
    """Return the RunConfig recorded in a run folder's config.json (None when there is none)."""
    path = run_dir / "config.json"
    if not path.is_file():
        return None
    try:
        return RunConfig.from_mapping(json.loads(path.read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"{path} is unreadable or not a fedtl run config ({exc}); audit with --members/--non-members instead"
        ) from exc


def simulated_site_count(cfg: RunConfig, sites: tuple[str, ...]) -> int:
    """Return how many partitions a simulated run split its data into (sites that refused still held one).

    The lab sets `min-available-nodes` to the number of simulated sites; site names are `site-<partition id>`.
    """
    ids = [int(name.rsplit("-", 1)[1]) for name in sites if name.rsplit("-", 1)[-1].isdigit()]
    return max(cfg.min_available_nodes, 1 + max(ids, default=0))


def run_epsilons(run_dir: Path, model: AdaptedModel) -> tuple[dict[str, float], float]:
    """Return each site's accounted (cumulative) epsilon and the delta: summary.json first, else the model file."""
    summary = run_dir / "summary.json"
    if summary.is_file():
        data = json.loads(summary.read_text())
        return {site: float(eps) for site, eps in data["epsilon-per-site"].items()}, float(data["delta"])
    if not model.privacy:
        raise ModelFileError(f"{run_dir} has no summary.json and the model records no privacy spend per site")
    epsilons = {site: float(spend.get("epsilon", math.inf)) for site, spend in model.privacy.items()}
    deltas = {float(spend.get("delta", math.nan)) for spend in model.privacy.values()}
    return epsilons, max(deltas)


@torch.no_grad()
def head_logits(head: torch.nn.Module, features: np.ndarray, *, batch_size: int = 4096) -> np.ndarray:
    """Return the head's logits (N, C) on features (N, D), in float64."""
    head.eval()
    out = [
        head(torch.as_tensor(features[i : i + batch_size], dtype=torch.float32)).double().numpy()
        for i in range(0, len(features), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, 0))


def simulated_sets(cfg: RunConfig, *, num_sites: int) -> AuditSets:
    """Return a simulated run's members (site training splits) and non-members (site tests, server test set).

    The canaries of a run with `audit-canaries` are rebuilt from the run seed (client/canaries.py) and scored
    on the server's features of their images; they are taken out of site 0's members (where the included
    ones were appended) and out of the server's non-members (their images are the canaries).

    Raises:
        ConfigError: the run's canaries are not where the run config says they are.
    """
    lab = load_lab_federation(cfg, num_sites)
    central = lab.central
    member_x = [s.train_features for s in lab.sites]
    member_y = [s.train_labels for s in lab.sites]
    non_x = [s.test_features for s in lab.sites]
    non_y = [s.test_labels for s in lab.sites]
    canaries = None
    if cfg.audit_canaries:
        if central is None:
            raise ConfigError("the run has audit canaries but its data has no server test split to rebuild them from")
        drawn = draw_canaries(central.labels, lab.num_classes, count=cfg.audit_canaries, seed=cfg.seed)
        canaries = CanaryFeatures(central.inputs[drawn.indices], drawn.labels, drawn.included)
        member_x[CANARY_SITE], member_y[CANARY_SITE] = _strip_canaries(
            member_x[CANARY_SITE], member_y[CANARY_SITE], canaries
        )
        keep = np.ones(len(central.labels), dtype=bool)
        keep[drawn.indices] = False
        non_x.append(central.inputs[keep])
        non_y.append(central.labels[keep])
    elif central is not None:
        non_x.append(central.inputs)
        non_y.append(central.labels)
    held_out = " + the server's held-out set" if central is not None else ""
    return AuditSets(
        member_features=np.concatenate(member_x),
        member_labels=np.concatenate(member_y),
        non_member_features=np.concatenate(non_x),
        non_member_labels=np.concatenate(non_y),
        description=f"members: the {num_sites} sites' training splits; non-members: their local test splits"
        + held_out
        + (" (canary images left out of both)" if canaries is not None else ""),
        lab=lab,
        canaries=canaries,
    )


def _strip_canaries(
    features: np.ndarray, labels: np.ndarray, canaries: CanaryFeatures
) -> tuple[np.ndarray, np.ndarray]:
    """Return site 0's training features without its appended canaries, after checking they are there."""
    n_in = int(canaries.included.sum())
    if n_in == 0:
        return features, labels
    tail_x, tail_y = features[-n_in:], labels[-n_in:]
    if not (
        np.array_equal(tail_y, canaries.labels[canaries.included])
        and np.allclose(tail_x, canaries.features[canaries.included], rtol=1e-3, atol=1e-3)
    ):
        raise ConfigError(
            f"the run config has audit-canaries = {len(canaries.labels)}, but site {CANARY_SITE}'s training features "
            f"do not end with its {n_in} included canaries: the simulated sites of this fedtl did not receive "
            "`audit-canaries` (SimulationSettings must carry it), so the run holds no canaries to audit"
        )
    return features[:-n_in], labels[:-n_in]


def operator_sets(
    model: AdaptedModel,
    cfg: RunConfig | None,
    members: str,
    non_members: str,
    *,
    weights_file: str | Path | None,
    device: str,
) -> AuditSets:
    """Return operator-supplied members and non-members, their features through the model's own backbone.

    Each source is loaded and validated like site data (shared/loaders.load_site_dataset, in the model's
    class order); all its examples (its train and test splits alike) count.
    """
    backbone = load_model_backbone(model, weights_file=weights_file)
    reader = model.adapt_backbone(backbone)  # the backbone as the head reads it (its feature block)
    sets = []
    for role, source in (("members", members), ("non-members", non_members)):
        data = load_site_dataset(source, label_names=model.label_names)
        parts = [s for s in (data.splits.train, data.splits.test) if s is not None and len(s)]
        images = np.concatenate([s.images for s in parts])
        if not len(images):
            raise DataError(f"--{role} {source} holds no images")
        feats = extract_features(reader, images, model.preprocessing, device=device, progress=False, desc=role)
        sets.append((feats, np.concatenate([s.labels for s in parts])))
    lab = None
    if cfg is not None:
        state = backbone_state_dict(backbone)
        spec = Backbone(model.backbone_name, model.backbone_fingerprint, state, model.feature_dim, model.preprocessing)
        cfg = cfg.replace(feature_block=model.feature_block)
        lab = LabFederation(cfg, spec, model.label_names, *lab_settings(cfg, spec, model.label_names), [], None)
    return AuditSets(
        sets[0][0], sets[0][1], sets[1][0], sets[1][1], f"members: {members}; non-members: {non_members}", lab
    )


def _lira(
    head: torch.nn.Module, sets: AuditSets, *, shadows: int, online: bool, delta: float, conf: float, seed: int
) -> AttackResult:
    """Train shadow heads on random halves of members + non-members and return LiRA's attack summary."""
    lab = sets.lab
    assert lab is not None
    pool_x = np.concatenate([sets.member_features, sets.non_member_features])
    pool_y = np.concatenate([sets.member_labels, sets.non_member_labels])
    keep = shadow_assignments(shadows, len(pool_y), seed=seed)
    epsilon = None if lab.cfg.non_private else lab.cfg.target_epsilon
    confidences = np.empty((shadows, len(pool_y)))
    # The run's frozen buffers (an auto run's public projection and centre): the shadows share the target's map.
    arrays = head_arrays(head)
    frozen = {name: arrays[name] for name in FROZEN_ARRAYS} if "projection" in arrays else None
    for j in range(shadows):
        t0 = time.perf_counter()
        shadow = train_baseline_head(
            lab, pool_x[keep[j]], pool_y[keep[j]], target_epsilon=epsilon, seed=seed + 7 + j, frozen=frozen
        )
        confidences[j] = logit_confidence(head_logits(shadow.head, pool_x), pool_y)
        log.info("shadow %d/%d trained in %.1f s", j + 1, shadows, time.perf_counter() - t0)
    target = logit_confidence(head_logits(head, pool_x), pool_y)
    scores = lira_scores(
        target, confidences, keep, online=online, global_variance=shadows < PER_EXAMPLE_VARIANCE_SHADOWS
    )
    n1 = len(sets.member_labels)
    return summarize_attack(
        LIRA_ONLINE if online else LIRA_OFFLINE, scores[:n1], scores[n1:], delta=delta, confidence=conf, seed=seed
    )


def _shadow_note(cfg: RunConfig, shadows: int) -> str:
    dp = "non-private (as the run)" if cfg.non_private else f"DP-SGD at the run's target epsilon {cfg.target_epsilon:g}"
    variance = "one pooled variance" if shadows < PER_EXAMPLE_VARIANCE_SHADOWS else "per-example variances"
    return (
        f"LiRA: {shadows} shadow heads, each trained centrally on a random half of members + non-members with the "
        f"run's schedule ({cfg.num_rounds} rounds x {cfg.local_epochs} local epochs, batch {cfg.batch_size}, "
        f"learning rate {cfg.learning_rate:g}, clipping {cfg.max_grad_norm:g}"
        + (
            f"; the run's {cfg.projection_dim}-dim public projection and centre, frozen"
            if cfg.head == "projected"
            else ""
        )
        + f"), {dp}, {variance}. A shadow "
        "approximates the federated target (sites training apart, their heads averaged); it does not replicate it."
    )


def _notes(attack: AttackResult, canary: OneRunAudit | None) -> list[str]:
    notes = [
        "Threshold bounds: Clopper-Pearson at the stated confidence; 'split' chooses the threshold on a random half "
        "and bounds on the other, 'Bonferroni' tests every threshold on all data. They read each example as an "
        "independent trial; only the canary bound is rigorous for one training run."
    ]
    if attack.num_non_members < 1000:
        notes.append(
            f"Only {attack.num_non_members} non-members: the smallest FPR above 0 is {attack.fpr_resolution:.2%}, "
            "so a TPR at an FPR below it is the TPR at zero false positives (exact, not interpolated)."
        )
    if canary is not None:
        notes.append(
            f"Canaries: {canary.canaries} mislabelled held-out images, {canary.included} included in site 0's data "
            f"by fair coins from the run seed; guesses: top {canary.guesses_in} 'in', bottom {canary.guesses_out} "
            f"'out' by logit-scaled confidence on the canary label; {canary.tests} guess counts tried (Bonferroni)."
        )
    return notes


# --- reports --------------------------------------------------------------------------------------------


def audit_to_dict(audit: ModelAudit) -> dict[str, Any]:
    """Return the audit as strict-JSON-able data with kebab-case keys, like summary.json (non-finite floats as text)."""
    return _kebab_keys(jsonable(dataclasses.asdict(audit)))


def _kebab_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key).replace("_", "-"): _kebab_keys(v) for key, v in value.items()}
    if isinstance(value, list):
        return [_kebab_keys(v) for v in value]
    return value


def write_audit(audit: ModelAudit, folder: Path | None = None) -> tuple[Path, Path]:
    """Write audit.json and audit.md (beside the model unless `folder` is given); return their paths."""
    folder = Path(audit.model).parent if folder is None else folder
    json_path, md_path = folder / AUDIT_JSON, folder / AUDIT_MD
    atomic_write_bytes(json_path, (json.dumps(audit_to_dict(audit), indent=2, sort_keys=True) + "\n").encode())
    atomic_write_bytes(md_path, audit_markdown(audit).encode())
    return json_path, md_path


def audit_markdown(audit: ModelAudit) -> str:
    """Return the audit of one model as Markdown: a table per attack family, then the notes."""
    pct = int(round(audit.confidence * 100))
    lines = [f"# Privacy audit of `{audit.run_id}`", ""]
    if audit.non_private:
        lines += ["**NON-PRIVATE BASELINE: trained without differential privacy.**", ""]
    lines += [
        f"- Model: `{audit.model}`",
        f"- Accounted epsilon (largest cumulative over sites): {_eps(audit.accounted_epsilon)} at delta "
        f"{audit.delta:g}; the run's target {_eps(audit.target_epsilon)}",
        f"- {audit.members}",
        "",
        "## Membership-inference attacks",
        "",
        f"| attack | members | non-members | AUC | TPR@1% FPR | TPR@0.1% FPR | eps lower bound ({pct}%, split) "
        f"| eps lower bound ({pct}%, Bonferroni) | accounted eps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for a in audit.attacks:
        lines.append(
            f"| {a.attack} | {a.num_members} | {a.num_non_members} | {a.auc:.3f} | {_tpr(a, LOW_FPRS[0])} "
            f"| {_tpr(a, LOW_FPRS[1])} | {a.bound.epsilon:.3f} | {a.bound_bonferroni.epsilon:.3f} "
            f"| {_eps(audit.accounted_epsilon)} |"
        )
    if any(not all(a.low_fpr_resolved.values()) for a in audit.attacks):
        lines += ["", "\\* below the data's FPR resolution: the TPR at zero false positives (see notes)."]
    if audit.canary is not None:
        c = audit.canary
        lines += [
            "",
            "## One-run canary audit (Steinke, Nasr & Jagielski 2023)",
            "",
            f"| canaries | included | AUC in vs out | guesses in / out | correct | eps lower bound ({pct}%) "
            f"| accounted eps (site-{CANARY_SITE}) |",
            "|---|---|---|---|---|---|---|",
            f"| {c.canaries} | {c.included} | {c.auc:.3f} | {c.guesses_in} / {c.guesses_out} | {c.correct} "
            f"| {c.epsilon:.3f} | {_eps(audit.canary_site_epsilon)} |",
        ]
    lines += ["", "## Notes", ""] + [f"- {note}" for note in audit.notes]
    lines += ["", f"Audit took {audit.seconds:.1f} s with {audit.shadows} shadow heads."]
    return "\n".join(lines) + "\n"


def compare_markdown(audits: list[ModelAudit]) -> str:
    """Return several audits side by side (DP and non-DP runs): one row per model and attack."""
    pct = int(round(audits[0].confidence * 100)) if audits else 95
    lines = [
        "# Privacy audits side by side",
        "",
        f"| run | DP | accounted eps | attack | AUC | TPR@1% FPR | TPR@0.1% FPR | eps lower bound ({pct}%) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for audit in audits:
        dp = "no (non-private)" if audit.non_private else f"yes (target {_eps(audit.target_epsilon)})"
        for a in audit.attacks:
            lines.append(
                f"| {audit.run_id} | {dp} | {_eps(audit.accounted_epsilon)} | {a.attack} | {a.auc:.3f} "
                f"| {_tpr(a, LOW_FPRS[0])} | {_tpr(a, LOW_FPRS[1])} | {a.bound.epsilon:.3f} |"
            )
        if audit.canary is not None:
            c = audit.canary
            lines.append(
                f"| {audit.run_id} | {dp} | {_eps(audit.canary_site_epsilon)} (site-{CANARY_SITE}) "
                f"| one-run canaries ({c.correct}/{c.guesses_in + c.guesses_out} right) | {c.auc:.3f} | - | - "
                f"| {c.epsilon:.3f} |"
            )
    lines += [
        "",
        "Threshold-attack bounds use the split method (threshold chosen on one half, bound on the other). "
        "An empirical lower bound above the accounted epsilon would mean a privacy bug.",
    ]
    return "\n".join(lines) + "\n"


def write_comparison(audits: list[ModelAudit], out: Path) -> tuple[Path, Path]:
    """Write audit-compare.json and audit-compare.md into `out`; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{COMPARE_STEM}.json", out / f"{COMPARE_STEM}.md"
    payload = {"audits": [audit_to_dict(a) for a in audits]}
    atomic_write_bytes(json_path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())
    atomic_write_bytes(md_path, compare_markdown(audits).encode())
    return json_path, md_path


def _eps(value: float) -> str:
    if math.isnan(value):
        return "-"
    return "inf" if math.isinf(value) else f"{value:.3f}"


def _tpr(attack: AttackResult, fpr: float) -> str:
    value = f"{attack.tpr_at_low_fpr[fpr]:.3f}"
    return value if attack.low_fpr_resolved[fpr] else f"{value}*"


def run_audit_command(args: Any) -> int:
    """Run `fedtl audit MODEL...`: audit each model, write its report beside it, and compare several."""
    audits = []
    for model in args.models:
        audit = audit_model(
            model,
            members=args.members,
            non_members=args.non_members,
            shadows=args.shadows,
            lira=args.lira,
            require_canaries=args.canaries,
            confidence=args.confidence,
            seed=args.seed,
            weights_file=args.backbone_weights,
            device=args.device,
        )
        json_path, md_path = write_audit(audit)
        print(audit_markdown(audit))
        print(f"wrote {json_path} and {md_path}")
        audits.append(audit)
    if len(audits) > 1:
        out = Path(args.out) if args.out else Path(audits[0].model).parent.parent
        json_path, md_path = write_comparison(audits, out)
        print(compare_markdown(audits))
        print(f"wrote {json_path} and {md_path}")
    return 0
