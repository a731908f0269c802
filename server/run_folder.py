"""A run's folder: a new run or a resumed one, its resolved config, its checkpoint, and the exported model.

`runs/<run-id>/` holds `config.json` (written once, at the start), `metrics.jsonl` (a line per round,
server/report.py), `checkpoint.safetensors` (after every round, server/checkpoint.py), and at the end
`model.safetensors`, `model.md` and `summary.json`. A stopped run continues from its folder: the stored
config with only the operational keys (RESUME_OVERRIDABLE) taken from the resuming request.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import flwr
import torch
from flwr.app import ArrayRecord

from fedtl.server.checkpoint import Checkpoint, load_checkpoint
from fedtl.server.model_file import AdaptedModel, save_model
from fedtl.server.report import RunRecorder
from fedtl.server.setup import Backbone
from fedtl.shared import constants as k
from fedtl.shared.backbones import count_state_bytes
from fedtl.shared.config import RunConfig
from fedtl.shared.deep import FINAL_FEATURES, Adaptation, split_wire_arrays
from fedtl.shared.errors import ConfigError
from fedtl.shared.files import atomic_write_bytes
from fedtl.shared.protocol import jsonable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunFolder:
    """Where a run writes, under which id, with which config; `checkpoint` is set when it resumes."""

    run_id: str
    run_dir: Path
    cfg: RunConfig
    checkpoint: Checkpoint | None = None

    @property
    def rounds_done(self) -> int:
        """Return the rounds an earlier attempt of this run finished (0 for a new run)."""
        return self.checkpoint.server_round if self.checkpoint is not None else 0


def open_run(cfg: RunConfig, run_dir: Path | None = None) -> RunFolder:
    """Return the folder of a new run (`run_dir`, or a fresh `out/<run-id>/`), or of the run `resume` names.

    Raises:
        ConfigError: `run_dir` is not empty, or the run to resume cannot be resumed (see `resume_run`).
    """
    if cfg.resume:
        return resume_run(cfg)
    if run_dir is None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        run_id = f"{stamp}-{cfg.run_name or cfg.backbone}-{secrets.token_hex(2)}"
        run_dir = Path(cfg.out) / run_id
        run_dir.mkdir(parents=True, exist_ok=False)
        return RunFolder(run_id, run_dir, cfg)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"run folder {run_dir} is not empty; results of another run would be overwritten")
    run_dir.mkdir(parents=True, exist_ok=True)
    return RunFolder(run_dir.name, run_dir, cfg)


def write_run_config(
    run: RunFolder, backbone: Backbone, label_names: tuple[str, ...], extra: dict[str, Any] | None = None
) -> None:
    """Write `config.json`: the resolved config, the backbone's fingerprint and preprocessing, classes, versions.

    `extra` adds what the caller knows of the run (e.g. the lab's number of simulated sites, for resuming).
    """
    write_json(
        run.run_dir / "config.json",
        {
            **(extra or {}),
            "run-id": run.run_id,
            "config": run.cfg.to_mapping(),
            "backbone-fingerprint": backbone.fingerprint,
            "preprocessing": backbone.preprocessing.to_dict(),
            "label-names": list(label_names),
            "versions": {"flwr": flwr.__version__, "torch": torch.__version__},
        },
    )


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
        label_names=label_names,
        arrays=final_arrays,
        privacy={
            site: {"epsilon": eps, "delta": recorder.site_delta[site]} for site, eps in recorder.site_epsilon.items()
        },
        sites=tuple(sorted(recorder.site_epsilon)),
        run_id=run_id,
        metrics=final_metrics,
        client_dp=dict(recorder.client_dp),
        trust=dict(recorder.trust),
        **_setup_fields(cfg, backbone),
        **_adaptation_fields(cfg, final_arrays),
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
        # Secure aggregation: the assumption epsilon holds under, stated beside it (empty: each site's own noise).
        "trust-assumption": recorder.trust.get("assumption", "none: every site's noise protects it on its own"),
        **({"secure-aggregation": dict(recorder.trust)} if recorder.trust else {}),
        "delta": cfg.target_delta,
        "majority-rate": majority,
        "final": final_metrics,
        "final-per-site": {site: s.get("evaluate", {}) for site, s in last.get("sites", {}).items()},
        "rejected-replies": recorder.rejected,
        **recorder.client_dp,  # client-level DP (client-epsilon, ...), apart from the sites' epsilon-per-site
    }
    return summary


RESUME_OVERRIDABLE = (
    "round-timeout",
    "min-available-nodes",
    "min-train-sites",
    "max-update-norm",
    "federated-evaluation",
    "device",
    "feature-batch-size",
)


def resume_run(cfg: RunConfig) -> RunFolder:
    """Return the stored config, run id, folder and checkpoint of the run `cfg.resume` names.

    Raises:
        ConfigError: the folder is not a run folder, has no checkpoint, the run already finished, or `cfg` asks
            for other values of keys that are not operational (RESUME_OVERRIDABLE).
    """
    run_dir = Path(cfg.resume).expanduser().resolve()
    try:
        stored = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot resume {run_dir}: its config.json is missing or unreadable ({exc})") from exc
    stored_cfg = RunConfig.from_mapping(stored["config"])
    given, defaults = cfg.to_mapping(), RunConfig().to_mapping()
    # Operational keys come from the resuming request (a site is gone for good, a slower network); everything
    # that shapes the model or the privacy plan stays as the run started. (`fedtl simulate --resume` starts its
    # request from the run's own operational keys, so only what the user asks for changes.)
    overrides = {key.replace("-", "_"): given[key] for key in RESUME_OVERRIDABLE}
    for key in RESUME_OVERRIDABLE:
        if given[key] != stored["config"][key]:
            log.warning(
                "resuming %s: %s = %r (the run started with %r)", run_dir.name, key, given[key], stored["config"][key]
            )
    resumed = stored_cfg.replace(resume=str(run_dir), **overrides)
    changed = sorted(
        key
        for key, value in given.items()
        if key not in RESUME_OVERRIDABLE and key != "resume" and value not in (defaults[key], stored["config"][key])
    )
    if changed:
        asked = ", ".join(f"{key} = {given[key]!r} (the run has {stored['config'][key]!r})" for key in changed)
        raise ConfigError(
            f"cannot resume {run_dir.name} with {asked}: a resumed run keeps its own settings, and only "
            f"{', '.join(RESUME_OVERRIDABLE)} may change; drop the other options, or start a new run"
        )
    checkpoint = load_checkpoint(run_dir)
    if checkpoint.server_round >= resumed.num_rounds:
        raise ConfigError(f"run {run_dir.name} already finished all {resumed.num_rounds} rounds; nothing to resume")
    return RunFolder(str(stored["run-id"]), run_dir, resumed, checkpoint)


def _setup_fields(cfg: RunConfig, backbone: Backbone) -> dict[str, Any]:
    """Return the AdaptedModel fields fixed before any round: the backbone it reads, its head, privacy mode, rounds."""
    return {
        "backbone_name": backbone.name,
        "backbone_fingerprint": backbone.fingerprint,
        "preprocessing": backbone.preprocessing,
        "feature_dim": backbone.feature_dim,
        "head": cfg.head,
        "head_hidden": cfg.head_hidden,
        "non_private": cfg.non_private,
        "num_rounds": cfg.num_rounds,
        "strategy": cfg.strategy,
    }


def _adaptation_fields(cfg: RunConfig, arrays: dict[str, Any]) -> dict[str, Any]:
    """Return the AdaptedModel fields recording the adaptation and which backbone tensors changed, or the feature
    block a head-only model reads ({} for a head on the backbone's own features)."""
    adaptation = Adaptation.of(cfg)
    if adaptation.feature_block != FINAL_FEATURES:  # head only, on an earlier block's features
        return {"feature_block": adaptation.feature_block}
    if not adaptation.enabled:
        return {}
    return {
        "trainable_blocks": adaptation.trainable_blocks,
        "lora_rank": adaptation.lora_rank,
        "lora_alpha": adaptation.lora_alpha,
        "changed_tensors": tuple(split_wire_arrays(arrays)[1]),
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write strict JSON atomically (non-finite floats as strings)."""
    atomic_write_bytes(path, (json.dumps(jsonable(payload), indent=2, sort_keys=True) + "\n").encode())
