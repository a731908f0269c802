"""A site's own state: verified backbones, its data, its rounds and the privacy they cost."""

import json

import numpy as np
import pytest
import torch
from builders import round_settings

from fedtl.client.centering import feature_sum_round
from fedtl.client.site import BackboneStore, Site, resolve_site
from fedtl.client.solvers.dp_sgd import train_round
from fedtl.shared.backbones import backbone_state_dict, build_backbone, fingerprint_state_dict
from fedtl.shared.errors import BackboneError, ConfigError, DataError, FingerprintMismatchError, PrivacyBudgetError
from fedtl.shared.heads import build_head, head_arrays
from fedtl.shared.protocol import SimulationSettings


@pytest.fixture(autouse=True)
def _simulated_sites(monkeypatch):
    monkeypatch.setenv("FEDTL_SIMULATED_SITES", "1")


@pytest.fixture
def tiny_state():
    return backbone_state_dict(build_backbone("tiny"))


def _site(tmp_path) -> Site:
    sim = SimulationSettings(
        data="digits",
        partition="iid",
        seed=0,
        test_fraction=0.2,
        local_test_fraction=0.2,
        permuted_label_sites="",
        site_root=str(tmp_path / "state"),
        cache_root=str(tmp_path / "cache"),
    )
    return resolve_site({"partition-id": 0, "num-partitions": 4}, sim)


_settings = round_settings


def test_install_refuses_weights_that_do_not_match_the_announced_fingerprint(tmp_path, tiny_state):
    store = BackboneStore(tmp_path)
    announced = fingerprint_state_dict(tiny_state)
    tampered = {k: v.clone() for k, v in tiny_state.items()}
    first = next(iter(tampered))
    tampered[first].view(-1)[0] += 1e-3
    actual = fingerprint_state_dict(tampered)
    with pytest.raises(FingerprintMismatchError, match=f"hash to {actual}, but the server announced {announced}"):
        store.install("tiny", announced, tampered)
    assert store.fingerprints() == []  # nothing stored


def test_a_stored_backbone_changed_on_disk_is_refused(tmp_path, tiny_state):
    from safetensors.torch import save_file

    store = BackboneStore(tmp_path)
    fingerprint = fingerprint_state_dict(tiny_state)
    path = store.install("tiny", fingerprint, tiny_state)
    assert fingerprint_state_dict(backbone_state_dict(store.load("tiny", fingerprint))) == fingerprint
    changed = {k: v.clone() for k, v in tiny_state.items()}
    next(iter(changed.values())).view(-1)[0] *= 2
    save_file(changed, str(path))
    with pytest.raises(FingerprintMismatchError, match="was modified on disk"):
        store.load("tiny", fingerprint)
    with pytest.raises(BackboneError, match="is not in the site cache"):
        store.load("tiny", "0" * 64)


def test_node_config_must_name_a_site_policy(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="names no site policy: start it with --node-config"):
        resolve_site({}, None)
    with pytest.raises(ConfigError, match="site policy path must be absolute .* got 'relative/site.toml'"):
        resolve_site({"policy": "relative/site.toml"}, None)
    with pytest.raises(
        ConfigError, match=r"site policy /nowhere/site.toml does not exist; write one with `fedtl site init"
    ):
        resolve_site({"policy": "/nowhere/site.toml"}, None)


def test_a_real_supernode_cannot_be_turned_into_a_simulated_site(tmp_path, monkeypatch):
    # The server always sends simulation settings; only a local opt-in lets a site use them.
    monkeypatch.delenv("FEDTL_SIMULATED_SITES")
    with pytest.raises(ConfigError, match="only where FEDTL_SIMULATED_SITES=1 is set"):
        _site(tmp_path)


def test_a_round_is_charged_before_training_and_refused_past_the_budget(tmp_path, tiny_state):
    site = _site(tmp_path)
    fingerprint = site.backbones.install("tiny", fingerprint_state_dict(tiny_state), tiny_state).stem
    settings = _settings(fingerprint)
    head = head_arrays(build_head("linear", 32, 10, hidden=16))
    eps = []
    for server_round in (1, 2):
        report = train_round(site, settings, head, server_round=server_round)
        eps.append(report.epsilon)
        assert report.epsilon == pytest.approx(site.ledger.epsilon(delta=1e-5))
    assert eps[0] < eps[1] <= 4.0
    charges = site.ledger.charges()
    assert [c.server_round for c in charges] == [1, 2]
    assert len({c.noise_multiplier for c in charges}) == 1  # one noise for the whole run
    # A third round was not planned: it would overspend, so the site refuses with the numbers.
    with pytest.raises(
        PrivacyBudgetError,
        match=r"refusing round 3 of run run-a at site site-0: .* would reach \d+\.\d+ > the run's target-epsilon 4 "
        r"\(delta 1e-05\); spent so far \d+\.\d+, left 0\.\d+",
    ):
        train_round(site, settings, head, server_round=3)
    assert len(site.ledger.charges()) == 2  # nothing charged, nothing lost
    # A new run over the same site starts from what is already spent.
    with pytest.raises(PrivacyBudgetError, match=r"epsilon already spent is \d+\.\d+ >= target-epsilon \d+\.\d+"):
        train_round(site, _settings(fingerprint, run_id="run-b", target_epsilon=eps[1]), head, server_round=1)


