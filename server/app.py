"""The federation's Flower ServerApp: set a run up, let its head solver fit the model, export it.

The phases of `run_federation`, each in its own module:
1. the run's folder, new or resumed (server/run_folder.py);
2. set-up: the backbone, the federation's classes, the sites' settings, backbone distribution and
   the sites' policy checks (server/setup.py); then the solver's plan from public set-up answers (auto:
   the sites' example counts fix the schedule), before any release;
3. the feature centre, one noised release per site (server/centering.py), where the run config asks for it;
4. the head solver named by `head-solver` (server/solvers/): auto (the default), DP-SGD rounds, the closed form;
5. the model file, model card and summary (server/run_folder.py).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedtl.server.centering import estimate_feature_center
from fedtl.server.evaluation import CentralEvaluation
from fedtl.server.report import RunRecorder, weighted_site_metrics
from fedtl.server.run_folder import RunFolder, export_run, open_run, write_json, write_run_config
from fedtl.server.setup import (
    Backbone,
    SiteSetup,
    distribute_backbone,
    federation_label_names,
    load_server_backbone,
    load_server_data,
    round_config,
    wait_for_nodes,
)
from fedtl.server.solvers import Federation, PlanInputs, solver_for
from fedtl.server.solvers.auto import resolve_feature_block
from fedtl.shared import constants as k
from fedtl.shared.config import RunConfig
from fedtl.shared.deep import check_deep_run
from fedtl.shared.errors import FederationError
from fedtl.shared.heads import FROZEN_ARRAYS, personal_array_names
from fedtl.shared.metrics import majority_rate

log = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of `flwr run`: resolve the run config from pyproject and overrides, then federate."""
    run_federation(grid, RunConfig.from_mapping(dict(context.run_config)))


