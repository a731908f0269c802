"""A real Flower deployment on loopback for tests: SuperLink (TLS + SuperNode auth) behind its Fleet front,
SuperNodes started with `fedtl site start` (the repository's app approved at each site), `flwr run`.

Every process is started in its own session and stopped by PID, together with every process it
started (collected from /proc before anything is killed, so nothing is orphaned unseen).
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedtl.client.approval import approve_app, build_fab
from fedtl.client.policy import load_policy
from fedtl.server.certs import generate_certificates, generate_supernode_keys
from fedtl.simulations.engine import descendants

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONNECTION = "fedtl-loopback"


def free_port() -> int:
    """Return a TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.cache
def app_snapshot() -> Path:
    """Return a frozen copy of the app folder `flwr run` ships (made once per session).

    The files git would commit (tracked, or untracked and not ignored), as `flwr run` bundles them. Sites
    approve the FAB of this copy and the runs ship it, so editing the checkout while a deployment test
    runs cannot change the app's hash under it.
    """
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    holder = Path(tempfile.mkdtemp(prefix="fedtl-app-"))
    atexit.register(shutil.rmtree, holder, ignore_errors=True)
    snapshot = holder / "fedtl"
    for name in filter(None, listed.split("\0")):
        source = REPO_ROOT / name
        if source.is_file():
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, snapshot / name)
    return snapshot


@functools.cache
def repository_fab() -> bytes:
    """Return the FAB `flwr run` ships from the app snapshot (built once per session)."""
    return build_fab(app_snapshot())


