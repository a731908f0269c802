"""Flower strategies (FedAvg, FedProx, FedAdam) wired to fedtl's reply screening and run recording."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from fedtl.server.client_dp import wrap_client_dp
from fedtl.server.report import RunRecorder
from fedtl.server.screening import RecordingMixin, aggregate_site_metrics
from fedtl.shared import constants as k
from fedtl.shared.config import RunConfig

log = logging.getLogger(__name__)


class FedtlFedAvg(RecordingMixin, FedAvg):
    """Example-weighted FedAvg of head tensors (McMahan et al. 2017)."""


class FedtlFedProx(RecordingMixin, FedProx):
    """FedProx (Li et al. 2020): FedAvg plus a proximal term applied at each site."""


class FedtlFedAdam(RecordingMixin, FedAdam):
    """FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization") on the head tensors."""


# A new aggregation strategy: a RecordingMixin subclass of the Flower strategy above, an entry here (its own
# run-config keys as keyword arguments) and its name in shared/config.STRATEGIES.
STRATEGIES: dict[str, Callable[[RunConfig], tuple[type[FedAvg], dict[str, Any]]]] = {
    "fedavg": lambda cfg: (FedtlFedAvg, {}),
    "fedprox": lambda cfg: (FedtlFedProx, {"proximal_mu": cfg.proximal_mu}),
    "fedadam": lambda cfg: (FedtlFedAdam, {"eta": cfg.server_learning_rate}),
}


def make_strategy(
    cfg: RunConfig,
    recorder: RunRecorder,
    *,
    round_offset: int = 0,
    excluded_nodes: frozenset[int] = frozenset(),
    no_evaluate_nodes: frozenset[int] = frozenset(),
    num_sites: int | None = None,
) -> Strategy:
    """Return the configured strategy, training `fraction-train` of the connected sites each round.

    The run starts once `min-available-nodes` sites are connected (`wait_for_nodes`); after that a
    round goes ahead with as few as `min-train-sites` connected sites, so a site that drops out does
    not stall the federation. `round_offset` is the rounds a resumed run already did;
    `excluded_nodes` refused the run at set-up; `no_evaluate_nodes` keep evaluation metrics local.
    With `client-dp` on, the strategy is wrapped in Flower's client-level DP wrapper (server/client_dp.py),
    which needs `num_sites`, the sites taking part.
    """
    fraction_evaluate = 1.0 if cfg.federated_evaluation else 0.0
    common = dict(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=fraction_evaluate,
        min_train_nodes=cfg.min_train_sites,
        min_evaluate_nodes=1 if cfg.federated_evaluation else 0,
        min_available_nodes=cfg.min_train_sites,
        weighted_by_key=k.NUM_EXAMPLES,
        arrayrecord_key=k.ARRAYS,
        configrecord_key=k.CONFIG,
        train_metrics_aggr_fn=aggregate_site_metrics,
        evaluate_metrics_aggr_fn=aggregate_site_metrics,
    )
    cls, own = STRATEGIES[cfg.strategy](cfg)
    strategy = cls(**common, **own)
    strategy.recorder = recorder  # type: ignore[attr-defined]
    strategy.min_train_sites = cfg.min_train_sites  # type: ignore[attr-defined]
    strategy.round_offset = round_offset  # type: ignore[attr-defined]
    strategy.excluded_nodes = excluded_nodes  # type: ignore[attr-defined]
    strategy.no_evaluate_nodes = no_evaluate_nodes  # type: ignore[attr-defined]
    return wrap_client_dp(strategy, cfg, num_sites=num_sites)
