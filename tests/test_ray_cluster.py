"""Sites on an existing Ray cluster: a head and a worker started here with `ray start`, stopped by PID."""

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedtl.client.site import SIMULATION_ENV
from fedtl.shared.config import RunConfig
from fedtl.shared.errors import ConfigError
from fedtl.simulations.engine import GCS_PROBE_SECONDS, RAY_ADDRESS_ENV, parse_ray_address, simulate

pytestmark = pytest.mark.slow  # a Ray head and worker started and stopped

RAY = Path(sys.executable).with_name("ray")
START_SECONDS = 120.0  # both nodes up (two `ray start` on two shared cores)
STOP_SECONDS = 60.0
ROUNDS = 2
ACTOR_TITLE = b"ray::ClientAppActor"  # Ray sets an actor's process title to its class (Flower's ClientApp actor)
linux_only = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads processes from /proc")


def test_parse_ray_address_accepts_host_port_auto_and_empty():
    assert parse_ray_address("") is None
    assert parse_ray_address("auto") is None
    assert parse_ray_address("10.0.0.5:6379") == ("10.0.0.5", 6379)
    assert parse_ray_address("head-0.cluster.local:6380") == ("head-0.cluster.local", 6380)
    assert parse_ray_address("[::1]:6379") == ("::1", 6379)


@pytest.mark.parametrize(
    ("address", "match"),
    [
        ("6379", r"`ray-address` must be HOST:PORT, \"auto\" or \"\", got '6379'"),
        ("head:", r"got 'head:'.*--port of `ray start --head`"),
        ("head:port", r"got 'head:port'"),
        ("head:6379/x", r"got 'head:6379/x'"),
        ("head:70000", r"port must be in 1\.\.65535, got 70000 in 'head:70000'"),
        ("ray://head:10001", r"'ray://head:10001' is a Ray Client address.*run `fedtl simulate` on a node"),
    ],
)
def test_malformed_ray_address_is_named(address, match):
    with pytest.raises(ConfigError, match=match):
        parse_ray_address(address)
    with pytest.raises(ConfigError, match=match):  # simulate refuses it before starting anything
        simulate(RunConfig(backbone="tiny", ray_address=address), num_sites=2)


def test_unreachable_ray_address_fails_fast():
    import ray

    (port,) = _free_ports(1)  # nothing listens there: ray.init itself would retry it for many minutes
    start = time.monotonic()
    with pytest.raises(ConfigError, match=rf"`ray-address` = '127\.0\.0\.1:{port}': no Ray head answers there"):
        simulate(RunConfig(backbone="tiny", ray_address=f"127.0.0.1:{port}"), num_sites=2)
    assert time.monotonic() - start < GCS_PROBE_SECONDS + 5
    assert not ray.is_initialized()
    assert os.environ.get(SIMULATION_ENV) is None


@dataclass
class RayNode:
    """One `ray start --block` running in its own process group (its pid is the group id)."""

    role: str
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        """Return what `ray start` printed, for failure messages."""
        return f"--- {self.role} ({self.log}) ---\n{self.log.read_text(errors='replace')[-4000:]}"


@dataclass(frozen=True)
class Proc:
    """A process as /proc shows it; (pid, start) identifies it even after its pid is reused."""

    pid: int
    ppid: int
    pgid: int
    start: int


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _processes() -> dict[int, Proc]:
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp session ...
        table[int(entry.name)] = Proc(int(entry.name), int(fields[1]), int(fields[2]), int(fields[19]))
    return table


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _ancestors(pid: int, table: dict[int, Proc]) -> list[int]:
    chain = []
    while pid in table and pid > 1:
        pid = table[pid].ppid
        chain.append(pid)
    return chain


def _descendants(root: int, table: dict[int, Proc]) -> list[Proc]:
    return [p for p in table.values() if root in _ancestors(p.pid, table)]


def _is_raylet(cmdline: bytes) -> bool:
    return cmdline.split(b"\0")[0].endswith(b"/raylet")


