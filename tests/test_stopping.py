"""Ctrl-C and SIGTERM stop a run on Flower's engine: the process exits, and Ray's processes with it."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fedtl.cli import EXIT_INTERRUPTED
from fedtl.simulations.engine import descendants

pytestmark = pytest.mark.slow  # whole federations on Flower's engine


def _wait(condition, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, what
        time.sleep(0.2)


@pytest.mark.parametrize(
    ("signum", "twice"),
    [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGINT, True)],
    ids=["SIGINT", "SIGTERM", "SIGINT-twice"],
)
def test_a_signal_stops_the_run_and_leaves_no_process(signum, twice, tmp_path):
    env = {**os.environ, "FEDTL_HOME": str(tmp_path / "home")}
    out = tmp_path / "runs"
    # DP-SGD with 20 local epochs: rounds long enough that the signal falls in the middle of the run.
    command = [sys.executable, "-m", "fedtl.cli.main", "simulate", "--backbone", "tiny", "--sites", "3"]
    command += ["--rounds", "6", "--set", "head-solver=dp-sgd", "--set", "local-epochs=20", "--out", str(out)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics = lambda: list(out.glob("*/metrics.jsonl"))  # noqa: E731
        _wait(
            lambda: metrics() and len(metrics()[0].read_text().splitlines()) >= 2 or proc.poll() is not None,
            300,
            "round 1 was not reached",
        )
        assert proc.poll() is None, "the run ended before the signal"
        ray = descendants(proc.pid)  # Ray's processes, the sites' actors among them
        assert len(ray) >= 3
        proc.send_signal(signum)
        if twice:  # "stops at once": Flower's threads, interrupted mid-wait, must not keep the process
            time.sleep(0.3)
            proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)  # before: still running 20 s after the signal, never exiting
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == EXIT_INTERRUPTED, err[-2000:]
    assert f"{signal.Signals(signum).name}: stopping the run" in err and "fedtl: interrupted" in err
    _wait(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in ray), 15, f"left running: {ray}")
    lines = [json.loads(line) for line in metrics()[0].read_text().splitlines()]  # what was written stays whole
    assert [line["round"] for line in lines] == list(range(len(lines))) and 2 <= len(lines) < 7
