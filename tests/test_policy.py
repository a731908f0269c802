"""A site's own policy (client/policy.py) and what a site operator runs (client/admin.py, `fedtl site`)."""

import json
import logging

import numpy as np
import pytest
from builders import round_settings
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedtl.cli.main import main
from fedtl.client.admin import init_policy, ledger_report, status_report
from fedtl.client.client_app import numpy_to_arrays, query
from fedtl.client.policy import PolicyRefusal, load_policy
from fedtl.client.site import site_from_policy
from fedtl.client.solvers.dp_sgd import train_round
from fedtl.shared import constants as k
from fedtl.shared.backbones import backbone_state_dict, build_backbone, fingerprint_state_dict
from fedtl.shared.errors import ConfigError
from fedtl.shared.heads import build_head, head_arrays
from fedtl.shared.protocol import RoundSettings, encode

TINY = fingerprint_state_dict(backbone_state_dict(build_backbone("tiny")))
DIGITS = [str(i) for i in range(10)]


@pytest.fixture
def policy_path(tmp_path):
    path = init_policy(
        tmp_path / "site.toml", site_name="hospital-a", data="digits", backbones=["tiny"], label_names=[]
    )
    return path


def _settings(**changes) -> RoundSettings:
    return round_settings(TINY, **changes)


def test_the_template_is_a_valid_policy_with_safe_defaults(policy_path, tmp_path):
    policy = load_policy(policy_path)
    assert (policy.site_name, policy.data, policy.max_epsilon, policy.delta) == ("hospital-a", "digits", 24.0, 1e-5)
    assert policy.allowed_backbones == (TINY,)
    assert policy.state_dir == tmp_path / "state" and policy.cache_dir == tmp_path / "state" / "cache"
    assert not policy.allow_non_private and not policy.release_evaluation_metrics
    assert policy.min_noise_multiplier == 0.5
    text = policy_path.read_text()
    assert "# tiny" in text and "nothing the federation server sends can loosen it" in text
    with pytest.raises(ConfigError, match="exists; refusing to overwrite a site policy"):
        init_policy(policy_path, site_name="x", data="digits", backbones=["tiny"], label_names=[])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            ("max-epsilon = 24.0", "max-epsilon = 24.0\nmax-epsilon-x = 1"),
            r"unknown key `privacy.max-epsilon-x`; did you mean `privacy.max-epsilon`",
        ),
        (("[storage]", "[storag]"), r"unknown section `storag`; did you mean `storage`"),
        (("max-epsilon = 24.0", "max-epsilon = -1.0"), r"`privacy.max-epsilon` must be a finite number > 0, got -1.0"),
        (("max-epsilon = 24.0", 'max-epsilon = "8"'), r"`privacy.max-epsilon` must be float, got '8'"),
        (("max-epsilon = 24.0", "# max-epsilon = 24.0"), r"lacks `privacy.max-epsilon`"),
        (("delta = 1e-5", "delta = 2.0"), r"`privacy.delta` must be in \(0, 1\), got 2.0"),
        ((f'"{TINY}"', '"abc"'), r"`backbones.allowed` entry 'abc' is not a SHA-256 fingerprint"),
        ((f'"{TINY}",', ""), r"`backbones.allowed` is empty, so this site would refuse every federation"),
        (('bad-files = "error"', 'bad-files = "ignore"'), r"`site.bad-files` must be one of error, skip, got 'ignore'"),
    ],
)
def test_policy_errors_name_the_key_and_the_fix(policy_path, edit, message):
    old, new = edit
    text = policy_path.read_text()
    assert old in text
    policy_path.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError, match=message):
        load_policy(policy_path)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        (dict(target_epsilon=30.0), r"the run asks target-epsilon 30 but the policy allows at most max-epsilon 24"),
        (dict(num_rounds=500), r"the run plans 500 rounds > the policy's max-rounds-per-run 50"),
        (dict(non_private=True), r"NON-PRIVATE .* allow-non-private = false"),
        (dict(target_delta=1e-3), r"target-delta 0.001 > the policy's delta 1e-05"),
        (dict(noise_multiplier=0.3), r"fixes noise-multiplier 0.3 < the policy's min-noise-multiplier 0.5"),
        (dict(backbone_fingerprint="f" * 64), r"refuses backbone tiny with fingerprint f{64}: it is not in"),
    ],
)
def test_nothing_the_server_sends_can_loosen_the_policy(policy_path, changes, reason):
    policy = load_policy(policy_path)
    policy.check_settings(_settings(), action="round 1")  # the defaults are within the policy
    with pytest.raises(PolicyRefusal, match=rf"site hospital-a refuses round 1: .*{reason}|{reason}"):
        policy.check_settings(_settings(**changes), action="round 1")


