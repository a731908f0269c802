"""Setting a run up: the server's backbone, the federation's classes, the sites' settings, backbone distribution.

Before any privacy-costing work, every connected site is asked whether it holds the run's backbone; it
checks the run against its own policy first and may refuse (it is then left out, by name). Sites that
lack the weights receive them and verify them against the announced fingerprint before storing them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedtl.server.report import failure_reason, reply_site_name
from fedtl.shared import constants as k
from fedtl.shared.backbones import (
    AnyPreprocessing,
    TablePreprocessing,
    backbone_state_dict,
    build_backbone,
    fingerprint_state_dict,
    resolve_preprocessing,
)
from fedtl.shared.config import RunConfig
from fedtl.shared.cut import Cut, build_model
from fedtl.shared.data import DataSplits, load_dataset
from fedtl.shared.deep import Adaptation, AdaptedHead
from fedtl.shared.errors import ConfigError
from fedtl.shared.heads import Head
from fedtl.shared.labels import check_label_names
from fedtl.shared.named_data import federation_schema
from fedtl.shared.protocol import RoundSettings, SimulationSettings, encode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backbone:
    """The server's copy of the backbone: name, fingerprint, weights and preprocessing."""

    name: str
    fingerprint: str
    state: dict[str, torch.Tensor]
    feature_dim: int
    preprocessing: AnyPreprocessing

    @property
    def schema(self) -> str:
        """Return the table schema's canonical JSON that sites receive ("" when the backbone reads no rows)."""
        return self.preprocessing.schema.key() if isinstance(self.preprocessing, TablePreprocessing) else ""

    def build(self) -> torch.nn.Module:
        """Return a fresh module with these weights."""
        return build_backbone(self.name, self.state)

    def model(self, cfg: RunConfig, num_classes: int, *, head_seed: int = 0) -> Head | AdaptedHead:
        """Return the model above the run's cut of this backbone (LoRA adapters seeded by the run's seed)."""
        return build_model(
            Cut(self.name, self.fingerprint, self.preprocessing, Adaptation.of(cfg)),
            head=cfg.head,
            head_hidden=cfg.head_hidden,
            num_classes=num_classes,
            load_backbone=self.build,
            seed=cfg.seed,
            head_seed=head_seed,
            projection_dim=cfg.projection_dim,
        )


def load_server_backbone(cfg: RunConfig, *, built: Backbone | None = None) -> Backbone:
    """Build the configured backbone from the registry and fingerprint it (a table's: its schema's).

    `built`: one built before in this process (the lab's, preparing its sites); returned as it is when its name,
    preprocessing and feature width are `cfg`'s. `cfg.feature_block` must be resolved (`resolve_feature_block`):
    `feature_dim` is the width of the features the run reads.
    """
    schema = federation_schema(cfg.schema, cfg.data)
    preprocessing = resolve_preprocessing(cfg.backbone, cfg.image_size, schema=schema)
    feature_dim = Cut(cfg.backbone, "", preprocessing, Adaptation.of(cfg).head_only()).feature_dim
    if built is not None and (built.name, built.preprocessing, built.feature_dim) == (
        cfg.backbone,
        preprocessing,
        feature_dim,
    ):
        return built
    state = backbone_state_dict(build_backbone(cfg.backbone, schema=schema))
    return Backbone(cfg.backbone, fingerprint_state_dict(state), state, feature_dim, preprocessing)


def load_server_data(cfg: RunConfig) -> DataSplits | None:
    """Return the server's own data `cfg.data` (its held-out split evaluates centrally); None when it holds none."""
    if not cfg.data:
        return None
    return load_dataset(
        cfg.data,
        seed=cfg.seed,
        test_fraction=cfg.test_fraction,
        label_names=cfg.label_name_list or None,
        schema=federation_schema(cfg.schema, cfg.data),
    )


def federation_label_names(cfg: RunConfig, splits: DataSplits | None) -> tuple[str, ...]:
    """Return the federation's classes: `label-names` when set (checked against the server's data), else the data's."""
    declared = cfg.label_name_list
    if splits is None:
        return check_label_names(declared, source="`label-names`")
    if declared and declared != tuple(splits.train.label_names):
        raise ConfigError(
            f"`label-names` {list(declared)} differ from the classes of the server's data {cfg.data}: "
            f"{list(splits.train.label_names)}; make them equal or leave label-names empty"
        )
    return tuple(splits.train.label_names)


def round_config(
    cfg: RunConfig, backbone: Backbone, label_names: tuple[str, ...], *, run_id: str, run_dir: Path
) -> ConfigRecord:
    """Return the ConfigRecord every site receives: the round settings plus the simulation settings.

    Simulated sites read their slice of `data` from the simulation settings; real sites ignore them (their
    node config names their own policy, which wins).
    """
    settings = RoundSettings.for_run(
        cfg,
        run_id=run_id,
        backbone_fingerprint=backbone.fingerprint,
        image_size=backbone.preprocessing.image_size,
        label_names=label_names,
        schema=backbone.schema,
    )
    return ConfigRecord({**encode(settings), **encode(SimulationSettings.for_run(cfg, run_dir=run_dir))})


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


def query_sites(grid: Grid, node_ids: list[int], content: RecordDict, timeout: float) -> dict[int, Message]:
    """Send one query to every node in `node_ids`; return the replies by node id (missing: no reply in time)."""
    messages = [Message(content=content, dst_node_id=nid, message_type=MessageType.QUERY) for nid in node_ids]
    replies = grid.send_and_receive(messages, timeout=timeout)
    return {msg.metadata.src_node_id: msg for msg in replies}


def ask(config: ConfigRecord, action: str, **extra: object) -> ConfigRecord:
    """Return the run's config with a query `action` (and its own keys) added."""
    return ConfigRecord({**dict(config), k.ACTION: action, **extra})


@dataclass(frozen=True)
class SiteSetup:
    """What the sites answered at set-up: backbone bytes sent, refusals, evaluation opt-outs."""

    bytes_sent: dict[str, int]  # site name -> bytes of backbone weights sent (0: cached at the site)
    refused: dict[int, str]  # node id -> "site: reason" for sites that refused the run
    no_evaluation: frozenset[int]  # node ids whose policy keeps evaluation metrics local
    names: dict[int, str]  # node id -> site name

    def accepted(self, node_ids: list[int]) -> list[int]:
        """Return the nodes of `node_ids` that accepted the run."""
        return [n for n in node_ids if n not in self.refused]


def distribute_backbone(
    grid: Grid, node_ids: list[int], backbone: Backbone, config: ConfigRecord, *, timeout: float
) -> SiteSetup:
    """Send the backbone's weights to every site that does not hold its fingerprint yet.

    Every site is first asked whether it has the fingerprint; it checks the run against its policy
    first, and a site that refuses says why (logged here; it is left out of the run). Only the sites
    that lack the weights receive them, and verify them against the fingerprint before storing them.
    """
    replies = query_sites(grid, node_ids, RecordDict({k.CONFIG: ask(config, k.ACTION_HAS_BACKBONE)}), timeout)
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
        install = RecordDict({k.CONFIG: ask(config, k.ACTION_INSTALL_BACKBONE), k.BACKBONE_ARRAYS: weights})
        replies = query_sites(grid, missing, install, timeout)
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
