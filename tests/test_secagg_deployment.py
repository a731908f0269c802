"""Secure aggregation on Flower's Deployment Engine over loopback: a SuperLink with TLS and SuperNode
authentication, three SuperNodes started with `fedtl site start` (a fresh ClientApp process per message, so
every stage's state crosses processes on the site's disk), a closed-form run with `secure-aggregation = true`.
"""

import json
import math
import stat
from pathlib import Path

import numpy as np
import pytest
from loopback import Loopback
from site_files import save_png

from fedtl.client.admin import init_policy
from fedtl.client.ledger import PrivacyLedger
from fedtl.client.policy import load_policy
from fedtl.shared.data import load_dataset
from fedtl.shared.partitioners import partition_indices

SITES = ("site-1", "site-2", "site-3")
ORDERS = list(range(2, 64)) + [64, 80, 96, 112, 128, 160, 192, 256, 384, 512, 768, 1024]


def oracle_epsilon(charges, delta=1e-5):
    """Agarwal et al. 2021 Thm 3.5 for each Skellam charge, composed, converted (Balle et al. 2020)."""
    best = math.inf
    for a in ORDERS:
        rdp = 0.0
        for c in charges:
            d2, d1, mu = c.l2_sensitivity, c.l1_sensitivity, (c.noise_multiplier * c.l2_sensitivity) ** 2
            rdp += a * d2**2 / (2 * mu) + min(((2 * a - 1) * d2**2 + 6 * d1) / (4 * mu**2), 3 * d1 / (2 * mu))
        best = min(best, rdp + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1))
    return best


def write_sites(root: Path, sites: tuple[str, ...] = SITES) -> dict[str, Path]:
    """Split digits' training pool over image-folder sites whose policies count on all of them being honest."""
    train = load_dataset("digits", seed=0).train
    parts = partition_indices(train.labels, len(sites), scheme="iid", seed=0)
    policies = {}
    for name, idx in zip(sites, parts):
        for i in idx:
            save_png(root / name / "images" / str(train.labels[i]) / f"{i}.png", train.images[i])
        policy = init_policy(
            root / name / "policy.toml", site_name=name, data="images", backbones=["tiny"], label_names=[]
        )
        policy.write_text(policy.read_text().replace("min-honest-sites = 1", f"min-honest-sites = {len(sites)}"))
        policies[name] = policy
    return policies


@pytest.mark.slow
def test_a_secure_closed_form_run_over_tls_sums_what_the_sites_release_and_states_its_trust(tmp_path):
    policies = write_sites(tmp_path)
    net = Loopback(tmp_path / "flower")
    try:
        net.start_superlink()
        net.start_sites({name: policies[name] for name in SITES})
        out = tmp_path / "runs"
        keys = {
            "backbone": "tiny",
            "data": "digits",
            "out": str(out),
            "min-available-nodes": 3,
            "head-solver": "closed-form",
            "secure-aggregation": True,
            "target-epsilon": 4.0,
            "run-name": "secure",
            "round-timeout": 300.0,
        }
        run_id = net.run(" ".join(f"{key}={json.dumps(value)}" for key, value in keys.items()))
        assert net.wait(run_id, timeout=600) == "finished:completed", net.run_log(run_id)
    finally:
        net.close()
    (run_dir,) = [p for p in out.iterdir() if "-secure-" in p.name]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sites"] == list(SITES)
    assert summary["secure-aggregation"]["honest-sites"] == 3 and summary["secure-aggregation"]["sites-in-sum"] == 3
    assert "at least 3 of the 3 sites" in summary["trust-assumption"]
    assert "## Trust assumption (secure aggregation)" in (run_dir / "model.md").read_text()
    # Ten classes from a closed form on a tiny random backbone: clearly above chance (0.1).
    assert summary["final"]["central-accuracy"] > 0.3
    for name in SITES:
        state = tmp_path / name / "state"
        secret = load_policy(policies[name]).secret_dir  # the ledger is keyed from the policy's secret-dir
        charges = PrivacyLedger(state / "privacy" / "ledger.jsonl", secret_dir=secret).charges()
        assert [(c.kind, c.honest_sites, c.num_sites) for c in charges] == [
            ("secagg-feature-sum", 3, 3),
            ("secagg-sufficient-stats", 3, 3),
        ]
        assert summary["epsilon-per-site"][name] == pytest.approx(oracle_epsilon(charges), rel=1e-9)
        assert summary["epsilon-per-site"][name] <= 4.0 * (1 + 1e-6)
        # Each secure sum's state crossed processes in a 0600 file, and only its tombstone is left.
        files = sorted((state / "secagg").glob("*.json"))
        assert len(files) == 2 and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
        assert all(json.loads(p.read_text())["stage"] == "done" and "sk1" not in p.read_text() for p in files)
    assert np.isfinite(summary["epsilon-max"])