def test_a_policy_with_label_names_refuses_other_classes(policy_path):
    policy_path.write_text(policy_path.read_text().replace("label-names = []", f"label-names = {json.dumps(DIGITS)}"))
    policy = load_policy(policy_path)
    swapped = json.dumps(["1", "0"] + DIGITS[2:])
    with pytest.raises(
        PolicyRefusal, match=r"the run trains classes \['1', '0', .* but the policy declares \['0', '1'"
    ):
        policy.check_settings(_settings(label_names=swapped), action="round 1")


def _query(action: str, policy_path, **changes) -> Message:
    config = ConfigRecord({**encode(_settings(**changes)), k.ACTION: action})
    msg = Message(content=RecordDict({k.CONFIG: config}), dst_node_id=5, message_type=MessageType.QUERY)
    context = Context(run_id=1, node_id=5, node_config={"policy": str(policy_path)}, state=RecordDict(), run_config={})
    return query(msg, context)


def test_the_clientapp_answers_a_request_beyond_the_policy_with_a_refusal_record(policy_path, flower_identity):
    reply = _query(k.ACTION_HAS_BACKBONE, policy_path, target_epsilon=30.0)
    site = reply.content.config_records[k.SITE]
    assert site[k.SITE_NAME] == "hospital-a" and site[k.REFUSAL_CODE] == "policy"
    assert "the run asks target-epsilon 30 but the policy allows at most max-epsilon 24" in site[k.REFUSED]
    ok = _query(k.ACTION_HAS_BACKBONE, policy_path).content.config_records[k.SITE]
    assert k.REFUSED not in ok and ok[k.HAS_BACKBONE] is False and ok[k.RELEASES_EVALUATION] is False


def test_the_lifetime_budget_holds_across_runs_and_the_operator_sees_it(policy_path, capsys):
    policy = load_policy(policy_path)
    site = site_from_policy(policy)
    state = backbone_state_dict(build_backbone("tiny"))
    site.backbones.install("tiny", TINY, state)
    head = head_arrays(build_head("linear", 32, 10, hidden=16))
    first = train_round(site, _settings(run_id="run-a", num_rounds=1, target_epsilon=5.0), head, server_round=1)
    assert 4.5 < first.epsilon <= 5.0
    # A second run with target-epsilon 8 gets only what the first left of 8: its noise is planned so.
    second = train_round(site, _settings(run_id="run-b", num_rounds=1, target_epsilon=8.0), head, server_round=1)
    assert first.epsilon < second.epsilon <= 8.0 * (1 + 1e-6)
    assert main(["site", "ledger", "--policy", str(policy_path)]) == 0
    out = capsys.readouterr().out
    assert "run-a" in out and "run-b" in out and f"total epsilon {second.epsilon:.3f} of max-epsilon 24" in out
    assert f"spent epsilon {second.epsilon:.3f} of 24 at delta 1e-05" in status_report(policy)
    assert "tiny" in status_report(policy) and "cached" in status_report(policy)
    assert ledger_report(policy).count("\n") == 4  # title, header, 2 runs, total


def test_non_finite_numbers_from_the_server_are_malformed(flower_identity):
    from fedtl.shared.errors import ReplyError
    from fedtl.shared.protocol import decode

    values = encode(_settings())
    values["target-epsilon"] = float("nan")
    with pytest.raises(ReplyError, match=r"`target-epsilon` must be a finite number, got nan"):
        decode(RoundSettings, values)


def _real_site(policy_path):
    site = site_from_policy(load_policy(policy_path))
    site.backbones.install("tiny", TINY, backbone_state_dict(build_backbone("tiny")))
    return site


def test_no_noise_rounds_beyond_the_plan_and_beyond_the_policy_are_refused(policy_path):
    from fedtl.client.centering import feature_sum_round

    policy_path.write_text(policy_path.read_text().replace("min-noise-multiplier = 0.5", "min-noise-multiplier = 0.0"))
    policy = load_policy(policy_path)
    with pytest.raises(PolicyRefusal, match=r"fixes noise-multiplier 0 \(no noise\) and the policy sets allow-non"):
        policy.check_settings(_settings(noise_multiplier=0.0), action="round 1")
    site = _real_site(policy_path)
    with pytest.raises(PolicyRefusal, match=r"noise-multiplier 0 releases it without noise"):
        feature_sum_round(site, _settings(), noise_multiplier=0.0)
    head = head_arrays(build_head("linear", 32, 10, hidden=16))
    with pytest.raises(PolicyRefusal, match=r"refuses round 3: run run-a announced 2 rounds"):
        train_round(site, _settings(), head, server_round=3)
    policy_path.write_text(policy_path.read_text().replace("max-rounds-per-run = 50", "max-rounds-per-run = 1"))
    site = _real_site(policy_path)
    train_round(site, _settings(num_rounds=1, noise_multiplier=1.0), head, server_round=1)
    # A server that re-announces the same run with more rounds still meets the ledger's count.
    with pytest.raises(PolicyRefusal, match=r"already trained 1 rounds here, the policy's max-rounds-per-run"):
        train_round(site, _settings(num_rounds=2, noise_multiplier=1.0), head, server_round=2)
    assert len(site.ledger.charges()) == 1  # refusals charge nothing


