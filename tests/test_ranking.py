"""`fedtl rank-backbones`: site scores (client/ranking.py), their aggregation (server/ranking.py), the lab wiring."""

import contextlib
import io
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from builders import round_settings
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from fedtl.cli.main import main
from fedtl.client.admin import init_policy
from fedtl.client.client_app import query
from fedtl.client.inputs import load_site_inputs
from fedtl.client.policy import load_policy
from fedtl.client.site import site_from_policy
from fedtl.client.transferability import hscore, logme_score
from fedtl.server.ranking import (
    MEDICAL_WARNING,
    CandidateScores,
    check_candidates,
    check_rank_reply,
    summarise_ranking,
    weighted_standard_error,
)
from fedtl.shared import constants as k
from fedtl.shared.backbones import backbone_state_dict, build_backbone, fingerprint_state_dict
from fedtl.shared.config import RunConfig
from fedtl.shared.errors import ConfigError
from fedtl.shared.heads import normalize_features
from fedtl.shared.protocol import encode
from fedtl.simulations.baselines import load_lab_federation

SITES = 2


@pytest.fixture(scope="module")
def ranked(tmp_path_factory):
    """`fedtl rank-backbones` over tiny and tiny_b (two fingerprints) at 2 simulated digits sites, in process."""
    out = tmp_path_factory.mktemp("rank-runs")
    with pytest.MonkeyPatch.context() as mp:
        home = tmp_path_factory.mktemp("rank-home")
        mp.setenv("FEDTL_HOME", str(home))
        argv = ["rank-backbones", "--backbones", "tiny,tiny_b", "--sites", str(SITES), "--data", "digits"]
        printed, logged = io.StringIO(), logging.StreamHandler(io.StringIO())
        logging.getLogger("fedtl.server.ranking").addHandler(logged)
        try:
            with contextlib.redirect_stdout(printed):
                assert main([*argv, "--out", str(out), "--seed", "1"]) == 0
        finally:
            logging.getLogger("fedtl.server.ranking").removeHandler(logged)
        (run_dir,) = out.iterdir()
        summary = json.loads((run_dir / "ranking.json").read_text())
        # Oracle: the same sites' features read the way the ClientApp reads them, scored here directly.
        lab = {
            name: load_lab_federation(RunConfig(backbone=name, data="digits", seed=1), SITES)
            for name in summary["candidates"]
        }
    return summary, run_dir, lab, printed.getvalue() + logged.stream.getvalue()


def test_each_site_score_is_the_estimator_on_its_normalised_training_features(ranked):
    summary, _, lab, _ = ranked
    for name, federation in lab.items():
        reported = summary["backbones"][name]["sites"]
        assert sorted(reported) == [s.name for s in federation.sites]
        for site in federation.sites:
            z = normalize_features(site.train_features).astype(np.float64)
            assert reported[site.name][k.NUM_EXAMPLES] == len(site.train_labels)
            assert reported[site.name][k.LOGME] == pytest.approx(logme_score(z, site.train_labels), abs=1e-9)
            assert reported[site.name][k.H_SCORE] == pytest.approx(hscore(z, site.train_labels), rel=1e-9)


def test_the_server_ranks_the_site_size_weighted_means(ranked):
    summary, _, _, _ = ranked
    assert summary["candidates"] == ["tiny", "tiny_b"]
    for name, b in summary["backbones"].items():
        sites = list(b["sites"].values())
        weights = [s[k.NUM_EXAMPLES] for s in sites]
        for est in (k.LOGME, k.H_SCORE):
            assert b[est] == pytest.approx(np.average([s[est] for s in sites], weights=weights), abs=1e-12)
        assert b[k.NUM_EXAMPLES] == sum(weights) and b["num-sites"] == SITES
    logme = {n: b[k.LOGME] for n, b in summary["backbones"].items()}
    assert summary["ranking"] == sorted(logme, key=logme.get, reverse=True)
    assert summary["recommended"] == summary["ranking"][0]
    margin = summary["margin"]
    assert margin["value"] == pytest.approx(logme[summary["ranking"][0]] - logme[summary["ranking"][1]], abs=1e-12)
    assert MEDICAL_WARNING in summary["warnings"]


