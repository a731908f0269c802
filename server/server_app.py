"""The federation's Flower ServerApp: distribute the backbone, run the strategy, export the model."""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import flwr
import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedtl.server.checkpoint import Checkpoint, load_checkpoint, restore_strategy_state, save_checkpoint, strategy_state
from fedtl.server.closed_form import closed_form_config, run_closed_form
from fedtl.server.deep_server import DeepCentralEvaluation, deep_model_fields, initial_backbone_arrays
from fedtl.server.model_file import AdaptedModel, save_model
from fedtl.server.report import RunRecorder, failure_reason, reply_site_name, weighted_site_metrics
from fedtl.server.strategy import make_strategy
from fedtl.shared import constants as k
from fedtl.shared.backbones import (
    Preprocessing,
    backbone_state_dict,
    build_backbone,
    count_state_bytes,
    fingerprint_state_dict,
    get_backbone_spec,
    resolve_preprocessing,
)
from fedtl.shared.centering import (
    CENTERING_BUDGET_SHARE,
    MAX_CENTER_NOISE_NORM,
    center_noise_norm,
    centering_noise_multiplier,
)
from fedtl.shared.config import AUTO, RunConfig, fedtl_home
from fedtl.shared.data import DataSplits, load_dataset
from fedtl.shared.deep import Adaptation, check_deep_run
from fedtl.shared.errors import ConfigError, FederationError
from fedtl.shared.features import FeatureCache, cached_features
from fedtl.shared.files import atomic_write_bytes
from fedtl.shared.heads import build_head, head_arrays, load_head_arrays, personal_array_names, predict_proba
from fedtl.shared.metrics import classification_metrics, majority_rate
from fedtl.shared.protocol import RoundSettings, SimulationSettings, encode, jsonable

log = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of `flwr run`: resolve the run config from pyproject and overrides, then federate."""
    run_federation(grid, RunConfig.from_mapping(dict(context.run_config)))


@dataclass(frozen=True)
class Backbone:
    """The server's copy of the backbone: name, fingerprint, weights and preprocessing."""

    name: str
    fingerprint: str
    state: dict[str, torch.Tensor]
    feature_dim: int
    preprocessing: Preprocessing


def load_server_backbone(cfg: RunConfig) -> Backbone:
    """Build the configured backbone from the registry and fingerprint it."""
    state = backbone_state_dict(build_backbone(cfg.backbone))
    return Backbone(
        cfg.backbone,
        fingerprint_state_dict(state),
        state,
        get_backbone_spec(cfg.backbone).feature_dim,
        resolve_preprocessing(cfg.backbone, cfg.image_size),
    )


