"""An in-process executor: the SAME ServerApp logic and ClientApp handlers as Flower's engine, without Ray.

Flower's simulation engine starts Ray, an actor pool and a SuperLink state for every run (seconds of fixed
cost, see `benchmarks/inprocess_overhead.py`), which dominates sweeps of many small runs. `InProcessGrid`
is a `flwr.serverapp.Grid` that hands each message straight to the ClientApp object in this process, one
site after the other, and returns replies built exactly as Flower's engine builds them: `reply_to` metadata,
src/dst node ids, and an error reply (never a crash of the server) when a handler raises.

Each simulated node keeps only its Flower `Context` (node config, an empty-by-default state RecordDict,
the run config): models and features live in the site's folders on disk, as in deployment, so memory
grows with the features of the site being run, not with the number of sites.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict, UserConfig
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.clientapp.client_app import ClientAppException
from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, ErrorCode
from flwr.server.utils.validator import validate_message
from flwr.serverapp import Grid
from flwr.supercore.date import now
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedtl.client.client_app import app as fedtl_client_app
from fedtl.shared import constants as k
from fedtl.shared.config import RunConfig
from fedtl.shared.errors import ConfigError
from fedtl.simulations.federation import AppFactory, FederationApp, simulated_sites, start_simulation

log = logging.getLogger(__name__)

# Node ids are NODE_ID_BASE + partition id, so `node-1000003` in a log is partition 3 (Flower's engine
# draws random 64-bit ids; any id other than the SuperLink's own, 1, is valid).
NODE_ID_BASE = 1_000_000
SITE_LOGGERS = ("fedtl.client",)  # what the sites log; Flower's engine keeps it in the Ray workers


@dataclass(frozen=True)
class SimulatedNode:
    """One simulated SuperNode: its id and the Flower Context its ClientApp sees (no model, no features)."""

    node_id: int
    context: Context


class InProcessGrid(Grid):
    """A Grid that delivers each message to a ClientApp in this process and returns its reply.

    Messages are handled in the order they are pushed, one at a time, so `send_and_receive` returns
    every reply (there is no network to time out: `timeout` is accepted and not applied).
    """

    def __init__(
        self,
        client_app: ClientApp,
        *,
        num_nodes: int,
        run_config: UserConfig | None = None,
        node_configs: list[UserConfig] | None = None,
    ) -> None:
        """Register `num_nodes` nodes with partition ids 0..num_nodes-1 and node ids NODE_ID_BASE + partition id.

        `node_configs` replaces the simulated sites' node configs, e.g. `{"policy": path}` for real sites (a
        site's own policy, folders and ledger) answering in this process.
        """
        if num_nodes < 1:
            raise ConfigError(f"`num_nodes` must be >= 1, got {num_nodes}")
        self._client_app = client_app
        self._run_config: UserConfig = dict(run_config or {})
        self._run: Run | None = None
        self._nodes: dict[int, SimulatedNode] = {}
        self._num_nodes = num_nodes
        self._node_configs = node_configs
        self._replies: dict[str, Message] = {}  # instruction message id -> reply, until pulled

    def set_run(self, run: Run) -> None:
        """Set the run; every node gets a fresh Context for it (as Flower's engine registers one per node)."""
        if not isinstance(run, Run):
            raise TypeError(f"`run` must be an instance of Run, got {type(run).__name__}")
        self._run = run
        self._nodes = {
            NODE_ID_BASE + pid: SimulatedNode(
                NODE_ID_BASE + pid,
                Context(
                    run_id=run.run_id,
                    node_id=NODE_ID_BASE + pid,
                    node_config=dict(self._node_configs[pid])
                    if self._node_configs
                    else {k.PARTITION_ID: pid, k.NUM_PARTITIONS: self._num_nodes},
                    state=RecordDict(),
                    run_config=dict(self._run_config),
                ),
            )
            for pid in range(self._num_nodes)
        }
        self._replies = {}

    @property
    def run(self) -> Run:
        """Return a copy of the run this grid serves."""
        if self._run is None:
            raise RuntimeError("InProcessGrid has no run yet; call set_run first")
        return Run(**vars(self._run))

    def node_context(self, node_id: int) -> Context:
        """Return the Context the ClientApp of node `node_id` sees."""
        return self._nodes[node_id].context

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        """Return a new instruction message (Flower deprecates this in favour of the Message constructor)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        """Return the ids of all simulated nodes (all are always connected)."""
        return list(self._nodes)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Run each message through its node's ClientApp now; return the ids of the accepted messages."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())  # as Flower's InMemoryGrid does
            reply = self._deliver(msg)
            if reply is not None:
                ids.append(msg.metadata.message_id)
                self._replies[msg.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """Return (and forget) the replies to `message_ids` that are ready."""
        return [self._replies.pop(mid) for mid in message_ids if mid in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Deliver the messages and return all replies, in the order the messages were given."""
        return self.pull_messages(self.push_messages(messages))

    def _deliver(self, msg: Message) -> Message | None:
        """Return the node's reply to `msg`, or None where Flower's SuperLink would drop the exchange."""
        errors = validate_message(msg, is_reply_message=False)
        node = self._nodes.get(msg.metadata.dst_node_id)
        if errors or node is None or self._run is None or msg.metadata.run_id != self._run.run_id:
            # Flower's link state logs and refuses such a message; the server then sees no reply.
            log.error(
                "message to node %s refused: %s",
                msg.metadata.dst_node_id,
                errors or ("unknown destination node" if node is None else "wrong run id"),
            )
            return None
        # Each node gets its own copy, as Ray's serialisation gives each actor one; array bytes are
        # immutable, so the copy shares them and costs no memory.
        delivered = copy.deepcopy(msg)
        delivered.metadata.delivered_at = now().isoformat()  # as the link state stamps it
        try:
            reply = self._client_app(delivered, node.context)
        except Exception as exc:  # a site's failure becomes an error reply, as in Flower
            # Mirrors flwr.simulation.ray_transport.ray_actor (wraps in ClientAppException) and
            # flwr.server.superlink.fleet.vce.vce_api.worker (the reason text, the error code).
            wrapped = ClientAppException(str(exc))
            log.error(
                "ClientApp of node %d (partition %s) raised on a %s message",
                node.node_id,
                node.context.node_config[k.PARTITION_ID],
                msg.metadata.message_type,
                exc_info=exc,
            )
            reason = str(type(wrapped)) + ":<'" + str(wrapped) + "'>"
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=delivered)
        reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
        problems = validate_message(reply, is_reply_message=True)
        if (
            problems
            or reply.metadata.reply_to_message_id != msg.metadata.message_id
            or reply.metadata.src_node_id != node.node_id
        ):
            log.error("reply of node %d dropped (not a valid reply to its message): %s", node.node_id, problems)
            return None
        return reply


