"""Secure aggregation in whole federations (run_inprocess: the ServerApp logic and ClientApp handlers over
Flower messages) and a site's distributed-noise release through its one release path.

The charge of a securely summed release is the Skellam accountant's for the central noise, recorded with
the trust assumption (t honest of n sites) it holds under, and the site adds 1 / t of the noise; the server's
model is the one the exact sums give (non-private), and the summary and model card state the assumption.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from builders import crash_after_masking, round_settings
from safetensors.numpy import load_file

from fedtl.client.ledger import PrivacyLedger
from fedtl.client.policy import PolicyRefusal, SitePolicy
from fedtl.client.secagg import SessionPlan
from fedtl.client.secure_releases import _noised
from fedtl.client.site import Site
from fedtl.shared.config import RunConfig
from fedtl.shared.errors import ConfigError
from fedtl.shared.mechanisms import SECURE_FEATURE_SUM, SECURE_SUFFICIENT_STATS, SUFFICIENT_STATS
from fedtl.shared.secure_sum import IntegerRelease
from fedtl.simulations.inprocess import run_inprocess

FP = "0" * 64
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


def _site(tmp_path, min_honest_sites=None):
    policy = None
    if min_honest_sites is not None:
        policy = SitePolicy(
            site_name="site-0",
            data="digits",
            label_names=(),
            max_epsilon=8.0,
            delta=1e-5,
            min_noise_multiplier=0.0,
            max_rounds_per_run=10,
            allowed_backbones=None,
            state_dir=tmp_path / "state",
            cache_dir=tmp_path / "cache",
            secret_dir=tmp_path / "secret",
            min_honest_sites=min_honest_sites,
        )
    return Site(name="site-0", state_dir=tmp_path / "state", cache_dir=tmp_path / "cache", data="", policy=policy)


def _zeros(length, l2=1000.0, l1=50_000.0):
    return lambda: IntegerRelease(np.zeros(length, dtype=np.int64), l2, l1, 32, 0.9)


@pytest.mark.parametrize("honest", [1, 2, 5])
def test_a_site_is_charged_the_skellam_accountants_epsilon_and_adds_one_t_th_of_the_noise(tmp_path, honest):
    site = _site(tmp_path)
    settings = round_settings(FP, secure_aggregation=True, secagg_honest_sites=honest, target_epsilon=8.0)
    plan = SessionPlan("ab", "run-a", 1, 5, 3, honest, "sufficient-stats")
    out = _noised(site, settings, plan, SECURE_SUFFICIENT_STATS, 1, 2.0, _zeros(400_000), 10)
    (charge,) = site.ledger.charges()
    assert (charge.kind, charge.honest_sites, charge.num_sites) == ("secagg-sufficient-stats", honest, 5)
    assert (charge.noise_multiplier, charge.l2_sensitivity, charge.l1_sensitivity) == (2.0, 1000.0, 50_000.0)
    assert out.release.epsilon == pytest.approx(oracle_epsilon([charge]), rel=1e-12)
    assert out.release.epsilon == site.ledger.epsilon(delta=1e-5)
    # This site's share: Skellam of variance (2 x 1000)^2 / t, mean 0.
    assert out.values.var() == pytest.approx(4e6 / honest, rel=0.01) and abs(out.values.mean()) < 20
    # The record says what it was charged under, and a torn copy of it still counts as Skellam.
    line = site.ledger.path.read_text()
    assert line.index('"l2_sensitivity"') < line.index('"noise_multiplier"') and '"honest_sites": %d' % honest in line


def test_a_torn_skellam_record_is_never_counted_as_a_gaussian_step(tmp_path):
    site = _site(tmp_path)
    settings = round_settings(FP, secure_aggregation=True, secagg_honest_sites=5)
    plan = SessionPlan("ab", "run-a", 1, 5, 3, 5, "feature-sum")
    _noised(site, settings, plan, SECURE_FEATURE_SUM, 0, 3.0, _zeros(10, l2=4.0, l1=8.0), 10)
    whole = site.ledger.epsilon(delta=1e-5)
    text = site.ledger.path.read_text()
    # A crash during the append: the record is cut after its accounting fields, and the ledger's head (moved
    # only after the record is on disk) never counted it; for the site's first record there was no head yet.
    site.ledger.path.write_text(text[: text.index('"run_id"')])
    (site.ledger.path.parent / "secret" / "ledger.head").unlink()
    (torn,) = site.ledger.charges()
    assert torn.kind == "torn" and torn.l2_sensitivity == 4.0
    assert site.ledger.epsilon(delta=1e-5) == pytest.approx(whole, rel=1e-12)


def test_a_site_refuses_a_release_that_assumes_more_honest_sites_than_its_policy(tmp_path):
    site = _site(tmp_path, min_honest_sites=2)
    settings = round_settings(FP, secure_aggregation=True, secagg_honest_sites=3)
    with pytest.raises(
        PolicyRefusal, match="assumes 3 honest sites but the policy counts on at most min-honest-sites 2"
    ):
        site.policy.check_settings(settings, action="the has-backbone request")
    all_sites = round_settings(FP, secure_aggregation=True, secagg_honest_sites=0)
    with pytest.raises(PolicyRefusal, match="assumes all summed honest sites"):
        _site(tmp_path, min_honest_sites=1).policy.check_settings(all_sites, action="the has-backbone request")
    plan = SessionPlan("ab", "run-a", 1, 5, 3, 3, "sufficient-stats")
    with pytest.raises(PolicyRefusal, match="its noise share assumes 3 honest sites"):
        _noised(site, settings, plan, SECURE_SUFFICIENT_STATS, 1, 2.0, _zeros(10), 10)
    assert site.ledger.charges() == []  # refused before anything was charged


def test_secure_aggregation_needs_a_solver_whose_releases_it_covers():
    with pytest.raises(
        ConfigError, match='needs head-solver = "auto", "closed-form" or "secure-dp-sgd", got \'dp-sgd\''
    ):
        RunConfig(head_solver="dp-sgd", secure_aggregation=True)
    assert RunConfig(secure_aggregation=True).head_solver == "auto"  # auto plans secure DP-FedSGD under it
    with pytest.raises(ConfigError, match="`secagg-honest-sites` must be >= 0"):
        RunConfig(head_solver="closed-form", secure_aggregation=True, secagg_honest_sites=-1)


SMALL = {"backbone": "tiny", "image-size": 32, "head-solver": "closed-form", "federated-evaluation": False}


def _run(tmp_path, name, sites, **keys):
    cfg = RunConfig.from_mapping({**SMALL, "out": str(tmp_path), **keys})
    return run_inprocess(cfg, num_sites=sites, run_dir=tmp_path / name)


def _ledgers(summary):
    root = Path(summary["run-dir"]) / "sites"
    return {p.parents[1].name: PrivacyLedger(p).charges() for p in sorted(root.glob("*/privacy/ledger.jsonl"))}


def test_a_secure_closed_form_federation_charges_skellam_under_its_assumption_and_states_it(tmp_path):
    summary = _run(
        tmp_path, "secure", 4, **{"secure-aggregation": True, "secagg-honest-sites": 3, "target-epsilon": 3.0}
    )
    ledgers = _ledgers(summary)
    assert sorted(ledgers) == ["site-0", "site-1", "site-2", "site-3"]
    for name, charges in ledgers.items():
        assert [(c.kind, c.honest_sites, c.num_sites) for c in charges] == [
            ("secagg-feature-sum", 3, 4),
            ("secagg-sufficient-stats", 3, 4),
        ]
        assert summary["epsilon-per-site"][name] == pytest.approx(oracle_epsilon(charges), rel=1e-9)
        assert 2.9 < summary["epsilon-per-site"][name] <= 3.0 * (1 + 1e-6)  # the server's plan lands on the target
    trust = summary["secure-aggregation"]
    assert (trust["honest-sites"], trust["sites"], trust["sites-in-sum"], trust["threshold"]) == (3, 4, 4, 3)
    assert summary["trust-assumption"].startswith("each site's epsilon holds if at least 3 of the 4 sites")
    assert trust["epsilon-if-alone"] > summary["epsilon-max"]  # each site's own share is 1/3 of the noise
    card = (tmp_path / "secure" / "model.md").read_text()
    assert "## Trust assumption (secure aggregation)" in card and "at least 3 of the 4 sites" in card
    # Every site's sessions are over: only tombstones, no keys or seeds, are left on its disk.
    sessions = [json.loads(p.read_text()) for p in (tmp_path / "secure" / "sites").glob("*/secagg/*.json")]
    assert len(sessions) == 8 and all(s["stage"] == "done" and "sk1" not in s for s in sessions)


def test_without_noise_the_secure_sum_gives_the_plain_sums_model(tmp_path):
    # Non-private: exact sums, so the secure federation's head equals the plain one up to quantisation.
    plain = _run(tmp_path, "plain", 3, **{"non-private": True, "projection-dim": 16})
    secure = _run(tmp_path, "secure", 3, **{"non-private": True, "projection-dim": 16, "secure-aggregation": True})
    a, b = load_file(plain["model"]), load_file(secure["model"])
    for name in a:
        assert np.allclose(a[name], b[name], atol=2e-3, rtol=1e-3), name
    assert secure["final"]["central-accuracy"] == pytest.approx(plain["final"]["central-accuracy"], abs=0.01)
    kinds = {c.kind for charges in _ledgers(plain).values() for c in charges}
    assert SUFFICIENT_STATS.kind in kinds


def test_a_sweep_over_assumed_honest_sites_reports_each_beside_the_plain_closed_form(tmp_path, monkeypatch):
    import contextlib
    import csv
    import io

    from fedtl.cli.main import main

    spec = tmp_path / "spec.toml"
    spec.write_text(
        'name = "distrust"\ndata = "digits"\nbackbones = ["tiny"]\nepsilons = [4.0]\nsites = [3]\nseeds = [0]\n'
        'methods = ["closed-form", "secagg-t1", "secagg"]\nbaselines = ["majority"]\n'
        "[config]\nimage-size = 32\nfederated-evaluation = false\n"
    )
    monkeypatch.setenv("FEDTL_HOME", str(tmp_path / "home"))
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["sweep", str(spec), "--out", str(tmp_path / "out")]) == 0
    with open(tmp_path / "out" / "results.csv", newline="") as fh:
        methods = [row["method"] for row in csv.DictReader(fh)]
    assert {"closed-form", "secagg-t1", "secagg"} <= set(methods)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "**closed-form**" in report
    assert report.index("**secagg**") < report.index("**secagg-t1**")  # t = all sites, then t = 1, 2, ...


def test_sites_that_crash_mid_protocol_leave_the_sum_exact_and_are_named(tmp_path):
    cfg = RunConfig.from_mapping(
        {**SMALL, "out": str(tmp_path), "secure-aggregation": True, "secagg-honest-sites": 5, "target-epsilon": 4.0}
    )
    summary = run_inprocess(cfg, num_sites=6, run_dir=tmp_path / "crash", client_app=crash_after_masking)
    trust = summary["secure-aggregation"]
    assert (trust["sites"], trust["sites-in-sum"], trust["threshold"]) == (6, 5, 4)  # site-4's vector is in
    assert set(trust["dropped"]) == {"site-4", "site-5"}  # named from the stages they finished
    assert "secagg-masked-input" in trust["dropped"]["site-5"]
    assert "secagg-unmask" in trust["dropped"]["site-4"]
    ledgers = _ledgers(summary)
    assert "site-5" not in ledgers  # it crashed before paying for anything
    assert [c.kind for c in ledgers["site-4"]] == ["secagg-feature-sum", "secagg-sufficient-stats"]
    assert sorted(summary["epsilon-per-site"]) == ["site-0", "site-1", "site-2", "site-3", "site-4"]
    assert summary["final"]["central-accuracy"] > 0.3  # ten classes: the exact sum of five sites still solves