def new_run_dir(cfg: RunConfig) -> tuple[str, Path]:
    """Return a fresh run id and its folder under `out`."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_id = f"{stamp}-{cfg.run_name or cfg.backbone}-{secrets.token_hex(2)}"
    run_dir = Path(cfg.out) / run_id
    run_dir.mkdir(parents=True, exist_ok=False)
    return run_id, run_dir


def run_federation(grid: Grid, cfg: RunConfig, *, run_dir: Path | None = None) -> dict[str, Any]:
    """Run one federation end to end and return its summary (also written to `summary.json`).

    Args:
        grid: Flower's Grid (simulation or deployment).
        cfg: the resolved run configuration.
        run_dir: where to write results; a fresh `out/<run-id>/` when None.

    Returns:
        The run summary: final metrics, per-site epsilon, bytes sent, timings.

    Raises:
        RuntimeError: no site returned a usable update in any round.
    """
    t_start = time.time()
    checkpoint = None
    if cfg.resume:
        cfg, run_id, run_dir, checkpoint = _resume(cfg)
    elif run_dir is None:
        run_id, run_dir = new_run_dir(cfg)
    else:
        run_id = run_dir.name
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ConfigError(f"run folder {run_dir} is not empty; results of another run would be overwritten")
        run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.head_solver == k.CLOSED_FORM:
        cfg = closed_form_config(cfg)  # one release and one solve: one round; projection-dim checked first
    if cfg.non_private:
        log.warning("NON-PRIVATE BASELINE RUN %s: sites train without clipping or noise", run_id)
    elif cfg.federated_evaluation:
        log.warning(
            "federated evaluation: sites whose policy allows it report metrics of their local test splits "
            "each round; these are not covered by their epsilon (federated-evaluation = false keeps them local)"
        )
    check_deep_run(cfg)  # deeper fine-tuning fits the backbone and the rest of the config, before any site works
    backbone = load_server_backbone(cfg)
    splits = load_dataset(cfg.data, seed=cfg.seed, test_fraction=cfg.test_fraction) if cfg.data else None
    label_names = federation_label_names(cfg, splits)
    if checkpoint is None:
        _write_json(
            run_dir / "config.json",
            {
                "run-id": run_id,
                "config": cfg.to_mapping(),
                "backbone-fingerprint": backbone.fingerprint,
                "preprocessing": backbone.preprocessing.to_dict(),
                "label-names": list(label_names),
                "versions": {"flwr": flwr.__version__, "torch": torch.__version__},
            },
        )

    config = round_config(cfg, backbone, label_names, run_id=run_id, run_dir=run_dir)

    node_ids = wait_for_nodes(grid, cfg.min_available_nodes, timeout=cfg.round_timeout)
    setup = distribute_backbone(grid, node_ids, backbone, config, timeout=cfg.round_timeout)
    node_ids = [n for n in node_ids if n not in setup.refused]
    if len(node_ids) < cfg.min_train_sites:
        raise FederationError(
            f"only {len(node_ids)} site(s) accepted run {run_id} (min-train-sites {cfg.min_train_sites}); "
            f"refusals: {list(setup.refused.values())}"
        )

    head = build_head(cfg.head, backbone.feature_dim, len(label_names), hidden=cfg.head_hidden, seed=cfg.seed)
    initial = head_arrays(head)
    if Adaptation.of(cfg).enabled:  # deeper fine-tuning: the trainable backbone tensors travel with the head's
        initial.update(initial_backbone_arrays(cfg, backbone))
    if checkpoint is not None:
        # Sites train float32 heads; FedAdam's server step computes in float64.
        initial = {name: value.astype(np.float32) for name, value in checkpoint.arrays.items()}
    elif cfg.feature_centering:
        initial["center"] = estimate_feature_center(
            grid, node_ids, config, cfg, dim=backbone.feature_dim, timeout=cfg.round_timeout
        )
    if cfg.personalization == k.FEDPER and checkpoint is None:  # FedPer: the last layer never leaves a site
        for name in personal_array_names(cfg.head):
            del initial[name]
    recorder = RunRecorder(
        run_dir=run_dir,
        expected_arrays={name: (tuple(v.shape), "float32") for name, v in initial.items()},
        non_private=cfg.non_private,
        frozen_arrays=("center",) if "center" in initial else (),
        max_update_norm=cfg.max_update_norm,
        node_names=dict(setup.names),
    )
    done = 0
    if checkpoint is not None:
        recorder.restore(checkpoint.records)
        done = checkpoint.server_round
    central = (
        (DeepCentralEvaluation if Adaptation.of(cfg).enabled else CentralEvaluation)(
            cfg, backbone, splits.test, label_names
        )
        if cfg.central_evaluation and splits is not None and splits.test is not None and cfg.personalization != k.FEDPER
        else None
    )
    if cfg.personalization == k.FEDPER:
        log.info("fedper: each site keeps its own last layer, so there is no one model to evaluate centrally")
    strategy = make_strategy(
        cfg,
        recorder,
        round_offset=done,
        excluded_nodes=frozenset(setup.refused),
        no_evaluate_nodes=setup.no_evaluation,
        num_sites=len(node_ids),
    )
    if checkpoint is not None:
        restore_strategy_state(strategy, checkpoint.strategy_state)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0 and done:
            return None  # a resumed run: round `done` was already evaluated and recorded
        server_round += done
        scores = central(arrays) if central is not None else None
        recorder.finish_round(server_round, scores)
        save_checkpoint(
            run_dir,
            Checkpoint(
                server_round=server_round,
                arrays={name: a.numpy() for name, a in arrays.items()},
                strategy_state=strategy_state(strategy),
                records=recorder.state(),
            ),
        )
        return MetricRecord(scores) if scores else None

    initial_record = ArrayRecord({name: Array(v) for name, v in initial.items()})
    head_bytes = initial_record.count_bytes()
    if done:
        log.info("run %s resumes after round %d of %d", run_id, done, cfg.num_rounds)
    if cfg.head_solver == k.CLOSED_FORM:  # one noised release of sufficient statistics per site, solved here
        result = run_closed_form(
            grid,
            node_ids,
            config,
            cfg,
            recorder=recorder,
            central=central,
            feature_dim=backbone.feature_dim,
            num_classes=len(label_names),
            center=initial.get("center"),
        )
    else:
        result = strategy.start(
            grid=grid,
            initial_arrays=initial_record,
            num_rounds=cfg.num_rounds - done,
            timeout=cfg.round_timeout,
            train_config=config,
            evaluate_config=config,
            evaluate_fn=evaluate_fn,
        )
    if not result.train_metrics_clientapp and not done:
        raise RuntimeError(
            f"run {run_id}: no site returned a usable update in {cfg.num_rounds} rounds; "
            f"rejected replies: {recorder.rejected[:5]}"
        )
    personalized: dict[str, dict[str, float]] = {}
    if cfg.personalization == k.FINETUNE:
        personalized = finetune_sites(
            grid, node_ids, set(setup.no_evaluation), config, result.arrays, recorder, cfg.round_timeout
        )
    elif cfg.personalization == k.FEDPER:
        personalized = fedper_sites(recorder)
    summary = export_run(
        cfg,
        backbone,
        label_names,
        recorder,
        result.arrays,
        run_id=run_id,
        run_dir=run_dir,
        backbone_bytes=setup.bytes_sent,
        head_bytes=head_bytes,
        majority=majority_rate(splits.test.labels) if splits is not None and splits.test is not None else math.nan,
    )
    if personalized:
        summary["personalization"] = {
            "method": cfg.personalization,
            "sites": personalized,
            **weighted_site_metrics(list(personalized.values())),
        }
    summary["refused-sites"] = sorted(setup.refused.values())
    summary["resumed-after-round"] = done
    summary["seconds"] = time.time() - t_start
    _write_json(run_dir / "summary.json", summary)
    log.info("run %s finished in %.1f s; model at %s", run_id, summary["seconds"], summary["model"])
    return summary


def finetune_sites(
    grid: Grid,
    node_ids: list[int],
    no_evaluation: set[int],
    config: ConfigRecord,
    arrays: ArrayRecord,
    recorder: RunRecorder,
    timeout: float,
) -> dict[str, dict[str, float]]:
    """Ask every site to finetune the final head locally; return each site's shared and finetuned test scores.

    The finetune steps are part of every site's noise plan and charged to its ledger; the sites'
    cumulative epsilon in the run's records includes them.
    """
    ask = ConfigRecord({**dict(config), k.ACTION: k.ACTION_FINETUNE})
    targets = [n for n in node_ids if n not in no_evaluation]
    replies = _query(grid, targets, RecordDict({k.CONFIG: ask, k.ARRAYS: arrays}), timeout)
    out: dict[str, dict[str, float]] = {}
    expected = {k.NUM_EXAMPLES, k.SHARED_ACCURACY, k.PERSONALIZED_ACCURACY, k.EPSILON, k.DELTA}
    for node_id in targets:
        reply = replies.get(node_id)
        name = recorder.node_names.get(node_id, f"node-{node_id}")
        reason = "no reply" if reply is None else failure_reason(reply)
        metrics = None if reason else dict(reply.content.metric_records.get(k.METRICS, {}))  # type: ignore[union-attr]
        if metrics is not None and (set(metrics) != expected or not all(math.isfinite(v) for v in metrics.values())):
            reason = f"finetune reply metrics {sorted(metrics)} differ from {sorted(expected)} or are not finite"
        if reason or metrics is None:
            log.warning("site %s: no finetune result: %s", name, reason)
            continue
        recorder.site_epsilon[name] = float(metrics.pop(k.EPSILON))
        recorder.site_delta[name] = float(metrics.pop(k.DELTA))
        out[name] = {key: float(v) for key, v in metrics.items()}
        log.info(
            "site %s: accuracy %.4f shared -> %.4f finetuned",
            name,
            out[name][k.SHARED_ACCURACY],
            out[name][k.PERSONALIZED_ACCURACY],
        )
    return dict(sorted(out.items()))


def fedper_sites(recorder: RunRecorder) -> dict[str, dict[str, float]]:
    """Return each FedPer site's last-round test scores of its own model (shared layers + its last layer)."""
    last = recorder.history[-1].get("sites", {}) if recorder.history else {}
    return {
        name: {k.NUM_EXAMPLES: float(s["evaluate"][k.NUM_EXAMPLES]), k.PERSONALIZED_ACCURACY: s["evaluate"][k.ACCURACY]}
        for name, s in sorted(last.items())
        if "evaluate" in s
    }