def kill_tree(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Send `sig` to `proc` and every process it started, by PID; reap `proc`."""
    pids = [proc.pid, *descendants(proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    deadline = time.time() + 30
    while survivors := [pid for pid in pids if _alive(pid)]:
        assert time.time() < deadline, f"processes {survivors} survived SIGKILL"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    """Return True while `pid` runs (a zombie waiting to be reaped has stopped running)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class Loopback:
    """One SuperLink with TLS and SuperNode authentication, and the SuperNodes of named sites."""

    root: Path
    port: int = field(default_factory=free_port)  # the public Fleet front: what sites dial
    control_port: int = field(default_factory=free_port)  # the SuperLink itself, on loopback: the operator's flwr
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.certs = generate_certificates(self.root / "certs")
        self.flwr_home = self.root / "flwr-home"
        self.flwr_home.mkdir(exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.control_port}"\nroot-certificates = "{self.certs.ca_cert}"\n'
        )
        self.env = {
            **os.environ,
            # PATH as the caller's (CI's lacks the venv): `fedtl server start` and `site start` find Flower's scripts.
            "PATH": os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if Path(p) != BIN),
            "FLWR_HOME": str(self.flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "OMP_NUM_THREADS": "1",
            "FLWR_LOG_LEVEL": "INFO",  # `fedtl` commands run earlier in the session set WARNING in os.environ
        }
        self.env.pop("FEDTL_SIMULATED_SITES", None)  # real sites only

    def _start(self, name: str, command: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")
        proc = subprocess.Popen(
            command, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True
        )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        """Return what process `name` wrote so far."""
        return (self.root / f"{name}.log").read_text(errors="replace")

    def start_superlink(self) -> None:
        """Start the SuperLink (TLS, SuperNode auth) and its Fleet front; wait until both accept connections."""
        self._start(
            "superlink",
            [
                str(BIN / "fedtl"), "server", "start",  # flower-superlink on loopback, the Fleet API outside
                "--certs", str(self.certs.ca_cert.parent),
                "--host", "127.0.0.1",
                "--port", str(self.port),
                "--control-port", str(self.control_port),
            ],
        )  # fmt: skip
        deadline = time.time() + 120
        for port in (self.control_port, self.port):
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1):
                        break
                except OSError:
                    assert self.procs["superlink"].poll() is None, self.log("superlink")
                    assert time.time() < deadline, f"port {port} not listening in 120 s:\n" + self.log("superlink")
                    time.sleep(0.3)

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run the `flwr` CLI against this SuperLink."""
        return subprocess.run(
            [str(BIN / "flwr"), *args], env=self.env, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT
        )

    def start_site(self, name: str, policy: Path, approve: bool = True) -> None:
        """Register a key pair for site `name`, approve the repository's app there, start its SuperNode."""
        if approve:  # what `fedtl site approve --policy POLICY REPO --yes` does, without a process per site
            approve_app(load_policy(policy).state_dir, repository_fab())
        ((key, pub),) = generate_supernode_keys(self.root / "keys", [name]).values()
        done = self.flwr("supernode", "register", str(pub), CONNECTION)
        assert done.returncode == 0, done.stdout + done.stderr
        self._start(
            name,
            [
                str(BIN / "fedtl"), "site", "start",
                "--policy", str(policy),
                "--superlink", f"127.0.0.1:{self.port}",
                "--root-certificates", str(self.certs.ca_cert),
                "--auth-key", str(key),
                "--port", str(free_port()),
            ],
        )  # fmt: skip

    def start_sites(self, policies: dict[str, Path], timeout: float = 120) -> None:
        """Start a SuperNode for every site and wait until the SuperLink sees them all online."""
        for name, policy in policies.items():
            self.start_site(name, policy)
        deadline = time.time() + timeout
        while self.online_nodes() < len(policies):
            first = next(iter(policies))
            assert time.time() < deadline, "SuperNodes did not come online:\n" + self.log(first)
            time.sleep(1)

    def run_keys(self, **keys: object) -> int:
        """Submit the app as a run with these run-config keys (`head_solver` -> `head-solver`); return its id."""
        return self.run(" ".join(f"{key.replace('_', '-')}={json.dumps(value)}" for key, value in keys.items()))

    def online_nodes(self) -> int:
        """Return how many SuperNodes the SuperLink sees online."""
        out = self.flwr("supernode", "ls", CONNECTION, "--format", "json")
        nodes = json.loads(out.stdout).get("nodes", []) if out.returncode == 0 else []
        return sum(1 for n in nodes if str(n.get("status", "")).lower() == "online")

    def run(self, run_config: str) -> int:
        """Submit the app in the repository as a run; return its run id."""
        out = self.flwr(
            "run", str(app_snapshot()), CONNECTION, "--format", "json", "--run-config", run_config, timeout=300
        )
        assert out.returncode == 0, out.stdout + out.stderr
        return int(json.loads(out.stdout)["run-id"])

    def status(self, run_id: int) -> str:
        """Return the run's status as `flwr ls` reports it (e.g. 'finished:completed')."""
        out = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        assert out.returncode == 0, out.stdout + out.stderr
        (run,) = json.loads(out.stdout)["runs"]
        return str(run["status"])

    def run_log(self, run_id: int, tail: int | None = 6000) -> str:
        """Return the tail of the run's ServerApp log (for failure messages; `tail` None: all of it)."""
        out = self.flwr("log", str(run_id), CONNECTION, "--show")
        text = out.stdout + out.stderr
        return text if tail is None else text[-tail:]

    def wait(self, run_id: int, timeout: float, poll: float = 2.0) -> str:
        """Wait until the run has finished, asking `flwr ls` every `poll` s (a process each); return its status."""
        deadline = time.time() + timeout
        while not (status := self.status(run_id)).startswith("finished"):
            assert time.time() < deadline, f"run {run_id} still {status} after {timeout:.0f} s"
            time.sleep(poll)
        return status

    def stop(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Stop process `name` and everything it started, by PID."""
        kill_tree(self.procs.pop(name), sig)

    def close(self) -> None:
        """Stop every process this deployment started: the sites first, then the SuperLink."""
        for name in [n for n in self.procs if n != "superlink"] + ["superlink"]:
            if name in self.procs:
                self.stop(name)