def test_a_redone_round_resends_its_update_instead_of_paying_again(policy_path):
    site = _real_site(policy_path)
    head = head_arrays(build_head("linear", 32, 10, hidden=16))
    first = train_round(site, _settings(), head, server_round=1)
    again = train_round(site, _settings(), head, server_round=1)  # a resumed server repeats round 1
    assert len(site.ledger.charges()) == 1 and again.epsilon == first.epsilon
    for name, value in first.result.arrays.items():
        np.testing.assert_array_equal(again.result.arrays[name], value)
    other = {name: value + 0.01 for name, value in head.items()}  # another global head: new work, new charge
    train_round(site, _settings(), other, server_round=1)
    assert len(site.ledger.charges()) == 2


def test_a_refusal_sends_no_file_name_or_count_to_the_server(tmp_path, flower_identity, caplog):
    """A data error names files at the site (its log) but the server gets only a code and a public reason."""
    from PIL import Image

    from fedtl.client.client_app import evaluate

    rows = ["path,label"]
    for i in range(6):
        name = f"PATIENT-{40000 + i}_DOE_JANE_mammo.png"
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / name)
        rows.append(f"{name},{'benign' if i % 2 else 'malignant'}")
    (tmp_path / "broken-PATIENT-49999.png").write_bytes(b"not a png")
    rows.append("broken-PATIENT-49999.png,benign")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    policy_path = init_policy(
        tmp_path / "site.toml",
        site_name="hospital-a",
        data=str(tmp_path / "manifest.csv"),
        backbones=["tiny"],
        label_names=["benign", "malignant"],
    )
    text = policy_path.read_text().replace("release-evaluation-metrics = false", "release-evaluation-metrics = true")
    policy_path.write_text(text)
    site = site_from_policy(load_policy(policy_path))
    site.backbones.install("tiny", TINY, backbone_state_dict(build_backbone("tiny")))
    settings = _settings(num_classes=2, label_names=json.dumps(["benign", "malignant"]))
    content = RecordDict(
        {
            k.CONFIG: ConfigRecord(encode(settings)),
            k.ARRAYS: numpy_to_arrays(head_arrays(build_head("linear", 32, 2, hidden=16))),
        }
    )
    msg = Message(content=content, dst_node_id=5, message_type=MessageType.EVALUATE)
    context = Context(run_id=1, node_id=5, node_config={"policy": str(policy_path)}, state=RecordDict(), run_config={})
    with caplog.at_level(logging.WARNING, logger="fedtl.client.client_app"):
        reply = evaluate(msg, context)
    record = reply.content.config_records[k.SITE]
    sent = json.dumps({key: str(v) for key, v in record.items()})
    assert record[k.REFUSAL_CODE] == "data"
    assert "PATIENT" not in sent and "DOE" not in sent and ".png" not in sent and "manifest" not in sent
    assert "broken-PATIENT-49999.png" in caplog.text  # the operator sees which file, in the site's own log


def test_a_real_site_keeps_its_state_and_caches_to_itself(policy_path, flower_identity):
    """Ledger, caches, data index: 0600 files in 0700 folders, whatever the umask the SuperNode started with."""
    import os
    import stat

    from fedtl.client.client_app import train

    previous = os.umask(0o022)
    try:
        site = _real_site(policy_path)  # the test installs the backbone itself, at umask 022
        before = set(site.state_dir.rglob("*"))
        config = ConfigRecord({**encode(_settings(num_rounds=1)), k.SERVER_ROUND: 1})
        head = numpy_to_arrays(head_arrays(build_head("linear", 32, 10, hidden=16)))
        msg = Message(
            content=RecordDict({k.CONFIG: config, k.ARRAYS: head}), dst_node_id=5, message_type=MessageType.TRAIN
        )
        context = Context(
            run_id=1, node_id=5, node_config={"policy": str(policy_path)}, state=RecordDict(), run_config={}
        )
        reply = train(msg, context)
    finally:
        os.umask(previous)
    assert k.REFUSED not in reply.content.config_records[k.SITE]
    written = [p for root in (site.state_dir, site.cache_dir) for p in root.rglob("*") if p not in before]
    files = [p for p in written if p.is_file() and not p.name.endswith(".lock")]
    assert any(p.name == "ledger.jsonl" for p in files) and any(p.suffix == ".npz" for p in files)
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
    for path in [p for p in written if p.is_dir()]:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
