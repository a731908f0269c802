"""A real federation on Flower's Deployment Engine over loopback: SuperLink with TLS and SuperNode
authentication, three SuperNodes started with `fedtl site start`, each site on its own data format
(image folder, CSV manifest of PNGs, DICOM files with a manifest) and its own policy and ledger.

Run A: one site's policy refuses the run's epsilon; the other two train and the model is exported.
Run B: one site is SIGKILLed mid-round; the run goes on with the other two, is stopped with
`flwr stop` after a checkpoint, and `resume` finishes it. Every ledger is checked against an
independent recomputation of epsilon.
"""

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from loopback import Loopback
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from safetensors import safe_open
from site_files import save_png, write_csv, write_dicom

from fedtl.client.admin import init_policy
from fedtl.client.ledger import PrivacyLedger
from fedtl.client.policy import load_policy
from fedtl.client.site import site_from_policy
from fedtl.shared import mechanisms
from fedtl.shared.data import load_dataset
from fedtl.shared.loaders import load_site_dataset
from fedtl.shared.partitioners import partition_indices

pytestmark = pytest.mark.slow  # real SuperLink and SuperNodes on loopback: minutes

DP_SGD = mechanisms.DP_SGD.kind
FEATURE_SUM = mechanisms.FEATURE_SUM.kind
EVALUATION = mechanisms.EVALUATION.kind

ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
SITES = ("site-1", "site-2", "site-3")


def oracle_epsilon(charges, delta: float = 1e-5) -> float:
    """Epsilon of a ledger's accounted records from Opacus' pure RDP analysis (not the accountant class fedtl uses)."""
    charges = [c for c in charges if c.accounted]  # noise-free releases are counted by quotas, not by epsilon
    if any(c.noise_multiplier == 0 for c in charges):
        return math.inf
    rdp = sum(
        compute_rdp(q=c.sample_rate, noise_multiplier=c.noise_multiplier, steps=c.steps, orders=ORDERS) for c in charges
    )
    return float(get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)[0])


def _write_sites(root: Path) -> dict[str, Path]:
    """Split the digits training pool over three sites, each in another real format; return their policies."""
    train = load_dataset("digits", seed=0).train  # the server keeps digits' held-out split for itself
    parts = partition_indices(train.labels, 3, scheme="iid", seed=0)
    rng = np.random.default_rng(0)
    policies = {}
    for name, idx in zip(SITES, parts):
        site = root / name
        rows = []
        for i in idx:
            image, label = train.images[i], str(train.labels[i])
            split = "test" if rng.random() < 0.25 else "train"
            if name == "site-1":  # class-per-sub-folder image folder, split by the loader
                save_png(site / "images" / label / f"{i}.png", image)
            elif name == "site-2":  # CSV manifest of PNG files
                rows.append([str(save_png(site / "png" / f"{i}.png", image).relative_to(site)), label, split])
            else:  # 16-bit DICOM with a window, labels from a manifest
                stored = image.astype(np.uint16) * 16
                path = write_dicom(site / "dicom" / f"{i}.dcm", stored, window=(2040.0, 4081.0))
                rows.append([str(path.relative_to(site)), label, split])
        data = {"site-1": "images", "site-2": "manifest.csv", "site-3": "manifest.csv"}[name]
        if rows:
            write_csv(site / "manifest.csv", rows, header=("path", "label", "split"))
        policy = init_policy(site / "policy.toml", site_name=name, data=data, backbones=["tiny"], label_names=[])
        text = policy.read_text()
        if name != "site-2":  # site-2 keeps its evaluation metrics local (the template's default)
            text = text.replace("release-evaluation-metrics = false", "release-evaluation-metrics = true")
        if name == "site-3":
            text = text.replace("max-epsilon = 24.0", "max-epsilon = 5.0")
        policy.write_text(text)
        policies[name] = policy
    return policies


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("loopback")
    policies = _write_sites(root)
    net = Loopback(root / "flower")
    try:
        net.start_superlink()
        for name in SITES:
            net.start_site(name, policies[name])
        deadline = time.time() + 120
        while net.online_nodes() < 3:
            assert time.time() < deadline, "SuperNodes did not come online:\n" + net.log("site-1")
            time.sleep(1)
        yield net, root, policies
    finally:
        net.close()


