"""Screening and recording around Flower's strategies: replies are checked before they are aggregated.

`RecordingMixin` goes in front of any Flower strategy (server/strategy.py, server/client_dp.py): it sends a
round only to the sites that accepted the run, screens every reply (server/report.py `RunRecorder`),
records per-site metrics, aggregates in site order, and stops a round with too few accepted updates.
"""

from __future__ import annotations

from typing import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedtl.server.report import RunRecorder, reply_site_name, weighted_site_metrics
from fedtl.shared import constants as k
from fedtl.shared.errors import FederationError


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
            rejected = "; ".join(
                f"{r['site']}: {r['reason']}" for r in self.recorder.rejected if r["round"] == server_round
            )
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
