"""Quotas on noise-free releases and DP-SGD rounds (client/quotas.py), and `fedtl site ledger verify|adopt`."""

import json
import os
import re
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from builders import round_settings
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fedtl.cli.main import main
from fedtl.client.admin import init_policy
from fedtl.client.client_app import evaluate, numpy_to_arrays
from fedtl.client.ledger import PrivacyCharge, noise_free_charge
from fedtl.client.policy import PolicyRefusal, load_policy
from fedtl.client.quotas import check_noise_free_quota, check_rounds_per_day
from fedtl.client.release import ReleaseRequest, charge_release
from fedtl.client.secagg import SessionPlan
from fedtl.client.secure_releases import HEAD_GRADIENT, secure_release
from fedtl.client.site import Site, site_from_policy
from fedtl.client.solvers.dp_sgd import train_round
from fedtl.shared import constants as k
from fedtl.shared.backbones import backbone_state_dict, build_backbone, fingerprint_state_dict
from fedtl.shared.errors import ConfigError
from fedtl.shared.heads import build_head, head_arrays
from fedtl.shared.mechanisms import EVALUATION
from fedtl.shared.protocol import SimulationSettings, encode

TINY = fingerprint_state_dict(backbone_state_dict(build_backbone("tiny")))
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # Opacus' defaults, written out


def _oracle_epsilon(stretches, delta=1e-5) -> float:
    """Epsilon from Opacus' pure RDP analysis, not through the accountant classes fedtl or `verify` use."""
    rdp = sum(compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=ORDERS) for sigma, q, steps in stretches)
    return float(get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)[0])


def _policy(tmp_path, **privacy) -> object:
    path = init_policy(
        tmp_path / "site.toml", site_name="hospital-a", data="digits", backbones=["tiny"], label_names=[]
    )
    text = path.read_text().replace("release-evaluation-metrics = false", "release-evaluation-metrics = true")
    for key, value in privacy.items():
        text, count = re.subn(rf"^{key} = .*$", f"{key} = {value}", text, flags=re.M)
        assert count == 1, key
    path.write_text(text)
    site_from_policy(load_policy(path)).backbones.install("tiny", TINY, backbone_state_dict(build_backbone("tiny")))
    return path


def _evaluate(policy_path, server_round: int, **changes) -> ConfigRecord:
    config = ConfigRecord({**encode(round_settings(TINY, **changes)), k.SERVER_ROUND: server_round})
    arrays = numpy_to_arrays(head_arrays(build_head("linear", 32, 10, hidden=16)))
    msg = Message(
        content=RecordDict({k.CONFIG: config, k.ARRAYS: arrays}), dst_node_id=5, message_type=MessageType.EVALUATE
    )
    context = Context(run_id=1, node_id=5, node_config={"policy": str(policy_path)}, state=RecordDict(), run_config={})
    return evaluate(msg, context).content


def test_the_n_plus_first_evaluation_is_refused_and_the_ledger_shows_n(tmp_path, flower_identity, capsys):
    policy_path = _policy(tmp_path, **{"max-noise-free-releases-per-run": 3})
    site = site_from_policy(load_policy(policy_path))
    head = head_arrays(build_head("linear", 32, 10, hidden=16))
    trained = train_round(site, round_settings(TINY, noise_multiplier=1.1), head, server_round=1)
    for server_round in (1, 2, 3):
        reply = _evaluate(policy_path, server_round, noise_multiplier=1.1)
        assert k.ACCURACY in reply.metric_records[k.METRICS]
    refused = _evaluate(policy_path, 4, noise_multiplier=1.1).config_records[k.SITE]
    assert "run run-a already had 3 noise-free releases here" in refused[k.REFUSED]
    assert "the policy's max-noise-free-releases-per-run" in refused[k.REFUSED]
    charges = site.ledger.charges()
    assert [(c.kind, c.server_round) for c in charges] == [("dp-sgd", 1)] + [("evaluation", r) for r in (1, 2, 3)]
    # The reviewer's check: epsilon recomputed from the ledger's accounted records alone.
    (dp,) = [c for c in charges if c.accounted]
    expected = _oracle_epsilon([(dp.noise_multiplier, dp.sample_rate, dp.steps)])
    assert trained.epsilon == pytest.approx(expected, rel=1e-9)
    assert site.ledger.epsilon(delta=1e-5) == pytest.approx(expected, rel=1e-9)
    assert main(["site", "ledger", "verify", "--policy", str(policy_path)]) == 0
    out = capsys.readouterr().out
    assert f"total {expected:.3f} (fedtl's own: {expected:.3f})" in out and out.rstrip().endswith("VERIFIED")
    assert re.search(r"run-a +epsilon +[0-9.]+ +noise-free releases 3", out)
    assert "noise-free releases in the last 24 h: 3 of 200" in out