def round_config(
    cfg: RunConfig, backbone: Backbone, label_names: tuple[str, ...], *, run_id: str, run_dir: Path
) -> ConfigRecord:
    """Return the ConfigRecord every site receives: the round settings plus the simulation settings."""
    settings = RoundSettings(
        run_id=run_id,
        num_rounds=cfg.num_rounds,
        backbone_name=backbone.name,
        backbone_fingerprint=backbone.fingerprint,
        image_size=backbone.preprocessing.image_size,
        head=cfg.head,
        head_hidden=cfg.head_hidden,
        num_classes=len(label_names),
        label_names=json.dumps(list(label_names)),
        local_epochs=cfg.local_epochs,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        max_grad_norm=cfg.max_grad_norm,
        noise_multiplier=-1.0 if cfg.noise_multiplier == AUTO else float(cfg.noise_multiplier),
        target_epsilon=cfg.target_epsilon,
        target_delta=cfg.target_delta,
        accountant=cfg.accountant,
        non_private=cfg.non_private,
        seed=cfg.seed,
        feature_batch_size=cfg.feature_batch_size,
        device=cfg.device,
        personalization=cfg.personalization,
        finetune_epochs=cfg.finetune_epochs,
        trainable_blocks=cfg.trainable_blocks,
        lora_rank=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
    )
    # Simulated sites read their slice of `data` from these; real sites ignore them (node config wins).
    simulation = SimulationSettings(
        data=cfg.data,
        partition=cfg.partition,
        seed=cfg.seed,
        test_fraction=cfg.test_fraction,
        local_test_fraction=cfg.local_test_fraction,
        permuted_label_sites=cfg.permuted_label_sites,
        site_root=str((run_dir / "sites").resolve()),
        cache_root=str(fedtl_home() / "sim-sites"),
        audit_canaries=cfg.audit_canaries,
    )
    return ConfigRecord({**encode(settings), **encode(simulation)})


