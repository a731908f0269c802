"""Flower strategies (FedAvg, FedProx, FedAdam) wired to fedtl's reply screening and run recording."""

from __future__ import annotations

import logging
from typing import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from fedtl.server.report import RunRecorder, reply_site_name, weighted_site_metrics
from fedtl.shared import constants as k
from fedtl.shared.config import RunConfig
from fedtl.shared.errors import FederationError

log = logging.getLogger(__name__)


def aggregate_site_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Aggregate the MetricRecords of replies as `weighted_site_metrics` does (weights: `num-examples`)."""
    assert weighted_by_key == k.NUM_EXAMPLES, weighted_by_key
    return MetricRecord(weighted_site_metrics([dict(next(iter(r.metric_records.values()))) for r in records]))


class AcceptedSites:
    """A Grid seen through a filter: Flower's strategies sample only among the sites that accepted the run."""

    def __init__(self, grid: Grid, excluded: frozenset[int]) -> None:
        self._grid = grid
        self._excluded = excluded

    def get_node_ids(self):  # type: ignore[no-untyped-def]
        """Return the connected nodes, less those left out of the run."""
        return [n for n in self._grid.get_node_ids() if n not in self._excluded]

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self._grid, name)


class RecordingMixin:
    """Screen replies before aggregation, record per-site metrics, and keep a run resumable.

    A reply with wrong keys, shapes, dtypes, non-finite values or an implausible update norm is logged
    and dropped; so is a site's refusal. The rest are aggregated by the Flower strategy this mixin is
    combined with. Sites that refused the run at set-up are not sent its rounds; sites whose policy
    keeps evaluation metrics local are not asked for them. `round_offset` numbers the rounds of a
    resumed run after those already done, and a round with fewer than `min_train_sites` accepted
    updates stops the run with `FederationError` (its last checkpoint stays, to resume from).
    """

    recorder: RunRecorder
    round_offset: int = 0
    min_train_sites: int = 1
    excluded_nodes: frozenset[int] = frozenset()
    no_evaluate_nodes: frozenset[int] = frozenset()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):  # type: ignore[no-untyped-def]
        """Send the round to every sampled site that did not refuse the run."""
        self.recorder.set_global_arrays(arrays)
        grid = AcceptedSites(grid, self.excluded_nodes)
        messages = list(super().configure_train(server_round + self.round_offset, arrays, config, grid))  # type: ignore[misc]
        self.recorder.expect_replies(messages)
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):  # type: ignore[no-untyped-def]
        """Ask for evaluation only the sites whose policy releases evaluation metrics."""
        # Sampled among the sites that accepted the run, then the ones keeping metrics local are left out
        # (sampling among those that release metrics alone would wait for min-train-sites of them).
        grid = AcceptedSites(grid, self.excluded_nodes)
        messages = super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)  # type: ignore[misc]
        return [m for m in messages if m.metadata.dst_node_id not in self.no_evaluate_nodes]

    @staticmethod
    def _in_site_order(replies: Iterable[Message]) -> list[Message]:
        """Return the replies sorted by the site name they carry (then node id), not by arrival.

        Flower's engine returns replies in completion order and float sums depend on the order of their
        terms, so sorting makes the aggregate (and the recorded metrics) the same whatever order the
        sites finished in, and the same under every executor.
        """
        return sorted(replies, key=lambda msg: (reply_site_name(msg), msg.metadata.src_node_id))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):  # type: ignore[no-untyped-def]
        """Drop malformed replies, record per-site training metrics, then aggregate the rest.

        Raises:
            FederationError: fewer than `min_train_sites` updates were accepted this round.
        """
        server_round += self.round_offset
        kept = self.recorder.screen_train(server_round, self._in_site_order(replies))
        if len(kept) < self.min_train_sites:
            rejected = [r for r in self.recorder.rejected if r["round"] == server_round]
            raise FederationError(
                f"round {server_round}: {len(kept)} accepted update(s) < min-train-sites {self.min_train_sites}; "
                f"rejected or refused: {rejected or 'none (sites did not answer in time)'}. The run stopped after "
                f'its last checkpoint; fix the sites, then continue it with resume = "{self.recorder.run_dir}"'
            )
        return super().aggregate_train(server_round, kept)  # type: ignore[misc]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):  # type: ignore[no-untyped-def]
        """Record per-site evaluation metrics, then aggregate them."""
        server_round += self.round_offset
        kept = self.recorder.screen_evaluate(server_round, self._in_site_order(replies))
        if not kept:
            return None
        return super().aggregate_evaluate(server_round, kept)  # type: ignore[misc]


class FedtlFedAvg(RecordingMixin, FedAvg):
    """Example-weighted FedAvg of head tensors (McMahan et al. 2017)."""


class FedtlFedProx(RecordingMixin, FedProx):
    """FedProx (Li et al. 2020): FedAvg plus a proximal term applied at each site."""


class FedtlFedAdam(RecordingMixin, FedAdam):
    """FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization") on the head tensors."""


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
    strategy: FedAvg
    if cfg.strategy == "fedavg":
        strategy = FedtlFedAvg(**common)
    elif cfg.strategy == "fedprox":
        strategy = FedtlFedProx(**common, proximal_mu=cfg.proximal_mu)
    else:
        strategy = FedtlFedAdam(**common, eta=cfg.server_learning_rate)
    strategy.recorder = recorder  # type: ignore[attr-defined]
    strategy.min_train_sites = cfg.min_train_sites  # type: ignore[attr-defined]
    strategy.round_offset = round_offset  # type: ignore[attr-defined]
    strategy.excluded_nodes = excluded_nodes  # type: ignore[attr-defined]
    strategy.no_evaluate_nodes = no_evaluate_nodes  # type: ignore[attr-defined]
    # Imported here: client_dp builds its wrapped strategies on RecordingMixin, defined in this module.
    from fedtl.server.client_dp import wrap_client_dp

    return wrap_client_dp(strategy, cfg, num_sites=num_sites)