def run_inprocess(
    cfg: RunConfig,
    *,
    num_sites: int,
    run_dir: Path | None = None,
    client_app: ClientApp = fedtl_client_app,
    verbose: bool = False,
    app: AppFactory = FederationApp,
) -> dict[str, Any]:
    """Run a federation of `num_sites` simulated sites in this process, without Ray.

    The same `run_federation` (ServerApp logic) and ClientApp handlers as `simulate`; with the server's
    order-independent aggregation the results equal those of Flower's engine for the same seed.

    Args:
        cfg: the run configuration; `min-available-nodes` is raised to `num_sites` so every site joins.
        num_sites: number of simulated SuperNodes (sites).
        run_dir: results folder; a fresh `out/<run-id>/` when None.
        client_app: the ClientApp every site runs (fedtl's own by default).
        verbose: show the sites' logs (off: only their errors, as Flower's engine and a sweep want).
        app: builds the server side from (cfg, run_dir): a federation by default, any FederationApp subclass.

    Returns:
        The run summary written to `summary.json`.

    Raises:
        Exception: whatever the ServerApp raised.
    """
    federation = start_simulation(cfg, num_sites, app, run_dir)
    cfg = federation.cfg

    # A random unsigned run id as Flower's link state draws one (its helper's module imports a SuperLink store: 1 s).
    run = Run.create_empty(run_id=int.from_bytes(os.urandom(RUN_ID_NUM_BYTES), "little", signed=False))
    run.primary_task_id = 1
    # Sites get the run config a deployed ClientApp would (Flower's legacy simulation API gives an empty one).
    grid = InProcessGrid(client_app, num_nodes=num_sites, run_config=dict(cfg.to_mapping()))
    grid.set_run(run)
    server_context = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
    with simulated_sites(), _task_identity(run.run_id), _site_log_level(verbose):
        federation.server_app()(grid, server_context)
    return federation.summary()


@contextlib.contextmanager
def _task_identity(run_id: int) -> Iterator[None]:
    """Stamp new messages as the ServerApp's (run id, SuperLink node) as Flower's engine does; restore after."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@contextlib.contextmanager
def _site_log_level(verbose: bool) -> Iterator[None]:
    """Keep the sites' log lines out of this terminal unless `verbose`, as Flower's engine does (they stay in Ray).

    Only their errors get through: the server already logs what matters run-wide (a non-private run,
    a refusal, a rejected reply, naming the site), and a sweep of many runs would repeat every site's
    per-round warnings thousands of times.
    """
    loggers = [logging.getLogger(name) for name in SITE_LOGGERS]
    levels = [lg.level for lg in loggers]
    if not verbose:
        for lg in loggers:
            lg.setLevel(max(lg.getEffectiveLevel(), logging.ERROR))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
