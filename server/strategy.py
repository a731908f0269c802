"""Flower strategies (FedAvg, FedProx, FedAdam) wired to fedtl's reply screening and run recording."""

from __future__ import annotations

import logging
import math
from typing import Iterable

from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from fedtl.server.report import RunRecorder, weighted_site_metrics
from fedtl.shared import constants as k
from fedtl.shared.config import RunConfig

log = logging.getLogger(__name__)


def aggregate_site_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Aggregate the MetricRecords of replies as `weighted_site_metrics` does (weights: `num-examples`)."""
    assert weighted_by_key == k.NUM_EXAMPLES, weighted_by_key
    return MetricRecord(weighted_site_metrics([dict(next(iter(r.metric_records.values()))) for r in records]))


class RecordingMixin:
    """Screen replies before aggregation and hand per-site metrics to the run recorder.

    A reply with wrong keys, shapes, dtypes or non-finite values is logged and dropped; the rest are
    aggregated by the Flower strategy this mixin is combined with.
    """

    recorder: RunRecorder

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):  # type: ignore[no-untyped-def]
        """Drop malformed replies, record per-site training metrics, then aggregate the rest."""
        kept = self.recorder.screen_train(server_round, list(replies))
        return super().aggregate_train(server_round, kept)  # type: ignore[misc]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):  # type: ignore[no-untyped-def]
        """Record per-site evaluation metrics, then aggregate them."""
        kept = self.recorder.screen_evaluate(server_round, list(replies))
        return super().aggregate_evaluate(server_round, kept)  # type: ignore[misc]


class FedtlFedAvg(RecordingMixin, FedAvg):
    """Example-weighted FedAvg of head tensors (McMahan et al. 2017)."""


class FedtlFedProx(RecordingMixin, FedProx):
    """FedProx (Li et al. 2020): FedAvg plus a proximal term applied at each site."""


class FedtlFedAdam(RecordingMixin, FedAdam):
    """FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization") on the head tensors."""


def make_strategy(cfg: RunConfig, recorder: RunRecorder) -> FedAvg:
    """Return the configured strategy: it waits for `min-available-nodes` sites and trains `fraction-train` of them."""
    # Flower samples max(fraction * connected, min_*_nodes) sites, so the minimum follows the fraction.
    min_train = max(1, math.ceil(cfg.fraction_train * cfg.min_available_nodes))
    fraction_evaluate = 1.0 if cfg.federated_evaluation else 0.0
    common = dict(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=fraction_evaluate,
        min_train_nodes=min_train,
        min_evaluate_nodes=cfg.min_available_nodes if cfg.federated_evaluation else 0,
        min_available_nodes=cfg.min_available_nodes,
        weighted_by_key=k.NUM_EXAMPLES,
        arrayrecord_key=k.ARRAYS,
        configrecord_key=k.CONFIG,
        train_metrics_aggr_fn=aggregate_site_metrics,
        evaluate_metrics_aggr_fn=aggregate_site_metrics,
    )
    strategy: FedAvg
    if cfg.strategy == "fedavg":
        strategy = FedtlFedAvg(**common)
    elif cfg.strategy == "fedprox":
        strategy = FedtlFedProx(**common, proximal_mu=cfg.proximal_mu)
    else:
        strategy = FedtlFedAdam(**common, eta=cfg.server_learning_rate)
    strategy.recorder = recorder  # type: ignore[attr-defined]
    return strategy