def export_run(
    cfg: RunConfig,
    backbone: Backbone,
    label_names: tuple[str, ...],
    recorder: RunRecorder,
    arrays: ArrayRecord,
    *,
    run_id: str,
    run_dir: Path,
    backbone_bytes: dict[str, int],
    head_bytes: int,
    majority: float,
) -> dict[str, Any]:
    """Write the adapted model file and model card; return the run summary (without its timing)."""
    final_arrays = {name: arr.numpy() for name, arr in arrays.items()}
    last = recorder.history[-1] if recorder.history else {}
    final_metrics = {f"central-{key}": v for key, v in last.get("central", {}).items()}
    final_metrics.update(
        {f"federated-{key}": v for key, v in last.get("evaluate", {}).items() if key != k.NUM_EXAMPLES}
    )
    model = AdaptedModel(
        backbone_name=backbone.name,
        backbone_fingerprint=backbone.fingerprint,
        preprocessing=backbone.preprocessing,
        feature_dim=backbone.feature_dim,
        head=cfg.head,
        head_hidden=cfg.head_hidden,
        label_names=label_names,
        arrays=final_arrays,
        privacy={
            site: {"epsilon": eps, "delta": recorder.site_delta[site]} for site, eps in recorder.site_epsilon.items()
        },
        non_private=cfg.non_private,
        num_rounds=cfg.num_rounds,
        sites=tuple(sorted(recorder.site_epsilon)),
        run_id=run_id,
        strategy=cfg.strategy,
        metrics=final_metrics,
        client_dp=dict(recorder.client_dp),
        **deep_model_fields(cfg, final_arrays),
    )
    if cfg.personalization == k.FEDPER:  # no single model: every site holds its own last layer
        model_path = None
        log.info("fedper: no model file (the shared layers alone cannot classify); each site keeps its last layer")
    else:
        model_path = save_model(run_dir / "model.safetensors", model)
    summary = {
        "run-id": run_id,
        "run-dir": str(run_dir),
        "model": str(model_path) if model_path is not None else "",
        "non-private": cfg.non_private,
        "num-rounds": cfg.num_rounds,
        "sites": list(model.sites),
        "backbone": backbone.name,
        "backbone-fingerprint": backbone.fingerprint,
        "backbone-bytes": count_state_bytes(backbone.state),
        "backbone-bytes-sent-per-site": backbone_bytes,
        "head-bytes-per-site-per-round": 2 * head_bytes,  # down to the site and back up
        "epsilon-per-site": dict(sorted(recorder.site_epsilon.items())),
        "epsilon-max": max(recorder.site_epsilon.values(), default=math.nan),
        "delta": cfg.target_delta,
        "majority-rate": majority,
        "final": final_metrics,
        "final-per-site": {site: s.get("evaluate", {}) for site, s in last.get("sites", {}).items()},
        "rejected-replies": recorder.rejected,
        **recorder.client_dp,  # client-level DP (client-epsilon, ...), apart from the sites' epsilon-per-site
    }
    return summary