def test_new_run_ids_do_not_reset_the_daily_caps(tmp_path, flower_identity):
    policy_path = _policy(
        tmp_path,
        **{"max-noise-free-releases-per-run": 3, "max-noise-free-releases-per-day": 4, "max-rounds-per-day": 1},
    )
    for server_round, run_id in ((1, "run-a"), (2, "run-a"), (3, "run-a"), (1, "run-b")):
        assert k.REFUSED not in _evaluate(policy_path, server_round, run_id=run_id).config_records[k.SITE]
    refused = _evaluate(policy_path, 2, run_id="run-c").config_records[k.SITE][k.REFUSED]
    assert "4 noise-free releases in the last 24 hours, the policy's max-noise-free-releases-per-day" in refused
    site = site_from_policy(load_policy(policy_path))
    head = head_arrays(build_head("linear", 32, 10, hidden=16))
    train_round(site, round_settings(TINY, run_id="run-d", noise_multiplier=1.1), head, server_round=1)
    with pytest.raises(PolicyRefusal, match=r"refuses round 1: 1 trained releases \(DP-SGD rounds, secure DP-SGD"):
        train_round(site, round_settings(TINY, run_id="run-e", noise_multiplier=1.1), head, server_round=1)
    assert [c.kind for c in site.ledger.charges()].count("dp-sgd") == 1


def test_each_secure_dp_sgd_step_counts_against_max_rounds_per_day_beside_dp_sgd_rounds(tmp_path, flower_identity):
    policy_path = _policy(tmp_path, **{"max-rounds-per-day": 4, "min-honest-sites": 2})
    site = site_from_policy(load_policy(policy_path))
    head = head_arrays(build_head("linear", 32, 10))
    train_round(site, round_settings(TINY, run_id="run-d", noise_multiplier=1.1), head, server_round=1)
    settings = round_settings(TINY, run_id="run-s", secure_aggregation=True, secagg_honest_sites=2)
    plan = SessionPlan("session", "run-s", 1, 2, 2, 2, HEAD_GRADIENT)

    def step(number: int) -> None:
        secure_release(
            site,
            settings,
            plan,
            noise_multiplier=3.0,
            center=None,
            arrays={**head, "center": np.zeros(32, dtype=np.float32)},
            values={k.SECAGG_STEP: number, k.SECAGG_SAMPLE_RATE: 1.0},
        )

    for number in (1, 2, 3, 3):  # a redone step (its secure sum restarted) is no new release
        step(number)
    with pytest.raises(PolicyRefusal, match=r"refuses secure DP-SGD step 4: 4 trained releases .* max-rounds-per-day"):
        step(4)
    kinds = [(c.kind, c.server_round) for c in site.ledger.charges()]
    assert kinds == [("dp-sgd", 1)] + [("secagg-head-gradient", n) for n in (1, 2, 3, 3)]  # step 4: nothing charged
    with pytest.raises(PolicyRefusal, match=r"refuses round 2: 4 trained releases"):
        train_round(site, round_settings(TINY, run_id="run-d", noise_multiplier=1.1), head, server_round=2)


def test_the_default_daily_cap_lets_a_50_step_secure_run_through_and_counts_it(tmp_path):
    policy = load_policy(_policy(tmp_path))
    now = time.time()
    rounds = [PrivacyCharge(f"run-{i // 10}", 1 + i % 10, 1.1, 0.1, 30, 1e-5) for i in range(150)]  # 15 DP-SGD runs
    steps = [PrivacyCharge("run-s", n, 3.0, 1.0, 1, 1e-5, kind="secagg-head-gradient") for n in range(1, 50)]
    check_rounds_per_day(policy, rounds + steps, run_id="run-s", server_round=50, what="step 50", kind=steps[0].kind)
    done = steps + [PrivacyCharge("run-s", 50, 3.0, 1.0, 1, 1e-5, kind="secagg-head-gradient")]
    with pytest.raises(PolicyRefusal, match=r"200 trained releases \(DP-SGD rounds, secure DP-SGD steps\)"):
        check_rounds_per_day(policy, rounds + done, run_id="run-x", server_round=1, what="round 1")
    check_rounds_per_day(policy, rounds + done, run_id="run-x", server_round=1, what="round 1", now=now + 86401)


