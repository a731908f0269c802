"""The one place that starts Flower's simulation engine; swap it here when the API changes.

`flwr.simulation.run_simulation` is deprecated (since Flower 1.28) but runs the SAME ServerApp logic
and ClientApp that deployment uses, on Ray, and re-raises ServerApp errors to the caller. The sites run
on a private Ray started for the run, or on an existing Ray cluster (`ray-address`) when one machine is
too small.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import re
import signal
import socket
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from queue import Queue
from typing import Any

from fedtl.client.client_app import app as client_app
from fedtl.client.site import SIMULATION_ENV
from fedtl.shared.backbones import WEIGHTS_DIR_ENV
from fedtl.shared.config import RunConfig
from fedtl.shared.errors import ConfigError
from fedtl.simulations.federation import AppFactory, FederationApp, simulated_sites, start_simulation
from fedtl.simulations.stopping import RunStopped, StopOnSignals

log = logging.getLogger(__name__)

RAY_ADDRESS_AUTO = "auto"  # Ray's own discovery: $RAY_ADDRESS, else the cluster the last `ray start` made here
RAY_ADDRESS_ENV = "RAY_ADDRESS"  # Ray reads it when ray.init gets no address or "auto"
# Variables the sites read, forwarded to the workers of an existing cluster: they were started by
# `ray start` on each node and do not inherit this driver's environment (a private Ray's workers do).
FORWARDED_ENV = (
    "FEDTL_HOME",
    WEIGHTS_DIR_ENV,
    "OMP_NUM_THREADS",
    "FLWR_LOG_LEVEL",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO",
)
GCS_PROBE_SECONDS = 5.0  # ray.init retries an unreachable GCS address for many minutes: probe it first
_HOST_PORT = re.compile(r"(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]):(?P<port>[0-9]{1,5})")


def parse_ray_address(address: str) -> tuple[str, int] | None:
    """Return (host, port) of a `ray-address` HOST:PORT, None for "" or "auto"; raise ConfigError otherwise."""
    if address in ("", RAY_ADDRESS_AUTO):
        return None
    fix = (
        "give the GCS address of the cluster's head node as HOST:PORT (the --port of `ray start --head`, "
        'e.g. ray-address = "10.0.0.5:6379"), "auto" for the cluster started on this machine, or "" for a '
        "private Ray"
    )
    if address.startswith("ray://"):
        raise ConfigError(
            f"`ray-address` = {address!r} is a Ray Client address, which fedtl does not use: run `fedtl simulate` "
            f"on a node of the cluster and {fix}"
        )
    match = _HOST_PORT.fullmatch(address)
    if match is None:
        raise ConfigError(f'`ray-address` must be HOST:PORT, "auto" or "", got {address!r}: {fix}')
    port = int(match["port"])
    if not 1 <= port <= 65535:
        raise ConfigError(f"`ray-address` port must be in 1..65535, got {port} in {address!r}: {fix}")
    return match["host"].strip("[]"), port


def build_worker_env() -> dict[str, str]:
    """Return the environment the sites need in the Ray workers of an existing cluster."""
    env = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    env[SIMULATION_ENV] = "1"
    return env


def simulate(
    cfg: RunConfig,
    *,
    num_sites: int,
    run_dir: Path | None = None,
    client_cpus: float = 1.0,
    verbose: bool = False,
    app: AppFactory = FederationApp,
) -> dict[str, Any]:
    """Run a federation of `num_sites` simulated sites on Flower's simulation engine.

    Args:
        cfg: the run configuration; `min-available-nodes` is raised to `num_sites` so every site joins;
            `ray-address` picks the Ray that runs the sites: "" a private one started here (and stopped
            after), "HOST:PORT" or "auto" an existing cluster, which this run joins and leaves running.
        num_sites: number of simulated SuperNodes (sites).
        run_dir: results folder; a fresh `out/<run-id>/` when None.
        client_cpus: CPUs Ray reserves per ClientApp (sites run in parallel up to cores / client_cpus).
        verbose: forward the sites' (Ray workers') output to this terminal.
        app: builds the server side from (cfg, run_dir): a federation by default, any FederationApp subclass.

    Returns:
        The run summary written to `summary.json`.

    Raises:
        ConfigError: `sites` < 1, a malformed or unreachable `ray-address`, or a cluster with no node that
            has `client_cpus` CPUs.
        Exception: whatever the ServerApp raised (Flower re-raises it here); Ray is shut down first.
        KeyboardInterrupt: SIGINT or SIGTERM stopped the run, once Flower's engine and Ray had stopped.
    """
    gcs = parse_ray_address(cfg.ray_address)
    federation = start_simulation(cfg, num_sites, app, run_dir)
    cfg = federation.cfg

    # Each Ray actor would otherwise start one torch thread per core and oversubscribe the CPU.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, int(client_cpus))))
    # Keep Ray's current behaviour (no GPUs asked for: leave CUDA_VISIBLE_DEVICES alone) without its warning.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Flower's RayBackend skips ray.init when Ray is already initialised, and it is, here: a private Ray is started
    # below, a cluster joined. Its own ray.init would give the job a runtime_env (PYTHONPATH), and the sites could then
    # not use the workers Ray starts ahead for a job without one: it started 2 more and dropped those (medians of a run
    # on 2 cores: 12.5 against 12.6 s for a tiny one, 28.2 against 29.2 s cold). fedtl is installed, so the workers
    # import it without that path.
    backend_config: dict[str, Any] = {"client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0}, "init_args": {}}
    if not cfg.ray_address and os.environ.get(RAY_ADDRESS_ENV):
        log.warning(
            "%s=%s is set but `ray-address` is empty: starting a private Ray anyway; set "
            "ray-address = %r to run the sites on that cluster",
            RAY_ADDRESS_ENV,
            os.environ[RAY_ADDRESS_ENV],
            os.environ[RAY_ADDRESS_ENV],
        )
    from flwr.simulation import run_simulation

    # Leave only a Ray this call started or joined, never one the caller had initialised.
    joined, starter = False, None
    stop = threading.Event()  # set by SIGINT or SIGTERM while Ray and the engine run (simulations/stopping.py)
    # Opt this machine's sites into simulation (Ray workers inherit the environment at start-up).
    with simulated_sites(), StopOnSignals(stop) as signals, PushWakesTheEngine() as waker:
        try:
            if cfg.ray_address:
                join_ray_cluster(cfg.ray_address, gcs=gcs, client_cpus=client_cpus, verbose=verbose)
                joined = True
            else:
                starter = start_private_ray(verbose=verbose)
            signals.arm()  # ray.init put its own SIGTERM handler in place
            if stop.is_set():  # asked while Ray started: no engine to stop
                raise KeyboardInterrupt
            with warnings.catch_warnings(), _without_our_deprecation_notice():
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                run_simulation(
                    server_app=federation.server_app(stop=stop, on_push=waker.pushed),
                    client_app=client_app,
                    num_supernodes=num_sites,
                    backend_config=backend_config,
                )
        except RunStopped as exc:  # the ServerApp's, re-raised by Flower once its engine has stopped
            raise KeyboardInterrupt(str(exc)) from None
        finally:
            if joined or starter is not None:
                leave_ray(starter)
    return federation.summary()


# Flower's engine (flwr/server/superlink/fleet/vce/vce_api.py, `add_messages_to_queue`) looks for the ServerApp's
# messages every 0.1 s, so each exchange started at that look: with two exchanges a round, a round of the default job
# took 0.2 s on the engine against 0.07 s in process. Its parameters, checked before its place is taken.
ENGINE_LOOK = ("state", "queue", "nodes_mapping", "f_stop")
ENGINE_LOOK_S = 0.1  # Flower's interval: the engine still looks this often, to see its stop event


class PushWakesTheEngine:
    """While entered, Flower's engine hands a pushed message to its sites at once instead of at its next 0.1 s look.

    Flower's thread that moves the ServerApp's messages to the site workers waits on `pushed` instead of sleeping;
    the ServerApp's grid (StoppingGrid) calls `pushed` after each push. The thread looks exactly as Flower's does
    otherwise, and at least as often. Flower's function is back on leaving. Where it no longer has the parameters
    this replaces (another Flower), the engine keeps its own, and a warning says so.
    """

    def __init__(self) -> None:
        self._pushed = threading.Event()
        self.woken = 0  # looks started by a push rather than by the interval
        self._original: Any = None

    def pushed(self) -> None:
        """Wake the engine: messages were pushed."""
        self._pushed.set()

    def __enter__(self) -> PushWakesTheEngine:
        from flwr.server.superlink.fleet.vce import vce_api

        original = vce_api.add_messages_to_queue
        if tuple(inspect.signature(original).parameters) != ENGINE_LOOK:
            log.warning(
                "this Flower's engine hands messages to the sites differently: each exchange waits for its next look"
            )
            return self
        self._original, vce_api.add_messages_to_queue = original, self._add_messages_to_queue
        return self

    def __exit__(self, *exc: object) -> None:
        if self._original is not None:
            from flwr.server.superlink.fleet.vce import vce_api

            vce_api.add_messages_to_queue, self._original = self._original, None

    def _add_messages_to_queue(
        self,
        state: Any,  # noqa: ANN401 - Flower's LinkState
        queue: Queue[Any],
        nodes_mapping: dict[int, int],
        f_stop: threading.Event,
    ) -> None:
        """Put each node's next message in the workers' queue, as Flower's does, then wait for a push or 0.1 s."""
        while not f_stop.is_set():
            for node_id in nodes_mapping:
                for message in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(message)
            # A push stores its messages before it wakes this thread, and the wake is cleared before the next look:
            # messages pushed during a look are found by the one after it.
            if self._pushed.wait(ENGINE_LOOK_S):
                self.woken += 1
            self._pushed.clear()


