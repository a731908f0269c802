"""Rank candidate backbones before any training: sites score each one, the server aggregates and recommends.

Every site computes LogME and the H-score of each candidate on its cached training features
(client/ranking.py) and sends back scalars only; the server takes their site-size-weighted means, ranks
the candidates by LogME, and says how sure it can be. Writes `ranking.json` and `ranking.md`.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import flwr
import numpy as np
import torch
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedtl.server.report import failure_reason, reply_site_name
from fedtl.server.setup import (
    ask,
    distribute_backbone,
    federation_label_names,
    load_server_backbone,
    load_server_data,
    query_sites,
    round_config,
    wait_for_nodes,
)
from fedtl.server.solvers.auto import resolve_feature_block
from fedtl.shared import constants as k
from fedtl.shared.backbones import get_backbone_spec
from fedtl.shared.config import RunConfig
from fedtl.shared.errors import ConfigError, FederationError
from fedtl.shared.files import atomic_write_bytes
from fedtl.shared.protocol import jsonable

log = logging.getLogger(__name__)

PRIMARY = k.LOGME  # the estimator that ranks; the others are shown beside it as a second opinion
MARGIN_Z = 2.0  # the top candidate's lead counts as real only beyond this many standard errors
MEDICAL_WARNING = (
    "transferability estimators are weak predictors of transfer performance on medical images: Chaves, Valle, "
    "Bissoto & Avila 2024, 'Back to the Basics on Predicting Transfer Performance' (arXiv 2405.20420), evaluated "
    "13 scorers (LogME, H-score and LEEP among them) on 11 datasets and found that all of them suffer on medical "
    "datasets and that few beat the backbones' plain ImageNet accuracy. Treat this ranking as a hint; confirm it "
    "with short federated runs of the top candidates"
)
NON_DP_WARNING = (
    "the sites' transferability scores and example counts are exact functions of their private data, released "
    "WITHOUT differential privacy and not covered by their epsilon (sites whose policy sets "
    "release-evaluation-metrics = false refuse)"
)


@dataclass(frozen=True)
class Margin:
    """The top candidate's lead over the runner-up in the primary estimator, and how noisy it is."""

    leader: str
    runner_up: str
    value: float  # site-size-weighted mean over the sites that scored both, of (leader - runner-up)
    standard_error: float  # across those sites; nan with fewer than 2
    num_sites: int

    @property
    def within_noise(self) -> bool:
        """True when the lead is below MARGIN_Z standard errors, or its noise cannot be estimated (< 2 sites)."""
        return not (self.num_sites >= 2 and self.value > MARGIN_Z * self.standard_error)


@dataclass
class CandidateScores:
    """What the sites answered for one candidate backbone."""

    name: str
    fingerprint: str
    image_size: int
    feature_dim: int
    sites: dict[str, dict[str, float]] = field(default_factory=dict)  # site -> {num-examples, logme, h-score}
    refused: dict[str, str] = field(default_factory=dict)  # site -> why it gave no scores
    bytes_sent: dict[str, int] = field(default_factory=dict)  # site -> backbone bytes sent (0: cached there)


def weighted_mean(values: np.ndarray, weights: np.ndarray) -> float:
    """Return the weighted mean of `values`."""
    return float(np.average(values, weights=weights))