def test_releases_older_than_a_day_leave_the_window_and_defaults_let_a_normal_run_through(tmp_path):
    policy = load_policy(_policy(tmp_path))
    now = time.time()
    charges = [noise_free_charge(run_id="run-a", server_round=r, kind="evaluation", delta=1e-5) for r in range(11)]
    check_noise_free_quota(policy, charges, run_id="run-a", what="round 11", now=now)  # 10 rounds + finetune
    old = [noise_free_charge(run_id=f"r{i}", server_round=1, kind="ranking", delta=1e-5) for i in range(200)]
    with pytest.raises(PolicyRefusal, match=r"200 noise-free releases in the last 24 hours"):
        check_noise_free_quota(policy, old, run_id="run-x", what="ranking", now=now)
    check_noise_free_quota(policy, old, run_id="run-x", what="ranking", now=now + 24 * 3600 + 1)


def test_simulated_sites_have_no_caps_and_record_no_noise_free_release(tmp_path):
    sim = SimulationSettings("digits", "iid", 0, 0.2, 0.2, "", str(tmp_path), str(tmp_path))
    site = Site(name="site-0", state_dir=tmp_path / "state", cache_dir=tmp_path / "cache", data="", simulation=sim)
    for server_round in range(500):
        charge_release(site, round_settings(TINY), ReleaseRequest(EVALUATION, server_round, 0.0, 0, "eval", 0.0))
    assert not site.ledger.path.exists()


def test_site_ledger_verify_fails_on_tampering_and_adopt_signs_an_old_ledger(tmp_path, capsys):
    policy_path = _policy(tmp_path)
    ledger = site_from_policy(load_policy(policy_path)).ledger
    ledger.path.parent.mkdir(parents=True)
    record = {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 50, "kind": "dp-sgd", "run_id": "old"}
    record.update(server_round=1, delta=1e-5, time=time.time(), note="")
    ledger.path.write_text(json.dumps({**record, "crc32": zlib.crc32(json.dumps(record, sort_keys=True).encode())}))
    assert main(["site", "ledger", "verify", "--policy", str(policy_path)]) == 1
    assert "NOT VERIFIED: privacy ledger" in capsys.readouterr().out
    assert main(["site", "ledger", "adopt", "--policy", str(policy_path), "--yes"]) == 0
    out = capsys.readouterr().out
    assert "records of an earlier fedtl (1 with a CRC-32, 0 without)" in out and out.rstrip().endswith("VERIFIED")
    assert ledger.epsilon(delta=1e-5) == pytest.approx(_oracle_epsilon([(1.0, 0.1, 50)]), rel=1e-9)
    assert main(["site", "ledger", "--policy", str(policy_path)]) == 0  # the report still works
    assert "old" in capsys.readouterr().out
    ledger.path.write_text(ledger.path.read_text().replace('"steps": 50', '"steps": 5'))
    assert main(["site", "ledger", "verify", "--policy", str(policy_path)]) == 1
    assert "line 1 fails its MAC" in capsys.readouterr().out


def test_the_template_keeps_the_ledger_secret_outside_the_state_folder(tmp_path):
    path = init_policy(
        tmp_path / "site.toml", site_name="hospital-a", data="digits", backbones=["tiny"], label_names=[]
    )
    policy = load_policy(path)
    default = Path(os.environ["XDG_CONFIG_HOME"]) / "fedtl" / "hospital-a"  # ~/.config/fedtl/<name>, written out
    assert policy.secret_dir == default and f'secret-dir = "{default}"' in path.read_text()
    text, count = re.subn(r'^secret-dir = ".*"$', 'secret-dir = "state/keys"', path.read_text(), flags=re.M)
    assert count == 1
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"`storage.secret-dir` .*state/keys lies inside `storage.state-dir`"):
        load_policy(path)