def _alive_node_ids(address: str) -> list[str]:
    """Return the ids of the cluster's alive nodes, asked by a separate driver process."""
    code = (
        "import json, ray\n"
        f"ray.init(address={address!r}, logging_level='ERROR')\n"
        "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))\n"
        "ray.shutdown()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90, env=_ray_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ray_env() -> dict[str, str]:
    # The nodes get none of the sites' variables: the run must forward them (runtime_env) to work.
    dropped = {SIMULATION_ENV, "FEDTL_HOME", "OMP_NUM_THREADS", RAY_ADDRESS_ENV}
    return {k: v for k, v in os.environ.items() if k not in dropped}


def _node_ports() -> list[str]:
    names = ("node-manager", "object-manager", "dashboard-agent-listen", "dashboard-agent-grpc", "metrics-export")
    ports = _free_ports(len(names) + 1)
    # Two nodes share this machine: every fixed default port (agents, metrics) would clash between them.
    args = [arg for name, port in zip(names, ports) for arg in (f"--{name}-port", str(port))]
    return [*args, "--runtime-env-agent-port", str(ports[-1])]


def _start_node(role: str, args: list[str], temp_dir: Path) -> RayNode:
    log = temp_dir / f"{role}.log"
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--object-store-memory", str(128 * 2**20)]
    process = subprocess.Popen(
        [str(RAY), "start", *args, *common, *_node_ports(), "--disable-usage-stats", "--block"],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=_ray_env(),
        start_new_session=True,  # its own process group, so it and all it starts are stopped together
    )
    return RayNode(role, process, log)


def _wait_for_port(port: int, node: RayNode, deadline: float) -> None:
    while time.monotonic() < deadline:
        assert node.process.poll() is None, node.output()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the head's GCS port {port} did not open within {START_SECONDS} s\n{node.output()}")


def _stop(nodes: list[RayNode], *, sig: int = signal.SIGTERM) -> None:
    """Signal each node's whole process group (never `ray stop`, which stops every Ray of the machine)."""
    for node in reversed(nodes):
        try:
            os.killpg(node.process.pid, sig)
        except ProcessLookupError:
            pass


class ActorWatch:
    """Records, while a run goes on, the ClientApp actor processes (with their ancestors) and raylets started
    from this process, directly or through `ray start`."""

    def __init__(self) -> None:
        self.seen: dict[tuple[int, int], list[int]] = {}  # (pid, start) -> ancestor pids
        self.raylets: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            table = _processes()
            for proc in table.values():
                ancestors = _ancestors(proc.pid, table)
                if os.getpid() not in ancestors:  # other people's Ray runs on this machine too
                    continue
                cmdline = _cmdline(proc.pid)
                if cmdline.startswith(ACTOR_TITLE):
                    self.seen.setdefault((proc.pid, proc.start), ancestors)
                elif _is_raylet(cmdline):
                    self.raylets.add(proc.pid)
            self._stop.wait(0.2)

    def __enter__(self) -> "ActorWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def ray_cluster():
    """Start a head and one worker (1 CPU each) on this machine; stop both by process group afterwards."""
    temp_dir = Path(tempfile.mkdtemp(prefix="fedtl-ray-", dir="/tmp"))  # short: Ray's socket paths live under it
    port, client_port, dashboard_port = _free_ports(3)
    address = f"127.0.0.1:{port}"
    nodes: list[RayNode] = []
    try:
        deadline = time.monotonic() + START_SECONDS
        head_args = ["--head", "--port", str(port), "--ray-client-server-port", str(client_port)]
        head_args += ["--include-dashboard", "false", "--dashboard-port", str(dashboard_port)]
        nodes.append(_start_node("head", [*head_args, "--temp-dir", str(temp_dir)], temp_dir))
        _wait_for_port(port, nodes[0], deadline)
        nodes.append(_start_node("worker", ["--address", address], temp_dir))
        node_ids: list[str] = []
        while len(node_ids) < 2:
            assert time.monotonic() < deadline, f"2 nodes not up in {START_SECONDS} s: {node_ids}\n" + "\n".join(
                n.output() for n in nodes
            )
            for node in nodes:
                assert node.process.poll() is None, node.output()
            node_ids = _alive_node_ids(address)
        yield {"address": address, "nodes": nodes, "temp_dir": temp_dir}
    finally:
        # A safety net only: the test stops the nodes itself and checks they are gone. A group is signalled
        # only while it still exists (its leader unreaped, or members left), so its id cannot be reused.
        left = {p.pgid for p in _processes().values()}
        _stop([n for n in nodes if n.process.poll() is None or n.process.pid in left], sig=signal.SIGKILL)
        for node in nodes:
            node.process.wait(timeout=STOP_SECONDS)
        shutil.rmtree(temp_dir, ignore_errors=True)


@linux_only
def test_federation_runs_on_an_existing_ray_cluster(ray_cluster, tmp_path, monkeypatch, caplog):
    address, nodes = ray_cluster["address"], ray_cluster["nodes"]
    table = _processes()
    raylets = {}
    for node in nodes:
        found = [p.pid for p in _descendants(node.process.pid, table) if _is_raylet(_cmdline(p.pid))]
        assert len(found) == 1, (node.role, found)
        raylets[found[0]] = node.role
    cfg = RunConfig(backbone="tiny", data="digits", num_rounds=ROUNDS, out=str(tmp_path / "runs"), seed=0)

    # No node has 2 CPUs: refused up front instead of waiting for an actor that can never be placed
    # ("auto" finds the cluster through $RAY_ADDRESS, as under `ray job submit`).
    with monkeypatch.context() as env, pytest.raises(ConfigError, match=r"no node with `client_cpus` = 2\.0 CPUs"):
        env.setenv(RAY_ADDRESS_ENV, address)
        simulate(cfg.replace(ray_address="auto"), num_sites=2, client_cpus=2.0)

    with ActorWatch() as watch, caplog.at_level(logging.INFO, logger="fedtl.simulations.engine"):
        summary = simulate(cfg.replace(ray_address=address, round_timeout=120.0), num_sites=2)
    assert f"joined the Ray cluster at {address}" in caplog.text
    assert "2 nodes, 2 CPUs, up to 2 sites at once" in caplog.text

    run_dir = Path(summary["run-dir"])
    assert json.loads((run_dir / "summary.json").read_text())["run-id"] == summary["run-id"]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == list(range(ROUNDS + 1))
    assert set(lines[-1]["sites"]) == {"site-0", "site-1"}

    # The sites ran in the cluster's worker processes: each ClientApp actor descends from one of the two
    # nodes' raylets (a CPU each, so one actor per node), and this driver started no Ray of its own.
    assert watch.seen, "no ClientApp actor process was seen during the run"
    hosts = set()
    for (pid, _), ancestors in watch.seen.items():
        owners = [raylets[a] for a in ancestors if a in raylets]
        assert len(owners) == 1, (pid, [(a, _cmdline(a)[:80]) for a in ancestors], raylets)
        hosts.add(owners[0])
    assert hosts == {"head", "worker"}
    assert watch.raylets == set(raylets), (watch.raylets, raylets)

    # Leaving the cluster only disconnected this driver: both nodes still run.
    assert len(_alive_node_ids(address)) == 2
    for node in nodes:
        assert node.process.poll() is None, node.output()

    # Stop both by PID (their process groups) and check that no process of either is left.
    table = _processes()
    groups = {node.process.pid for node in nodes}
    started = {(p.pid, p.start) for node in nodes for p in _descendants(node.process.pid, table)}
    started |= set(watch.seen)
    assert len(started) > 4, started  # gcs, raylets, agents, workers: the check below looks at real processes
    _stop(nodes)
    for node in nodes:
        node.process.wait(timeout=STOP_SECONDS)
    deadline = time.monotonic() + STOP_SECONDS
    while True:
        table = _processes()
        left = [p for p in table.values() if p.pgid in groups or (p.pid, p.start) in started]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not left, [(p, _cmdline(p.pid)[:200]) for p in left]