def wait_for_nodes(grid: Grid, minimum: int, *, timeout: float) -> list[int]:
    """Return the connected node ids once at least `minimum` are connected.

    Raises:
        TimeoutError: fewer than `minimum` nodes connected within `timeout` seconds.
    """
    deadline = time.time() + timeout
    while True:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= minimum:
            return node_ids
        if time.time() > deadline:
            raise TimeoutError(
                f"only {len(node_ids)} of min-available-nodes={minimum} sites connected in {timeout:.0f} s"
            )
        time.sleep(1.0)


@dataclass(frozen=True)
class SiteSetup:
    """What the sites answered at set-up: backbone bytes sent, refusals, evaluation opt-outs."""

    bytes_sent: dict[str, int]  # site name -> bytes of backbone weights sent (0: cached at the site)
    refused: dict[int, str]  # node id -> "site: reason" for sites that refused the run
    no_evaluation: frozenset[int]  # node ids whose policy keeps evaluation metrics local
    names: dict[int, str]  # node id -> site name


def distribute_backbone(
    grid: Grid, node_ids: list[int], backbone: Backbone, config: ConfigRecord, *, timeout: float
) -> SiteSetup:
    """Send the backbone's weights to every site that does not hold its fingerprint yet.

    Every site is first asked whether it has the fingerprint; it checks the run against its policy
    first, and a site that refuses says why (logged here; it is left out of the run). Only the sites
    that lack the weights receive them, and verify them against the fingerprint before storing them.
    """
    ask = ConfigRecord(
        {
            **dict(config),
            k.ACTION: k.ACTION_HAS_BACKBONE,
            k.BACKBONE_NAME: backbone.name,
            k.BACKBONE_FINGERPRINT: backbone.fingerprint,
        }
    )
    replies = _query(grid, node_ids, RecordDict({k.CONFIG: ask}), timeout)
    sent: dict[str, int] = {}
    refused: dict[int, str] = {}
    no_evaluation: set[int] = set()
    missing: list[int] = []
    names: dict[int, str] = {}
    for node_id in node_ids:
        if node_id not in replies:
            refused[node_id] = f"node-{node_id}: no answer to the backbone query within {timeout:.0f} s"
    for node_id, reply in sorted(replies.items()):
        if _refused_setup(reply, node_id, refused, "the backbone query"):
            continue
        site = reply.content.config_records[k.SITE]
        name = str(site[k.SITE_NAME])
        if name in names.values():
            log.warning("node %d also calls itself %s; left out of this run (site names must be unique)", node_id, name)
            refused[node_id] = f"node-{node_id}: claims the name {name} of another site"
            continue
        names[node_id] = name
        if not bool(site.get(k.RELEASES_EVALUATION, True)):
            no_evaluation.add(node_id)
        if bool(site[k.HAS_BACKBONE]):
            sent[names[node_id]] = 0
        else:
            missing.append(node_id)
    if missing:
        weights = ArrayRecord({name: Array(t.numpy()) for name, t in backbone.state.items()})
        install = ConfigRecord({**dict(ask), k.ACTION: k.ACTION_INSTALL_BACKBONE})
        replies = _query(grid, missing, RecordDict({k.CONFIG: install, k.BACKBONE_ARRAYS: weights}), timeout)
        for node_id in missing:
            if node_id not in replies:
                refused[node_id] = f"{names[node_id]}: no answer to the backbone transfer within {timeout:.0f} s"
        for node_id, reply in replies.items():
            if not _refused_setup(reply, node_id, refused, "the backbone"):
                sent[names[node_id]] = int(reply.content.config_records[k.SITE][k.BYTES_RECEIVED])
    for name, nbytes in sorted(sent.items()):
        log.info(
            "backbone %s %s -> %s: %d bytes sent%s",
            backbone.name,
            backbone.fingerprint[:12],
            name,
            nbytes,
            " (cached at site)" if nbytes == 0 else "",
        )
    return SiteSetup(sent, refused, frozenset(no_evaluation), names)


