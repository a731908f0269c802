"""The DP-SGD head solver: rounds of DP-SGD at every site, screened and aggregated by a Flower strategy.

Each round the strategy sends the global model to the sampled sites (`train` messages), screens and
aggregates their updates (server/screening.py), evaluates the result centrally and at the sites, and
checkpoints the run. Personalisation: `finetune` asks every site to finetune the final model locally
(charged) after the last round; `fedper` reports each site's own model.
"""

from __future__ import annotations

import logging
import math

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedtl.server.checkpoint import Checkpoint, restore_strategy_state, save_checkpoint, strategy_state
from fedtl.server.report import RunRecorder, failure_reason
from fedtl.server.setup import ask, query_sites
from fedtl.server.solvers.base import Federation, SolverResult, plan_as_configured
from fedtl.server.strategy import make_strategy
from fedtl.shared import constants as k
from fedtl.shared.config import RunConfig
from fedtl.shared.errors import FederationError

log = logging.getLogger(__name__)


class DpSgdSolver:
    """Rounds of DP-SGD at every site (client/solvers/dp_sgd.py), aggregated by the run's strategy."""

    @staticmethod
    def configure(cfg: RunConfig) -> RunConfig:
        """Return `cfg` unchanged: the rounds, strategy and schedule are the run config's."""
        return cfg

    plan = staticmethod(plan_as_configured)

    def fit(self, fed: Federation) -> SolverResult:
        """Run the remaining rounds, checkpointing after each; then the personalisation phase, if any.

        Raises:
            FederationError: a round got fewer than min-train-sites updates (the run can be resumed), or no
                site returned a usable update at all.
        """
        cfg, recorder, done = fed.cfg, fed.recorder, fed.run.rounds_done
        strategy = make_strategy(
            cfg,
            recorder,
            round_offset=done,
            excluded_nodes=frozenset(fed.setup.refused),
            no_evaluate_nodes=fed.setup.no_evaluation,
            num_sites=len(fed.node_ids),
        )
        if fed.run.checkpoint is not None:
            restore_strategy_state(strategy, fed.run.checkpoint.strategy_state)

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0 and done:
                return None  # a resumed run: round `done` was already evaluated and recorded
            server_round += done
            scores = fed.central(arrays) if fed.central is not None else None

            def checkpoint() -> None:  # after the round's line joins the records, before metrics.jsonl shows it
                head = {name: a.numpy() for name, a in arrays.items()}
                state = Checkpoint(server_round, head, strategy_state(strategy), records=recorder.state())
                save_checkpoint(fed.run.run_dir, state)

            recorder.finish_round(server_round, scores, checkpoint=checkpoint)
            return MetricRecord(scores) if scores else None

        if done:
            log.info("run %s resumes after round %d of %d", fed.run.run_id, done, cfg.num_rounds)
        result = strategy.start(
            grid=fed.grid,
            initial_arrays=ArrayRecord({name: Array(v) for name, v in fed.initial.items()}),
            num_rounds=cfg.num_rounds - done,
            timeout=cfg.round_timeout,
            train_config=fed.config,
            evaluate_config=fed.config,
            evaluate_fn=evaluate_fn,
        )
        if not result.train_metrics_clientapp and not done:
            raise FederationError(
                f"run {fed.run.run_id}: no site returned a usable update in {cfg.num_rounds} rounds; "
                f"rejected replies: {recorder.rejected[:5]}"
            )
        personalized: dict[str, dict[str, float]] = {}
        if cfg.personalization == k.FINETUNE:
            personalized = finetune_sites(
                fed.grid,
                fed.node_ids,
                set(fed.setup.no_evaluation),
                fed.config,
                result.arrays,
                recorder,
                cfg.round_timeout,
            )
        elif cfg.personalization == k.FEDPER:
            personalized = fedper_sites(recorder)
        return SolverResult(result.arrays, personalized)


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
    targets = [n for n in node_ids if n not in no_evaluation]
    replies = query_sites(
        grid, targets, RecordDict({k.CONFIG: ask(config, k.ACTION_FINETUNE), k.ARRAYS: arrays}), timeout
    )
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
