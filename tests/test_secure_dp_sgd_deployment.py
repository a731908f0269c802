"""Secure DP-SGD (head-solver "secure-dp-sgd") on Flower's Deployment Engine over loopback: a SuperLink with TLS
and SuperNode authentication, two SuperNodes started with `fedtl site start` (a fresh ClientApp process per
message, so each of the 50 steps' four secure-sum stages crosses processes on the site's disk), sites with real
policies and keyed ledgers.

Opt-in: FEDTL_SLOW_DEPLOYMENT=1. The run is 50 secure sums of four query stages each, 400 ClientApp processes
(each imports torch, Opacus and Flower): 61 min on 2 shared cores, far beyond the default suite (README,
secure DP-SGD).
"""

import json
import os
import re
import stat
import time
from pathlib import Path

import numpy as np
import pytest
from loopback import Loopback
from safetensors.numpy import load_file
from test_secagg_deployment import oracle_epsilon, write_sites

from fedtl.client.ledger import PrivacyLedger
from fedtl.client.policy import load_policy

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("FEDTL_SLOW_DEPLOYMENT") != "1",
        reason="opt-in: FEDTL_SLOW_DEPLOYMENT=1 runs secure DP-SGD's 50 steps x 4 secure-sum stages on a real "
        "loopback deployment (400 ClientApp processes; about an hour on 2 shared cores)",
    ),
]

SITES = ("site-1", "site-2")
STEPS = 50  # shared/dp_heads.STEPS: the plan's full-batch steps, 2 rounds of 25
RUN_FILES = {"config.json", "metrics.jsonl", "checkpoint.safetensors", "model.safetensors", "model.md", "summary.json"}
MODEL_TENSORS = {"layers.0.weight", "layers.0.bias", "projection", "center"}  # the head and its public buffers
NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
VECTOR = re.compile(rf"(?:{NUMBER}[,;\s]+){{12,}}{NUMBER}")  # 13+ numbers in a row: a dumped vector


def assert_no_site_vector(run_dir: Path, logs: dict[str, str], gradient_entries: int) -> None:
    """The server's stored files and logs hold the head, public buffers and per-site scalars, never a vector.

    What the server may keep per site is scalar (epsilon, delta, example count); a site's gradient, its masked or
    noised release, or a share of it, has `gradient_entries` (or more) entries and would show up as an array.
    """
    assert {p.name for p in run_dir.rglob("*") if p.is_file()} <= RUN_FILES
    for name in ("model.safetensors", "checkpoint.safetensors"):
        if (run_dir / name).exists():
            tensors = load_file(run_dir / name)
            assert set(tensors) <= MODEL_TENSORS, sorted(tensors)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines] + [json.loads((run_dir / "summary.json").read_text())]

    def walk(value, path):  # type: ignore[no-untyped-def]
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(inner, f"{path}/{key}")
        elif isinstance(value, list):
            numbers = [v for v in value if isinstance(v, int | float) and not isinstance(v, bool)]
            assert len(numbers) < gradient_entries, f"{path} holds {len(numbers)} numbers"
            for inner in value:
                walk(inner, path)

    for record in records:
        walk(record, run_dir.name)
    for source, text in logs.items():
        dumped = VECTOR.search(text)
        assert dumped is None, f"{source} logs a vector: {dumped.group(0)[:200]}"


def test_secure_dp_sgd_over_tls_charges_every_step_to_each_ledger_and_keeps_each_site_s_gradient_private(tmp_path):
    policies = write_sites(tmp_path, SITES)
    net = Loopback(tmp_path / "flower")
    started = time.time()
    try:
        net.start_superlink()
        net.start_sites({name: policies[name] for name in SITES})
        out = tmp_path / "runs"
        run_id = net.run_keys(
            backbone="tiny",
            data="digits",
            out=str(out),
            min_available_nodes=len(SITES),
            head_solver="secure-dp-sgd",
            target_epsilon=4.0,
            num_rounds=2,
            run_name="secure-sgd",
            round_timeout=300.0,
        )
        # Polled every 20 s: each `flwr ls` is a Python process, a real share of 2 cores over a long run.
        assert net.wait(run_id, timeout=3600, poll=20) == "finished:completed", net.run_log(run_id)
        logs = {"ServerApp": net.run_log(run_id, tail=None), "SuperLink": net.log("superlink")}
    finally:
        net.close()
    print(f"secure DP-SGD deployment: {len(SITES)} sites, {STEPS} steps in {time.time() - started:.0f} s")
    (run_dir,) = [p for p in out.iterdir() if "-secure-sgd-" in p.name]
    summary = json.loads((run_dir / "summary.json").read_text())
    plan = json.loads((run_dir / "config.json").read_text())["head-plan"]
    assert plan["steps"] == STEPS and plan["sample-rate"] == 1.0
    assert summary["sites"] == list(SITES)
    trust = summary["secure-aggregation"]
    assert (trust["honest-sites"], trust["sites"], trust["sites-in-sum"], trust["steps"]) == (2, 2, 2, STEPS)
    assert summary["trust-assumption"].startswith("each site's epsilon holds if at least 2 of the 2 sites")
    assert "## Trust assumption (secure aggregation)" in (run_dir / "model.md").read_text()
    assert summary["final"]["central-accuracy"] > 0.2  # ten classes, a tiny random backbone
    for name in SITES:
        state = tmp_path / name / "state"
        secret = load_policy(policies[name]).secret_dir  # the ledger is keyed from the policy's secret-dir
        charges = PrivacyLedger(state / "privacy" / "ledger.jsonl", secret_dir=secret).charges()
        assert [c.kind for c in charges] == ["secagg-head-gradient"] * STEPS
        assert [c.server_round for c in charges] == list(range(1, STEPS + 1))
        assert {(c.honest_sites, c.num_sites, c.sample_rate) for c in charges} == {(2, 2, 1.0)}
        assert summary["epsilon-per-site"][name] == pytest.approx(oracle_epsilon(charges), rel=1e-9)
        assert 3.5 < summary["epsilon-per-site"][name] <= 4.0 * (1 + 1e-6)
        # Each step's secure sum crossed processes in a 0600 file, and only its tombstone is left.
        files = sorted((state / "secagg").glob("*.json"))
        assert len(files) == STEPS and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
        assert all(json.loads(p.read_text())["stage"] == "done" and "sk1" not in p.read_text() for p in files)
    assert np.isfinite(summary["epsilon-max"]) and "fedtl" in logs["ServerApp"]
    assert_no_site_vector(run_dir, logs, gradient_entries=10 * (plan["projection-dim"] + 1))