def _ledger(root: Path, name: str) -> PrivacyLedger:
    return site_from_policy(load_policy(root / name / "policy.toml")).ledger  # keyed from the policy's secret-dir


def _run_dir(out: Path, name: str) -> Path:
    (run_dir,) = [p for p in out.iterdir() if f"-{name}-" in p.name]
    return run_dir


def _run_config(out: Path, **values) -> str:
    # DP-SGD as configured: these runs check the configured noise and rounds in every ledger.
    base = dict(backbone="tiny", data="digits", out=str(out), local_epochs=1, min_available_nodes=3, min_train_sites=2)
    base["head_solver"] = "dp-sgd"
    base.update(values)
    return " ".join(f"{k.replace('_', '-')}={json.dumps(v)}" for k, v in base.items())


def test_the_sites_data_formats_are_real_and_valid(deployment):
    _, root, _ = deployment
    formats = {
        name: load_site_dataset(root / name / data, label_names=[str(d) for d in range(10)]).report.format
        for name, data in (("site-1", "images"), ("site-2", "manifest.csv"), ("site-3", "manifest.csv"))
    }
    assert formats == {"site-1": "folder", "site-2": "csv", "site-3": "dicom"}


def test_a_site_refuses_a_run_beyond_its_policy_while_the_others_train(deployment):
    net, root, _ = deployment
    out = root / "runs"
    run_id = net.run(
        _run_config(
            out,
            num_rounds=2,
            target_epsilon=6.0,
            noise_multiplier=2.0,
            local_epochs=2,
            run_name="policy",
            round_timeout=300.0,
        )
    )
    assert net.wait(run_id, timeout=600) == "finished:completed", net.run_log(run_id)
    run_dir = _run_dir(out, "policy")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sites"] == ["site-1", "site-2"]
    (refusal,) = summary["refused-sites"]
    assert refusal.startswith("site-3: [policy] site site-3 refuses the has-backbone request") and (
        "the run asks target-epsilon 6 but the policy allows at most max-epsilon 5" in refusal
    )
    assert not _ledger(root, "site-3").path.exists()  # refused before anything was charged
    with safe_open(str(run_dir / "model.safetensors"), framework="numpy") as fh:
        assert set(fh.keys()) == {"center", "layers.0.weight", "layers.0.bias"}
    for name in ("site-1", "site-2"):
        charges = _ledger(root, name).charges()
        assert [(c.kind, c.server_round) for c in charges if c.accounted] == [
            (FEATURE_SUM, 0),
            (DP_SGD, 1),
            (DP_SGD, 2),
        ]
        # site-1 releases evaluation metrics: each one is recorded (no epsilon) and counted against its quotas.
        released = [c.server_round for c in charges if c.kind == EVALUATION]
        assert (released == [1, 2]) if name == "site-1" else not released
        assert {c.noise_multiplier for c in charges if c.kind == DP_SGD} == {2.0}
        assert summary["epsilon-per-site"][name] == pytest.approx(oracle_epsilon(charges), rel=1e-9)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 1, 2]
    assert set(lines[-1]["sites"]["site-1"]) == {"train", "evaluate"}
    assert set(lines[-1]["sites"]["site-2"]) == {"train"}  # its policy keeps evaluation metrics local
    # Two private rounds of a tiny random backbone: the server's held-out accuracy rises clearly above its start.
    assert lines[-1]["central"]["accuracy"] > lines[0]["central"]["accuracy"] + 0.1


def _checkpoint_round(run_dir: Path) -> int:
    path = run_dir / "checkpoint.safetensors"
    if not path.is_file():
        return -1
    with safe_open(str(path), framework="numpy") as fh:
        return int(fh.metadata()["server-round"])