def test_the_report_says_what_the_scores_reveal(ranked):
    summary, run_dir, _, printed = ranked
    assert f"recommended: {summary['recommended']}" in printed
    assert printed.count("2405.20420") == 1  # the warning once: logged as the server ranks, not again in the table
    assert f"{len(summary['warnings'])} warning(s), logged above and kept in ranking.md" in printed
    assert str(run_dir / "ranking.md") in printed
    report = (run_dir / "ranking.md").read_text()
    assert f"**Recommended: {summary['recommended']}.**" in report
    assert "## What the scores reveal" in report and "NOT differentially private" in report
    assert "arXiv 2405.20420" in report and "site-size-weighted standard error" in report
    for name in ("site-0", "site-1"):
        assert f"| {name} |" in report


def _site_query(policy_path: Path, fingerprint: str, backbone: str = "tiny") -> Message:
    settings = round_settings(fingerprint, backbone_name=backbone)
    config = ConfigRecord({**encode(settings), k.ACTION: k.ACTION_RANK})
    msg = Message(content=RecordDict({k.CONFIG: config}), dst_node_id=5, message_type=MessageType.QUERY)
    context = Context(run_id=1, node_id=5, node_config={"policy": str(policy_path)}, state=RecordDict(), run_config={})
    return query(msg, context)


def test_a_real_site_releases_scores_only_where_its_policy_allows(tmp_path, flower_identity, caplog):
    policy_path = init_policy(
        tmp_path / "site.toml", site_name="hospital-a", data="digits", backbones=["tiny"], label_names=[]
    )
    state = backbone_state_dict(build_backbone("tiny"))
    fingerprint = fingerprint_state_dict(state)
    site = site_from_policy(load_policy(policy_path))
    site.backbones.install("tiny", fingerprint, state)
    refused = _site_query(policy_path, fingerprint).content.config_records[k.SITE]
    assert refused[k.REFUSAL_CODE] == "policy"
    assert "does not release transferability scores" in refused[k.REFUSED]
    text = policy_path.read_text()
    policy_path.write_text(text.replace("release-evaluation-metrics = false", "release-evaluation-metrics = true"))
    tiny_b = fingerprint_state_dict(backbone_state_dict(build_backbone("tiny_b")))
    other = _site_query(policy_path, tiny_b, "tiny_b").content.config_records[k.SITE]
    assert "refuses backbone tiny_b" in other[k.REFUSED]  # the policy's allow-list applies as to any message
    with caplog.at_level(logging.WARNING, logger="fedtl.client.ranking"):
        reply = _site_query(policy_path, fingerprint)
    metrics = reply.content.metric_records[k.METRICS]
    assert set(metrics) == {k.NUM_EXAMPLES, k.LOGME, k.H_SCORE}
    feats = load_site_inputs(site, round_settings(fingerprint), progress=False)
    z = normalize_features(feats.train_x).astype(np.float64)
    assert metrics[k.LOGME] == pytest.approx(logme_score(z, feats.train_y), abs=1e-9)
    assert metrics[k.NUM_EXAMPLES] == len(feats.train_y)
    assert "hospital-a releases transferability scores" in caplog.text and "WITHOUT differential privacy" in caplog.text


def test_weighted_standard_error_against_the_unweighted_formula():
    values = np.array([0.3, -0.1, 0.5, 0.2])
    expected = np.std(values, ddof=1) / math.sqrt(len(values))
    assert weighted_standard_error(values, np.ones(4)) == pytest.approx(expected, rel=1e-12)
    weights = np.array([10.0, 200.0, 35.0, 80.0])
    assert weighted_standard_error(values, 7 * weights) == pytest.approx(weighted_standard_error(values, weights))
    # A site with (almost) all the weight leaves (almost) nothing to average: the error shrinks toward 0.
    assert weighted_standard_error(values, np.array([1e-9, 1e-9, 1.0, 1e-9])) < 1e-6
    assert math.isnan(weighted_standard_error(values[:1], weights[:1]))