def run_federation(
    grid: Grid,
    cfg: RunConfig,
    *,
    run_dir: Path | None = None,
    record: dict[str, Any] | None = None,
    backbone: Backbone | None = None,
) -> dict[str, Any]:
    """Run one federation end to end and return its summary (also written to `summary.json`).

    Args:
        grid: Flower's Grid (simulation or deployment).
        cfg: the resolved run configuration.
        run_dir: where to write results; a fresh `out/<run-id>/` when None.
        record: written into the run's `config.json` beside the config (the lab records its number of sites).
        backbone: `load_server_backbone(cfg)` when the caller built it already (the lab, preparing its sites).

    Returns:
        The run summary: final metrics, per-site epsilon, bytes sent, timings.

    Raises:
        FederationError: too few sites accepted the run or answered usefully.
        ConfigError: the config cannot run (checked before any site is asked anything).
    """
    t_start = time.time()
    run = open_run(cfg, run_dir)
    solver = solver_for(run.cfg)
    cfg = resolve_feature_block(solver.configure(run.cfg))  # where the head reads the backbone, before any site
    run = RunFolder(run.run_id, run.run_dir, cfg, run.checkpoint)
    if cfg.non_private:
        log.warning("NON-PRIVATE BASELINE RUN %s: sites train without clipping or noise", run.run_id)
    elif cfg.federated_evaluation:
        log.warning(
            "federated evaluation: sites whose policy allows it report metrics of their local test splits "
            "each round; these are not covered by their epsilon (federated-evaluation = false keeps them local)"
        )
    check_deep_run(cfg)  # deeper fine-tuning fits the backbone and the rest of the config, before any site works
    backbone = load_server_backbone(cfg, built=backbone)
    splits = load_server_data(cfg)
    label_names = federation_label_names(cfg, splits)
    config = round_config(cfg, backbone, label_names, run_id=run.run_id, run_dir=run.run_dir)

    node_ids = wait_for_nodes(grid, cfg.min_available_nodes, timeout=cfg.round_timeout)
    setup = distribute_backbone(grid, node_ids, backbone, config, timeout=cfg.round_timeout)
    node_ids = setup.accepted(node_ids)
    if len(node_ids) < cfg.min_train_sites:
        raise FederationError(
            f"only {len(node_ids)} site(s) accepted run {run.run_id} (min-train-sites {cfg.min_train_sites}); "
            f"refusals: {list(setup.refused.values())}"
        )
    # The solver may fix the schedule from public set-up answers (auto: the sites' example counts), before any release.
    planned = solver.plan(cfg, PlanInputs(grid, setup, node_ids, config, backbone, label_names))
    if planned.cfg != cfg:
        cfg = planned.cfg
        run = RunFolder(run.run_id, run.run_dir, cfg, run.checkpoint)
        config = round_config(cfg, backbone, label_names, run_id=run.run_id, run_dir=run.run_dir)
    setup = planned.setup
    node_ids = setup.accepted(node_ids)
    if run.checkpoint is None:
        write_run_config(run, backbone, label_names, {**(record or {}), **planned.record})

    initial = initial_arrays(cfg, backbone, label_names)
    if run.checkpoint is not None:
        # Sites train float32 tensors; FedAdam's server step computes in float64.
        initial = {name: value.astype(np.float32) for name, value in run.checkpoint.arrays.items()}
    elif cfg.feature_centering:
        initial["center"] = estimate_feature_center(
            grid, node_ids, config, cfg, dim=backbone.feature_dim, timeout=cfg.round_timeout
        )
    if cfg.personalization == k.FEDPER and run.checkpoint is None:  # FedPer: the last layer never leaves a site
        for name in personal_array_names(cfg.head):
            del initial[name]
    recorder = RunRecorder(
        run_dir=run.run_dir,
        expected_arrays={name: (tuple(v.shape), "float32") for name, v in initial.items()},
        non_private=cfg.non_private,
        frozen_arrays=tuple(name for name in FROZEN_ARRAYS if name in initial),
        max_update_norm=cfg.max_update_norm,
        node_names=dict(setup.names),
        num_rounds=cfg.num_rounds,
    )
    if run.checkpoint is not None:
        recorder.restore(run.checkpoint.records)
    central = None
    if cfg.central_evaluation and splits is not None and splits.test is not None:
        if cfg.personalization == k.FEDPER:
            log.info("fedper: each site keeps its own last layer, so there is no one model to evaluate centrally")
        else:
            central = CentralEvaluation(cfg, backbone, splits.test, label_names)
    fed = Federation(grid, cfg, run, backbone, label_names, config, setup, node_ids, recorder, central, initial)
    result = solver.fit(fed)

    summary = export_run(
        cfg,
        backbone,
        label_names,
        recorder,
        result.arrays,
        run_id=run.run_id,
        run_dir=run.run_dir,
        backbone_bytes=setup.bytes_sent,
        head_bytes=_record_bytes(initial),
        majority=majority_rate(splits.test.labels) if splits is not None and splits.test is not None else math.nan,
    )
    if result.personalization:
        summary["personalization"] = {
            "method": cfg.personalization,
            "sites": result.personalization,
            **weighted_site_metrics(list(result.personalization.values())),
        }
    summary.update(planned.record)
    summary["refused-sites"] = sorted(setup.refused.values())
    summary["site-outcomes"] = site_outcomes(setup, recorder)
    summary["all-sites-completed"] = all(o["status"] == COMPLETED for o in summary["site-outcomes"].values())
    summary["resumed-after-round"] = run.rounds_done
    summary["seconds"] = time.time() - t_start
    write_json(run.run_dir / "summary.json", summary)
    log.info("run %s finished in %.1f s; model at %s", run.run_id, summary["seconds"], summary["model"])
    return summary


COMPLETED, REFUSED, FAILED = "completed", "refused", "failed"


def site_outcomes(setup: SiteSetup, recorder: RunRecorder) -> dict[str, dict[str, Any]]:
    """Return every site's outcome: completed, refused at set-up, or failed (a reply refused or rejected later)."""
    out: dict[str, dict[str, Any]] = {}
    for reason in setup.refused.values():
        name, _, why = reason.partition(": ")
        out[name] = {"status": REFUSED, "reasons": [why]}
    for name in setup.names.values():
        if name in out:
            continue
        problems = [f"round {r['round']}: {r['reason']}" for r in recorder.rejected if r["site"] == name]
        out[name] = {"status": FAILED if problems else COMPLETED, "reasons": problems}
    return dict(sorted(out.items()))


def initial_arrays(cfg: RunConfig, backbone: Backbone, label_names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Return the initial model's tensors: the seeded head, and the trainable backbone tensors of deeper fine-tuning.

    Built from the server's own pretrained backbone, prepared exactly as sites prepare theirs (LoRA
    adapters seeded with the run's seed); backbone tensors travel as `backbone.<name>`.
    """
    model = backbone.model(cfg, len(label_names), head_seed=cfg.seed)
    return dict(model.arrays())


def _record_bytes(arrays: dict[str, np.ndarray]) -> int:
    """Return the bytes of the tensors one message carries, as Flower counts them."""
    return ArrayRecord({name: Array(v) for name, v in arrays.items()}).count_bytes()