def test_a_killed_site_a_stopped_run_and_its_resumption(deployment):
    net, root, _ = deployment
    out = root / "runs"
    before = {name: len(_ledger(root, name).charges()) for name in SITES}
    config = _run_config(out, num_rounds=4, target_epsilon=5.0, noise_multiplier=2.0, run_name="kill")
    run_id = net.run(config + " round-timeout=300.0")
    # Kill site-1 (SuperNode and its ClientApp processes) once its round-2 charge is on disk: mid-round.
    deadline = time.time() + 600
    while not [c for c in _ledger(root, "site-1").charges()[before["site-1"] :] if c.server_round == 2]:
        assert time.time() < deadline and net.status(run_id).startswith(("pending", "starting", "running"))
        time.sleep(0.2)
    net.stop("site-1")
    run_dir = _run_dir(out, "kill")
    while _checkpoint_round(run_dir) < 3:  # rounds 2 and 3 go on without site-1 (min-train-sites = 2)
        assert time.time() < deadline and net.status(run_id).startswith("running"), net.log("superlink")[-3000:]
        time.sleep(0.5)
    stopped = net.flwr("stop", str(run_id), "fedtl-loopback")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert net.wait(run_id, timeout=120) == "finished:stopped"
    assert not (run_dir / "summary.json").exists()

    # Operational keys are given again on resume; site-1 stays down, so two sites are enough to go on.
    resumed = net.run(f"resume={json.dumps(str(run_dir))} min-available-nodes=2 min-train-sites=2 round-timeout=300.0")
    assert net.wait(resumed, timeout=600) == "finished:completed", net.run_log(resumed)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed-after-round"] >= 3 and summary["run-id"] == run_dir.name
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 1, 2, 3, 4]  # each round once, across the stop
    assert set(lines[2]["sites"]) >= {"site-2", "site-3"}
    assert set(lines[3]["sites"]) == {"site-2", "site-3"}  # site-1 is down from then on
    # Wherever site-1's missing update was noticed, it is logged by its name, with the reason: killed before its
    # reply, or while uploading it (Flower then finds the reply's objects missing). On a busy machine its round-2
    # reply may have left before the kill; then round 2 counts it and no update of site-1 went missing.
    lost = [r for r in summary["rejected-replies"] if r["site"] == "site-1"]
    gone = ("Node Unavailable", "no reply", "Reply message objects are unavailable")
    assert all(any(g in r["reason"] for g in gone) for r in lost), lost
    assert lost or "site-1" in lines[2]["sites"], (summary["rejected-replies"], lines[2]["sites"])

    # site-1's ledger: the killed round's charge is there (written before training), nothing torn.
    mine = [c for c in _ledger(root, "site-1").charges()[before["site-1"] :] if c.accounted]
    assert [(c.kind, c.server_round) for c in mine] == [(FEATURE_SUM, 0), (DP_SGD, 1), (DP_SGD, 2)]
    assert all(c.run_id == run_dir.name for c in mine)
    for name in SITES:
        charges = _ledger(root, name).charges()
        assert all(c.kind in (FEATURE_SUM, DP_SGD, EVALUATION) for c in charges)
        assert _ledger(root, name).epsilon(delta=1e-5) == pytest.approx(oracle_epsilon(charges), rel=1e-9)
    for name in ("site-2", "site-3"):  # they trained to the end: the server reports what their ledgers say
        charges = _ledger(root, name).charges()
        rounds = [c.server_round for c in charges[before[name] :] if c.kind == DP_SGD]
        assert set(rounds) == {1, 2, 3, 4}  # a round redone after the stop is charged again: pessimistic
        assert summary["epsilon-per-site"][name] == pytest.approx(oracle_epsilon(charges), rel=1e-9)
        assert summary["epsilon-per-site"][name] <= 5.0