def test_feature_sum_is_noised_and_charged(tmp_path, tiny_state):
    site = _site(tmp_path)
    fingerprint = site.backbones.install("tiny", fingerprint_state_dict(tiny_state), tiny_state).stem
    settings = _settings(fingerprint)
    noisy, n, _ = feature_sum_round(site, settings, noise_multiplier=4.0)
    exact, n2, _ = feature_sum_round(site, _settings(fingerprint, non_private=True), noise_multiplier=4.0)
    assert n == n2 > 0 and noisy.shape == exact.shape == (32,)
    # Each normalised feature has norm 1, so the exact sum's norm is at most n.
    assert np.linalg.norm(exact) <= n + 1e-3
    assert np.linalg.norm(noisy - exact) > 1.0  # noise of std 4 in 32 dims
    kinds = [(c.kind, c.noise_multiplier, c.sample_rate, c.steps) for c in site.ledger.charges()]
    assert kinds == [("feature-sum", 4.0, 1.0, 1), ("feature-sum", 0.0, 1.0, 1)]


def test_label_set_different_from_the_federation_is_refused(tmp_path, tiny_state):
    site = _site(tmp_path)
    fingerprint = site.backbones.install("tiny", fingerprint_state_dict(tiny_state), tiny_state).stem
    with pytest.raises(
        DataError,
        match=r"10 label\(s\) not in the federation's label_names: '0' \(label index 0\).*"
        r"allowed: \['benign', 'malignant'\]",
    ):
        train_round(
            site,
            _settings(fingerprint, num_classes=2, label_names='["benign", "malignant"]'),
            head_arrays(build_head("linear", 32, 2)),
            server_round=1,
        )
    # The same classes in another order are the federation's order: accepted, and the site's labels follow it.
    swapped = json.dumps([str(i) for i in (1, 0, 2, 3, 4, 5, 6, 7, 8, 9)])
    report = train_round(
        site, _settings(fingerprint, label_names=swapped), head_arrays(build_head("linear", 32, 10)), server_round=1
    )
    assert report.result.num_examples > 0


def test_training_leaves_the_backbone_untouched(tmp_path, tiny_state):
    site = _site(tmp_path)
    fingerprint = site.backbones.install("tiny", fingerprint_state_dict(tiny_state), tiny_state).stem
    train_round(site, _settings(fingerprint), head_arrays(build_head("linear", 32, 10)), server_round=1)
    assert fingerprint_state_dict(backbone_state_dict(site.backbones.load("tiny", fingerprint))) == fingerprint
    assert torch.equal(
        next(iter(tiny_state.values())), next(iter(backbone_state_dict(build_backbone("tiny")).values()))
    )


def test_a_real_site_decodes_its_data_once_and_again_only_after_a_change(tmp_path, tiny_state, monkeypatch):
    import os

    from PIL import Image

    from fedtl.client.admin import init_policy
    from fedtl.client.inputs import load_site_inputs
    from fedtl.client.policy import load_policy
    from fedtl.client.site import site_from_policy

    rng = np.random.default_rng(0)
    files = []
    for label in ("0", "1"):
        for i in range(6):
            path = tmp_path / "data" / label / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(path)
            files.append(path)
    policy = init_policy(
        tmp_path / "site.toml", site_name="lab-a", data=str(tmp_path / "data"), backbones=["tiny"], label_names=[]
    )
    site = site_from_policy(load_policy(policy))
    fingerprint = site.backbones.install("tiny", fingerprint_state_dict(tiny_state), tiny_state).stem
    settings = _settings(fingerprint, num_classes=2, label_names='["0", "1"]')
    first = load_site_inputs(site, settings, progress=False)
    assert first.cache_hits == 0
    # Unchanged files: the features come from the index and the cache; the data is not decoded again.
    import fedtl.client.inputs as inputs_module

    def no_decoding(*args, **kwargs):
        raise AssertionError("the data was decoded again")

    monkeypatch.setattr(inputs_module, "load_site_data", no_decoding)
    again = load_site_inputs(site, settings, progress=False)
    assert again.cache_hits == 2
    np.testing.assert_array_equal(again.train_x, first.train_x)
    np.testing.assert_array_equal(again.test_y, first.test_y)
    monkeypatch.undo()
    # A file rewritten with its old size and modification time still changes its ctime: a full load,
    # with validation, follows.
    victim = files[0]
    stat = victim.stat()
    victim.write_bytes(b"x" * stat.st_size)
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(DataError, match=r"cannot be read.*0\.png"):
        load_site_inputs(site, settings, progress=False)