def _refused_setup(reply: Message, node_id: int, refused: dict[int, str], what: str) -> bool:
    """Record and log a set-up reply that is an error, a refusal or malformed; return True when it is one."""
    reason = failure_reason(reply)
    if reason is None:
        site = reply.content.config_records.get(k.SITE)
        needed = (k.SITE_NAME, k.HAS_BACKBONE, k.BYTES_RECEIVED)
        if site is None or any(key not in site for key in needed):
            reason = f"malformed set-up reply: it needs a `{k.SITE}` ConfigRecord with {', '.join(needed)}"
    if reason is None:
        return False
    name = reply_site_name(reply)
    log.warning("site %s refused %s and is left out of this run: %s", name, what, reason)
    refused[node_id] = f"{name}: {reason}"
    return True


def estimate_feature_center(
    grid: Grid, node_ids: list[int], config: ConfigRecord, cfg: RunConfig, *, dim: int, timeout: float
) -> np.ndarray:
    """Return the mean L2-normalised feature over all sites, from their Gaussian-noised sums.

    Each site charges its release to its own privacy budget (see `feature_sum_round`); the server
    only adds the noised sums up, which is post-processing.

    Raises:
        RuntimeError: no site returned a sum.
    """
    sigma = 0.0 if cfg.non_private else run_centering_noise(cfg)
    if sigma is None:
        log.warning(
            "feature centring off: no noise makes the centre release cost %.0f%% of target-epsilon %g or less; "
            "nothing is released",
            100 * CENTERING_BUDGET_SHARE,
            cfg.target_epsilon,
        )
        return np.zeros(dim, dtype=np.float32)
    ask = ConfigRecord({**dict(config), k.ACTION: k.ACTION_FEATURE_SUM, k.CENTERING_NOISE_MULTIPLIER: sigma})
    replies = _query(grid, node_ids, RecordDict({k.CONFIG: ask}), timeout)
    total, count = None, 0
    # In site order, so the float sum does not depend on the order replies arrived in.
    for reply in sorted(replies.values(), key=lambda m: (reply_site_name(m), m.metadata.src_node_id)):
        reason = failure_reason(reply)
        if reason is not None:
            log.warning("site %s did not release its feature sum: %s", reply_site_name(reply), reason)
            continue
        problem = _check_feature_sum(reply, dim, sigma=sigma)
        if problem:
            log.warning("site %s sent an unusable feature sum, ignored: %s", reply_site_name(reply), problem)
            continue
        arr = reply.content.array_records[k.ARRAYS][k.FEATURE_SUM].numpy().astype(np.float64)  # (D,)
        n = int(reply.content.metric_records[k.METRICS][k.NUM_EXAMPLES])
        total = arr if total is None else total + arr
        count += n
    if total is None:
        raise RuntimeError("no site released a feature sum; check the sites' logs, or run with feature-centering=false")
    released = len(replies)
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