def weighted_standard_error(values: np.ndarray, weights: np.ndarray) -> float:
    """Return the standard error of a weighted mean across sites; nan for fewer than 2 sites.

    The ratio-estimator variance of Cochran 1977 ("Sampling Techniques", 3rd ed., eq. 6.13; the form of Gatz &
    Smith 1995, "The standard error of a weighted mean concentration"): with p_s = w_s / sum(w),
    SE^2 = S / (S - 1) * sum_s p_s^2 (v_s - mean)^2. With equal weights it is the usual s / sqrt(S).
    Sites are treated as the sampling units: the noise it measures is how much the score varies between sites.
    """
    values, weights = np.asarray(values, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    count = len(values)
    if count < 2:
        return math.nan
    p = weights / weights.sum()
    mean = float(np.sum(p * values))
    return math.sqrt(count / (count - 1) * float(np.sum(p**2 * (values - mean) ** 2)))


def aggregate_candidate(scores: CandidateScores) -> dict[str, Any]:
    """Return a candidate's site-size-weighted mean and standard error per estimator, its sites and examples."""
    names = sorted(scores.sites)
    weights = np.array([scores.sites[s][k.NUM_EXAMPLES] for s in names], dtype=np.float64)
    out: dict[str, Any] = {
        "fingerprint": scores.fingerprint,
        "image-size": scores.image_size,
        "feature-dim": scores.feature_dim,
        "num-sites": len(names),
        k.NUM_EXAMPLES: int(weights.sum()),
        "sites": {s: dict(scores.sites[s]) for s in names},
        "refused": dict(sorted(scores.refused.items())),
        "backbone-bytes-sent-per-site": dict(sorted(scores.bytes_sent.items())),
    }
    for estimator in k.RANK_ESTIMATORS:
        values = np.array([scores.sites[s][estimator] for s in names], dtype=np.float64)
        out[estimator] = weighted_mean(values, weights) if names else math.nan
        out[f"{estimator}-standard-error"] = weighted_standard_error(values, weights) if names else math.nan
    return out


def estimate_margin(leader: CandidateScores, runner_up: CandidateScores, estimator: str = PRIMARY) -> Margin:
    """Return the leader's lead over the runner-up, paired by site, and its standard error across sites.

    Pairing removes what the two backbones share at a site (its class mix, its size), so the noise is that of
    the per-site differences, weighted by the site's examples.
    """
    common = sorted(set(leader.sites) & set(runner_up.sites))
    diffs = np.array([leader.sites[s][estimator] - runner_up.sites[s][estimator] for s in common])
    weights = np.array([leader.sites[s][k.NUM_EXAMPLES] for s in common], dtype=np.float64)
    value = weighted_mean(diffs, weights) if common else math.nan
    return Margin(leader.name, runner_up.name, value, weighted_standard_error(diffs, weights), len(common))


def rank_backbones(grid: Grid, cfg: RunConfig, candidates: list[str], *, run_dir: Path | None = None) -> dict:
    """Ask every site to score each candidate backbone on its features; rank them and recommend one.

    For each candidate in turn, the sites are asked (as before a run) whether they hold its weights, and
    those that do not receive them (`distribute_backbone`; the site's policy checks the backbone's
    fingerprint first); then each site replies to a `rank` query with LogME, H-score and its number of
    training examples. Per candidate, the server averages each estimator over the sites weighted by their
    examples, ranks by LogME (larger is better), and warns when the leader's margin is within noise (below
    MARGIN_Z standard errors of the per-site paired difference, or fewer than 2 sites to tell), when the
    H-score disagrees, and always that such estimators are weak on medical data (arXiv 2405.20420).

    Args:
        grid: Flower's Grid (simulation or deployment).
        cfg: the run configuration the candidates would be trained with (data, classes, privacy settings the
            sites' policies check); its `backbone` is ignored.
        candidates: registered backbone names, at least 2, no repeats.
        run_dir: where to write ranking.json and ranking.md; a fresh `out/<id>/` when None.

    Returns:
        The ranking summary (also in ranking.json): per-candidate means, standard errors and per-site scores,
        the order, the recommendation, the margin and every warning.

    Raises:
        ConfigError: fewer than 2 candidates, repeats, or an unknown backbone name.
        FederationError: no site scored some candidate.
    """
    t_start = time.time()
    candidates = check_candidates(candidates)
    ranking_id, run_dir = _ranking_dir(cfg, run_dir)
    log.warning("backbone ranking %s: %s", ranking_id, NON_DP_WARNING)
    splits = load_server_data(cfg)
    label_names = federation_label_names(cfg, splits)
    node_ids = wait_for_nodes(grid, cfg.min_available_nodes, timeout=cfg.round_timeout)
    scored = [
        score_candidate(grid, cfg.replace(backbone=name), node_ids, label_names, ranking_id=ranking_id, run_dir=run_dir)
        for name in candidates
    ]
    empty = [c.name for c in scored if not c.sites]
    if empty:
        refusals = {c.name: c.refused for c in scored if c.name in empty}
        raise FederationError(f"no site scored backbone(s) {empty}; their refusals: {refusals}")
    summary = summarise_ranking(cfg, scored, ranking_id=ranking_id, run_dir=run_dir)
    summary["seconds"] = time.time() - t_start
    for text in summary["warnings"]:
        log.warning("backbone ranking %s: %s", ranking_id, text)
    _write(run_dir / "ranking.json", json.dumps(jsonable(summary), indent=2, sort_keys=True) + "\n")
    _write(run_dir / "ranking.md", ranking_report(summary))
    log.info("backbone ranking %s: recommended %s; report %s", ranking_id, summary["recommended"], run_dir)
    return summary


def check_candidates(candidates: list[str]) -> list[str]:
    """Return the candidate names, checked: at least 2, no repeats, every one registered.

    Raises:
        ConfigError: naming the offending value and the fix.
    """
    names = [str(c).strip() for c in candidates if str(c).strip()]
    if len(names) < 2:
        raise ConfigError(f"`backbones` must name at least 2 candidates to rank, got {names}")
    repeats = sorted({n for n in names if names.count(n) > 1})
    if repeats:
        raise ConfigError(f"`backbones` names {repeats} more than once; list each candidate once")
    for name in names:
        try:
            get_backbone_spec(name)
        except Exception as exc:  # noqa: BLE001 - the registry's message lists the known names
            raise ConfigError(f"`backbones`: {exc}") from exc
    return names


def score_candidate(
    grid: Grid, cfg: RunConfig, node_ids: list[int], label_names: tuple[str, ...], *, ranking_id: str, run_dir: Path
) -> CandidateScores:
    """Install backbone `cfg.backbone` where missing and collect every willing site's scores of it.

    The scores are of the features a run of `cfg` would read (its feature block, resolved as the run resolves it).
    """
    cfg = resolve_feature_block(cfg)
    backbone = load_server_backbone(cfg)
    config = round_config(cfg, backbone, label_names, run_id=ranking_id, run_dir=run_dir)
    out = CandidateScores(backbone.name, backbone.fingerprint, backbone.preprocessing.image_size, backbone.feature_dim)
    setup = distribute_backbone(grid, node_ids, backbone, config, timeout=cfg.round_timeout)
    out.bytes_sent.update(setup.bytes_sent)
    for node_id, reason in setup.refused.items():
        out.refused[setup.names.get(node_id, f"node-{node_id}")] = reason
    for node_id in sorted(setup.no_evaluation):
        out.refused[setup.names[node_id]] = "its policy keeps evaluation metrics local (release-evaluation-metrics)"
    targets = [n for n in node_ids if n not in setup.refused and n not in setup.no_evaluation]
    replies = query_sites(grid, targets, RecordDict({k.CONFIG: ask(config, k.ACTION_RANK)}), cfg.round_timeout)
    for node_id in targets:
        name = setup.names.get(node_id, f"node-{node_id}")
        reply = replies.get(node_id)
        reason = f"no answer to the rank query within {cfg.round_timeout:.0f} s" if reply is None else None
        reason = reason or failure_reason(reply) or check_rank_reply(reply)  # type: ignore[arg-type]
        if reason:
            log.warning("site %s gave no scores for backbone %s: %s", name, backbone.name, reason)
            out.refused[name] = reason
            continue
        metrics = reply.content.metric_records[k.METRICS]  # type: ignore[union-attr]
        out.sites[reply_site_name(reply)] = {key: float(metrics[key]) for key in (k.NUM_EXAMPLES, *k.RANK_ESTIMATORS)}  # type: ignore[union-attr]
    return out


def check_rank_reply(reply: Message) -> str | None:
    """Return what is wrong with a rank reply's metrics, or None: exactly the estimators and a positive count."""
    metrics = reply.content.metric_records.get(k.METRICS)
    expected = {k.NUM_EXAMPLES, *k.RANK_ESTIMATORS}
    if metrics is None or set(metrics) != expected:
        got = sorted(metrics) if metrics is not None else None
        return f"rank reply metrics must be exactly {sorted(expected)}, got {got}"
    values = {key: metrics[key] for key in expected}
    if any(isinstance(v, (list, bool)) or not math.isfinite(float(v)) for v in values.values()):  # type: ignore[arg-type]
        return f"rank reply metrics must be finite numbers, got {values}"
    count = values[k.NUM_EXAMPLES]
    if float(count) < 2 or float(count) != int(count):  # type: ignore[arg-type]
        return f"`{k.NUM_EXAMPLES}` must be a whole number >= 2, got {count!r}"
    return None


def summarise_ranking(cfg: RunConfig, scored: list[CandidateScores], *, ranking_id: str, run_dir: Path) -> dict:
    """Return the ranking summary: per-candidate aggregates, order by each estimator, recommendation, warnings."""
    backbones = {c.name: aggregate_candidate(c) for c in scored}
    order = {
        est: sorted(backbones, key=lambda n: (-backbones[n][est], list(backbones).index(n)))
        for est in k.RANK_ESTIMATORS
    }
    by_name = {c.name: c for c in scored}
    leader, runner_up = order[PRIMARY][0], order[PRIMARY][1]
    margin = estimate_margin(by_name[leader], by_name[runner_up])
    warnings = []
    if margin.num_sites < 2:
        warnings.append(
            f"{leader} leads {runner_up} by {margin.value:.4g} {PRIMARY} but only {margin.num_sites} site(s) scored "
            "both, so the margin's noise cannot be estimated: treat the two as tied"
        )
    elif margin.within_noise:
        warnings.append(
            f"{leader}'s {PRIMARY} lead over {runner_up} ({margin.value:.4g}) is within noise: below {MARGIN_Z:g} x "
            f"its standard error across {margin.num_sites} sites ({margin.standard_error:.3g}, site-size-weighted, "
            "paired by site); treat the two as tied"
        )
    for est in k.RANK_ESTIMATORS:
        if est != PRIMARY and order[est][0] != leader:
            warnings.append(f"{est} ranks {order[est][0]} first where {PRIMARY} ranks {leader} first")
    site_sets = {frozenset(c.sites) for c in scored}
    if len(site_sets) > 1:
        warnings.append(
            "the candidates were scored by different sets of sites (refusals), so their means are not over the "
            "same data: " + "; ".join(f"{c.name}: {sorted(c.sites)}" for c in scored)
        )
    warnings.append(MEDICAL_WARNING)
    return {
        "ranking-id": ranking_id,
        "run-dir": str(run_dir),
        "config": cfg.to_mapping(),
        "versions": {"flwr": flwr.__version__, "torch": torch.__version__},
        "candidates": [c.name for c in scored],
        "estimators": list(k.RANK_ESTIMATORS),
        "primary": PRIMARY,
        "features": "training-split features, L2-normalised per example as the head's first step",
        "backbones": backbones,
        "ranking": order[PRIMARY],
        "ranking-by": order,
        "recommended": leader,
        "margin": {
            "leader": margin.leader,
            "runner-up": margin.runner_up,
            "estimator": PRIMARY,
            "value": margin.value,
            "standard-error": margin.standard_error,
            "num-sites": margin.num_sites,
            "z": MARGIN_Z,
            "within-noise": margin.within_noise,
            "noise-estimate": "site-size-weighted standard error across sites of the per-site paired difference",
        },
        "warnings": warnings,
        "non-dp-release": NON_DP_WARNING,
    }


def ranking_report(summary: dict) -> str:
    """Return ranking.md: the table, the recommendation, the warnings, per-site scores, and what the scores reveal."""
    cfg = summary["config"]
    backbones = summary["backbones"]
    estimators = summary["estimators"]
    lines = [
        f"# Backbone ranking {summary['ranking-id']}",
        "",
        f"Data `{cfg['data']}`, partition `{cfg['partition']}`, seed {cfg['seed']}. Each site scored every candidate "
        f"on its {summary['features']}; the table shows site-size-weighted means ± standard error across sites. "
        f"Ranked by {summary['primary']} (larger = predicted to transfer better).",
        "",
        "| rank | backbone | "
        + " | ".join(f"{e} (mean ± SE)" for e in estimators)
        + " | sites | examples | input px |",
        "|---:|---|" + "---:|" * len(estimators) + "---:|---:|---:|",
    ]
    for i, name in enumerate(summary["ranking"], start=1):
        b = backbones[name]
        cells = [f"{b[e]:.4f} ± {_fmt(b[f'{e}-standard-error'])}" for e in estimators]
        lines.append(
            f"| {i} | {name} | "
            + " | ".join(cells)
            + f" | {b['num-sites']} | {b[k.NUM_EXAMPLES]} | {b['image-size']} |"
        )
    m = summary["margin"]
    verdict = "within noise: treat as tied" if m["within-noise"] else f"beyond {m['z']:g} standard errors"
    lines += [
        "",
        f"**Recommended: {summary['recommended']}.** Its {m['estimator']} lead over {m['runner-up']} is "
        f"{m['value']:.4g} ± {_fmt(m['standard-error'])} over {m['num-sites']} sites ({verdict}). Noise estimate: "
        f"{m['noise-estimate']}.",
        "",
        "## Warnings",
        "",
        *[f"- {w}" for w in summary["warnings"]],
        "",
        "## Per site",
        "",
        "| site | " + " | ".join(f"{n} {e}" for n in summary["ranking"] for e in estimators) + " | examples |",
        "|---|" + "---:|" * (len(estimators) * len(backbones) + 1),
    ]
    sites = sorted({s for b in backbones.values() for s in b["sites"]})
    for site in sites:
        cells = []
        count = ""
        for name in summary["ranking"]:
            scores = backbones[name]["sites"].get(site)
            cells += [f"{scores[e]:.4f}" if scores else "-" for e in estimators]
            count = count or (str(int(scores[k.NUM_EXAMPLES])) if scores else "")
        lines.append(f"| {site} | " + " | ".join(cells) + f" | {count} |")
    refusals = [(n, s, r) for n in summary["ranking"] for s, r in backbones[n]["refused"].items()]
    if refusals:
        lines += ["", "Sites that gave no scores:", *[f"- {s} for {n}: {r}" for n, s, r in refusals]]
    lines += ["", "## What the scores reveal", "", *[f"- {t}" for t in WHAT_SCORES_REVEAL], ""]
    return "\n".join(lines)


WHAT_SCORES_REVEAL = (
    "Each site released, per candidate backbone, one LogME and one H-score and its number of training examples. "
    "They are exact, noise-free functions of the site's private features and labels: NOT differentially private "
    "and not charged to its epsilon, like federated evaluation metrics. A site whose policy sets "
    "release-evaluation-metrics = false refuses, and a site answers only for backbones its policy allows.",
    "LogME (You et al. 2021) is the per-example log evidence of a Bayesian linear model predicting the site's "
    "one-hot labels from the backbone's features, averaged over the classes the site holds: how well a linear model "
    "explains this site's labels. It depends on the site's class mix as well as on the backbone.",
    "The H-score (Bao et al. 2019) is how far apart the site's class means lie relative to the (shrunk) spread "
    "of its features: the separability of its classes.",
    "Across candidates, a site's scores reveal the relative separability of its classes under each backbone; "
    "across sites, differing scores hint at differing data (class mix, image domain, label noise). With m "
    "candidates a site releases 2m such scalars, more with every ranking run.",
    "The example counts weight the means and are disclosed exactly, as in training (`num-examples`). No single "
    "example's influence is bounded: on a small site one example can move a score noticeably.",
)


def _fmt(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _ranking_dir(cfg: RunConfig, run_dir: Path | None) -> tuple[str, Path]:
    """Return the ranking's id and its (new or empty) folder."""
    if run_dir is None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        ranking_id = f"{stamp}-{cfg.run_name or 'rank-backbones'}-{secrets.token_hex(2)}"
        run_dir = Path(cfg.out) / ranking_id
        run_dir.mkdir(parents=True, exist_ok=False)
        return ranking_id, run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"ranking folder {run_dir} is not empty; results of another run would be overwritten")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir.name, run_dir


def _write(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
