"""The lab's baselines (simulations/baselines.py): each trains as a one-site run of the same config would."""

import contextlib
import io
import math

import numpy as np
import pytest

from fedtl.shared.config import RunConfig
from fedtl.shared.dp_heads import plan_dp_head
from fedtl.simulations import baselines as bl

SITES = 3
ROUNDS = 2


def test_the_lab_baselines_train_the_auto_plan_of_a_one_site_run(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTL_HOME", str(tmp_path / "home"))
    cfg = RunConfig(
        backbone="tiny", image_size=32, num_rounds=ROUNDS, target_epsilon=1.0, device="cpu", out=str(tmp_path)
    )
    lab = bl.load_lab_federation(cfg, SITES)
    x = np.concatenate([s.train_features for s in lab.sites])
    y = np.concatenate([s.train_labels for s in lab.sites])
    plan = bl.auto_plan(lab, len(y), 1.0)
    # Oracle: the plan of one site holding the pooled data, recomputed from its public count alone.
    assert plan == plan_dp_head(
        target_epsilon=1.0, target_delta=1e-5, site_sizes=[len(y)], feature_dim=32, num_classes=10, rounds=ROUNDS
    )
    central = bl.train_baseline_head(lab, x, y, target_epsilon=1.0, seed=0)
    assert central.head.kind == "projected" and tuple(central.head.projection.shape) == (plan.projection_dim, 32)
    assert central.epsilon == pytest.approx(plan.epsilon, rel=1e-9)  # a fresh one-site ledger lands on the plan
    site = lab.sites[0]
    lone = bl.auto_plan(lab, len(site.train_labels), 1.0)
    assert lone.mean_noise > plan.mean_noise  # a site alone divides its noise by its own count
    alone = bl.train_baseline_head(lab, site.train_features, site.train_labels, target_epsilon=1.0, seed=0)
    assert alone.head.projection.shape[0] == lone.projection_dim
    assert alone.epsilon == pytest.approx(lone.epsilon, rel=1e-9)
    exact = bl.train_baseline_head(lab, x, y, target_epsilon=None, seed=0)
    assert exact.head.kind == "projected" and math.isinf(exact.epsilon)
    # Another head solver: its configured DP-SGD head, as a one-site run of it would train.
    other = bl.load_lab_federation(cfg.replace(head_solver="dp-sgd"), SITES)
    assert bl.auto_plan(other, len(y), 1.0) is None
    assert bl.train_baseline_head(other, x, y, target_epsilon=1.0, seed=0).head.kind == "linear"


def test_only_the_baselines_asked_for_are_trained(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTL_HOME", str(tmp_path / "home"))
    cfg = RunConfig(backbone="tiny", image_size=32, num_rounds=ROUNDS, device="cpu", out=str(tmp_path))
    lab = bl.load_lab_federation(cfg, SITES)
    trained = []
    train = bl.train_baseline_head
    monkeypatch.setattr(bl, "train_baseline_head", lambda *a, **kw: trained.append(kw) or train(*a, **kw))
    scores = bl.run_baselines(lab, epsilons=[2.0, 4.0], seed=0, methods=[bl.MAJORITY, bl.CENTRAL_DP])
    assert [(s.method, s.target_epsilon) for s in scores] == [
        (bl.MAJORITY, math.inf),
        (bl.CENTRAL_DP, 2.0),
        (bl.CENTRAL_DP, 4.0),
    ]
    assert [kw["target_epsilon"] for kw in trained] == [2.0, 4.0]  # no central, no site alone


def test_a_sweep_without_the_local_baseline_says_negative_transfer_was_not_assessed(tmp_path, monkeypatch):
    from fedtl.cli.main import main

    spec = tmp_path / "spec.toml"
    spec.write_text(
        'name = "no-local"\ndata = "digits"\nbackbones = ["tiny"]\nepsilons = [3.0]\nsites = [3]\nseeds = [0]\n'
        'methods = ["fedavg"]\nbaselines = ["majority"]\n[config]\nnum-rounds = 2\nimage-size = 32\n'
    )
    monkeypatch.setenv("FEDTL_HOME", str(tmp_path / "home"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["sweep", str(spec), "--out", str(tmp_path / "out")]) == 0
    assert "negative transfer not assessed: no local-only baseline ran" in out.getvalue()
    assert "no negative transfer" not in out.getvalue()
    assert (
        not (tmp_path / "out" / "sites.csv").is_file() or "site-0" not in (tmp_path / "out" / "sites.csv").read_text()
    )