def _query(grid: Grid, node_ids: list[int], content: RecordDict, timeout: float) -> dict[int, Message]:
    messages = [Message(content=content, dst_node_id=nid, message_type=MessageType.QUERY) for nid in node_ids]
    replies = grid.send_and_receive(messages, timeout=timeout)
    return {msg.metadata.src_node_id: msg for msg in replies}


class CentralEvaluation:
    """Server-side evaluation of the global head on a held-out test set the server owns."""

    def __init__(self, cfg: RunConfig, backbone: Backbone, test, label_names: tuple[str, ...]) -> None:
        cache = FeatureCache(fedtl_home() / "server-cache" / "features")
        self.features, self.labels, _ = cached_features(
            cache,
            load_backbone=lambda: build_backbone(backbone.name, backbone.state),
            backbone_fingerprint=backbone.fingerprint,
            images=test.images,
            labels=test.labels,
            data_fingerprint=test.fingerprint(),
            preprocessing=backbone.preprocessing,
            batch_size=cfg.feature_batch_size,
            device=cfg.device,
            progress=False,
        )
        self.head = build_head(cfg.head, backbone.feature_dim, len(label_names), hidden=cfg.head_hidden)

    def __call__(self, arrays: ArrayRecord) -> dict[str, float]:
        """Return the metrics of the head `arrays` on the server's test set."""
        load_head_arrays(self.head, {name: a.numpy() for name, a in arrays.items()}, source="the aggregated head")
        return classification_metrics(self.labels, predict_proba(self.head, self.features))


def federation_label_names(cfg: RunConfig, splits: DataSplits | None) -> tuple[str, ...]:
    """Return the federation's classes: `label-names` when set (checked against the server's data), else the data's."""
    declared = cfg.label_name_list
    if splits is None:
        return declared
    if declared and declared != tuple(splits.train.label_names):
        raise ConfigError(
            f"`label-names` {list(declared)} differ from the classes of the server's data {cfg.data}: "
            f"{list(splits.train.label_names)}; make them equal or leave label-names empty"
        )
    return tuple(splits.train.label_names)


RESUME_OVERRIDABLE = (
    "round-timeout",
    "min-available-nodes",
    "min-train-sites",
    "max-update-norm",
    "federated-evaluation",
    "device",
    "feature-batch-size",
)


def _resume(cfg: RunConfig) -> tuple[RunConfig, str, Path, Checkpoint]:
    """Return the stored config, run id, folder and checkpoint of the run `cfg.resume` names.

    Raises:
        ConfigError: the folder is not a run folder, has no checkpoint, or the run already finished.
    """
    run_dir = Path(cfg.resume).expanduser().resolve()
    try:
        stored = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot resume {run_dir}: its config.json is missing or unreadable ({exc})") from exc
    stored_cfg = RunConfig.from_mapping(stored["config"])
    given, defaults = cfg.to_mapping(), RunConfig().to_mapping()
    # Operational keys come from the resuming run's config (a site is gone for good, a slower network);
    # everything that shapes the model or the privacy plan stays as the run started.
    overrides = {key.replace("-", "_"): given[key] for key in RESUME_OVERRIDABLE}
    resumed = stored_cfg.replace(resume=str(run_dir), **overrides)
    for key in RESUME_OVERRIDABLE:
        if given[key] != stored["config"][key]:
            log.warning(
                "resuming %s: %s = %r (the run started with %r)", run_dir.name, key, given[key], stored["config"][key]
            )
    ignored = sorted(
        key
        for key, value in given.items()
        if key not in RESUME_OVERRIDABLE and key != "resume" and value not in (defaults[key], stored["config"][key])
    )
    if ignored:
        log.warning(
            "resuming %s with its stored config; ignoring new values of %s (only %s may change on resume)",
            run_dir.name,
            ignored,
            ", ".join(RESUME_OVERRIDABLE),
        )
    checkpoint = load_checkpoint(run_dir)
    if checkpoint.server_round >= resumed.num_rounds:
        raise ConfigError(f"run {run_dir.name} already finished all {resumed.num_rounds} rounds; nothing to resume")
    return resumed, str(stored["run-id"]), run_dir, checkpoint


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(jsonable(payload), indent=2, sort_keys=True) + "\n").encode())