class _RunSimulationNotice(logging.Filter):
    """Drops Flower's notice that `run_simulation` is deprecated: fedtl calls it here, on purpose, in one place."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


@contextlib.contextmanager
def _without_our_deprecation_notice() -> Iterator[None]:
    """Keep Flower's deprecation notice about our own `run_simulation` call out of the user's terminal."""
    flwr_logger, notice = logging.getLogger("flwr"), _RunSimulationNotice()
    flwr_logger.addFilter(notice)
    try:
        yield
    finally:
        flwr_logger.removeFilter(notice)


def start_private_ray(*, verbose: bool) -> _RayStarter | None:
    """Start a Ray of this machine's cores for one run (Flower's RayBackend stops it when the run ends).

    ray.init runs in a thread of its own, which lives on until `leave_ray`: called in the main thread, it puts a
    SIGTERM handler of its own in place (sys.exit), and a SIGTERM in the middle of it was swallowed by Ray or left the
    process hanging (2 of 12 tries); from another thread it leaves the signals to StopOnSignals. (Ray shuts down
    in 5 s instead of 1.4 s once the thread that started it has ended, hence the wait.)

    Returns:
        The thread that started it, for `leave_ray`; None when the caller has initialised Ray already (the run uses
        that one).
    """
    import ray

    if ray.is_initialized():
        return None
    # "local" starts a new Ray even where $RAY_ADDRESS names a cluster (ray.init would join it, then reject num_cpus).
    args = {"address": "local", "num_cpus": os.cpu_count() or 1, "include_dashboard": False, "log_to_driver": verbose}
    starter = _RayStarter({**args, "logging_level": logging.INFO if verbose else logging.WARNING})
    starter.start()
    try:
        while not starter.started.wait(0.1):  # the main thread stays free for signals
            pass
    except BaseException:  # a second signal (StopOnSignals): stop at once, once Ray has started what it will
        starter.started.wait()
        _stop_private_ray(starter)
        raise
    if starter.error is not None:
        _stop_private_ray(starter)
        raise starter.error
    return starter


def _stop_private_ray(starter: _RayStarter) -> None:
    """Stop the private Ray `starter` started, then kill every process of it that outlived ray.shutdown().

    ray.shutdown() may not know yet of every process a Ray whose start was cut short started, and one interrupted
    (a second Ctrl-C while Flower's engine stopped) left Ray's two agents running for a minute or two after fedtl had
    exited, orphans no longer below this process (its test failed 7 of 10 tries): they are held from Ray's start on.
    """
    import ray

    starter.processes.hold(descendants(os.getpid()) - starter.before)  # any started since (the sites' workers)
    try:
        if ray.is_initialized():
            ray.shutdown()
    finally:
        starter.processes.kill()
        starter.release.set()


class HeldProcesses:
    """Processes held by a pidfd each (Linux): signalled even once reparented, and a pid reused meanwhile never is."""

    def __init__(self) -> None:
        self._fds: dict[int, int] = {}

    def hold(self, pids: set[int]) -> None:
        """Hold the processes `pids` (one that has ended meanwhile is left out)."""
        for pid in pids - self._fds.keys():
            with contextlib.suppress(OSError, AttributeError):  # ended; a kernel or OS without pidfds: not held
                self._fds[pid] = os.pidfd_open(pid)

    def kill(self) -> None:
        """SIGKILL every held process still running (none, after a clean ray.shutdown()), and let go of them all."""
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            with contextlib.suppress(OSError):  # ESRCH: it has ended
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            os.close(fd)


class _RayStarter(threading.Thread):
    """Calls ray.init, holds the processes it started, then waits until released (after ray.shutdown)."""

    def __init__(self, init_args: dict[str, Any]) -> None:
        super().__init__(name="fedtl-ray-start", daemon=True)
        self.init_args, self.error = init_args, None
        self.started, self.release = threading.Event(), threading.Event()
        self.before = descendants(os.getpid())  # this process's children from before Ray: never Ray's
        self.processes = HeldProcesses()

    def run(self) -> None:
        import ray

        ray_log, notice = logging.getLogger("ray._private.worker"), _NotMainThreadNotice()
        ray_log.addFilter(notice)
        try:
            ray.init(**self.init_args)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self.error = exc
        finally:
            ray_log.removeFilter(notice)
            # Ray's processes, its agents among them, while they are still below this one (held before any is stopped)
            self.processes.hold(descendants(os.getpid()) - self.before)
            self.started.set()
        self.release.wait()


class _NotMainThreadNotice(logging.Filter):
    """Drops Ray's notice that it set no SIGTERM handler: fedtl starts it off the main thread for that reason."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


def descendants(pid: int) -> set[int]:
    """Return the pids of every living process below `pid` (Linux /proc; elsewhere none are found)."""
    parents: dict[int, int] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):  # ended while read
                    state, parent = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[:2]
                    if state != "Z":  # a zombie has ended; only its exit status waits to be collected
                        parents[int(entry.name)] = int(parent)
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def join_ray_cluster(address: str, *, gcs: tuple[str, int] | None, client_cpus: float, verbose: bool) -> None:
    """Connect this process to the existing Ray cluster at `address`, its workers set up for simulated sites.

    Args:
        address: `ray-address`, HOST:PORT or "auto" (checked by `parse_ray_address`).
        gcs: (host, port) parsed from a HOST:PORT address, probed before Ray is asked; None for "auto".
        client_cpus: CPUs each site needs; some node of the cluster must have that many.
        verbose: forward the workers' output to this terminal.

    Raises:
        ConfigError: nothing listens at `address`, Ray cannot join it, or no node has `client_cpus` CPUs.
    """
    import ray

    if ray.is_initialized():
        raise ConfigError(
            f"`ray-address` = {address!r} asks to join a cluster, but Ray is already initialised in this process: "
            "call ray.shutdown() first"
        )
    start_head = (
        "start one there with `ray start --head --port PORT` (and `ray start --address HOST:PORT` on each worker)"
    )
    if gcs is not None:
        try:
            socket.create_connection(gcs, timeout=GCS_PROBE_SECONDS).close()
        except OSError as exc:
            raise ConfigError(
                f"`ray-address` = {address!r}: no Ray head answers there ({exc}); {start_head}, or set "
                'ray-address = "" for a private Ray'
            ) from exc
    elif os.environ.get(RAY_ADDRESS_ENV):
        log.info(
            "ray-address %r: Ray takes the cluster from %s=%s", address, RAY_ADDRESS_ENV, os.environ[RAY_ADDRESS_ENV]
        )
    try:
        # num_cpus/num_gpus belong to the nodes (`ray start --num-cpus`): ray.init rejects them with an address.
        ray.init(
            address=address,
            runtime_env={"env_vars": build_worker_env()},
            log_to_driver=verbose,
            logging_level=logging.INFO if verbose else logging.WARNING,
        )
    except ConnectionError as exc:
        raise ConfigError(f"`ray-address` = {address!r}: Ray could not join a cluster ({exc}); {start_head}") from exc
    nodes = [node for node in ray.nodes() if node["Alive"]]
    cpus = [node["Resources"].get("CPU", 0.0) for node in nodes]
    # Flower sizes its actor pool per node, as here (flwr ray_actor.pool_size_from_resources).
    slots = sum(int(c / client_cpus) for c in cpus)
    if slots == 0:
        ray.shutdown()
        raise ConfigError(
            f"the Ray cluster at {address!r} has no node with `client_cpus` = {client_cpus} CPUs (nodes' CPUs: "
            f"{cpus}): start nodes with `ray start --num-cpus N` (N >= {client_cpus}) or lower client_cpus"
        )
    log.info(
        "joined the Ray cluster at %s (GCS %s): %d nodes, %g CPUs, up to %d sites at once",
        address,
        ray.get_runtime_context().gcs_address,
        len(nodes),
        sum(cpus),
        slots,
    )


def leave_ray(starter: _RayStarter | None = None) -> None:
    """Stop the private Ray `starter` started, or leave the cluster this process joined (its nodes keep running)."""
    import ray

    # Flower's RayBackend.terminate already called ray.shutdown(), which stops a private Ray and only disconnects
    # this driver from a joined cluster; this covers runs that failed before the backend existed.
    if starter is not None:
        _stop_private_ray(starter)
    elif ray.is_initialized():
        ray.shutdown()