def _candidate(name: str, logme: dict[str, float], hs: float = 1.0, n: int = 100) -> CandidateScores:
    sites = {s: {k.NUM_EXAMPLES: float(n), k.LOGME: v, k.H_SCORE: hs} for s, v in logme.items()}
    return CandidateScores(name, f"{name}-fp", 32, 32, sites=sites)


def _summary(*candidates: CandidateScores, tmp_path: Path) -> dict:
    return summarise_ranking(RunConfig(backbone="tiny"), list(candidates), ranking_id="r", run_dir=tmp_path)


def test_a_lead_beyond_the_noise_is_not_flagged_and_one_within_it_is(tmp_path):
    clear = _summary(
        _candidate("a", {"s0": 1.0, "s1": 1.1, "s2": 0.9}),
        _candidate("b", {"s0": 0.5, "s1": 0.62, "s2": 0.41}),
        tmp_path=tmp_path,
    )
    assert clear["recommended"] == "a" and not clear["margin"]["within-noise"]
    assert clear["warnings"] == [MEDICAL_WARNING]
    # Same means apart, but the per-site differences disagree in sign: within noise.
    noisy = _summary(
        _candidate("a", {"s0": 1.0, "s1": 1.1, "s2": 0.9}),
        _candidate("b", {"s0": 1.6, "s1": 0.5, "s2": 0.7}),
        tmp_path=tmp_path,
    )
    assert noisy["recommended"] == "a" and noisy["margin"]["within-noise"]
    assert any("lead over b" in w and "within noise" in w and "3 sites" in w for w in noisy["warnings"])
    lone = _summary(_candidate("a", {"s0": 2.0}), _candidate("b", {"s0": 1.0}), tmp_path=tmp_path)
    assert lone["margin"]["within-noise"] and any("cannot be estimated" in w for w in lone["warnings"])


def test_disagreeing_estimators_and_different_site_sets_are_flagged(tmp_path):
    summary = _summary(
        _candidate("a", {"s0": 1.0, "s1": 1.1, "s2": 0.9}, hs=1.0),
        _candidate("b", {"s0": 0.5, "s1": 0.6}, hs=3.0),
        tmp_path=tmp_path,
    )
    assert summary["ranking-by"][k.H_SCORE] == ["b", "a"]
    assert "h-score ranks b first where logme ranks a first" in summary["warnings"]
    assert any("different sets of sites" in w and "b: ['s0', 's1']" in w for w in summary["warnings"])
    assert summary["margin"]["num-sites"] == 2  # paired over the sites that scored both


def test_malformed_rank_replies_and_candidates_are_named(flower_identity):
    def reply(**metrics):
        content = RecordDict({k.METRICS: MetricRecord(metrics)})
        return Message(content=content, dst_node_id=1, message_type=MessageType.QUERY)

    good = {k.NUM_EXAMPLES: 40, k.LOGME: -0.5, k.H_SCORE: 2.0}
    assert check_rank_reply(reply(**good)) is None
    assert "must be exactly ['h-score', 'logme', 'num-examples'], got ['h-score', 'logme', 'num-examples', 'x']" in (
        check_rank_reply(reply(**good, x=1.0))
    )
    assert "must be finite numbers" in check_rank_reply(reply(**{**good, k.LOGME: math.nan}))
    assert "`num-examples` must be a whole number >= 2, got 1" in check_rank_reply(reply(**{**good, k.NUM_EXAMPLES: 1}))
    with pytest.raises(ConfigError, match=r"at least 2 candidates to rank, got \['tiny'\]"):
        check_candidates(["tiny"])
    with pytest.raises(ConfigError, match=r"names \['tiny'\] more than once"):
        check_candidates(["tiny", "tiny_b", "tiny"])
    with pytest.raises(ConfigError, match=r"`backbones`: unknown backbone 'resnet9000'; known backbones: "):
        check_candidates(["tiny", "resnet9000"])
