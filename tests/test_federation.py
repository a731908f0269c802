"""A real 2-site, 3-round federation on Flower's simulation engine with the tiny backbone."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from fedtl.client.ledger import PrivacyLedger
from fedtl.client.site import BackboneStore
from fedtl.server import report
from fedtl.server.model_file import load_model
from fedtl.shared import mechanisms
from fedtl.shared.backbones import backbone_state_dict, build_backbone, fingerprint_state_dict
from fedtl.shared.config import RunConfig
from fedtl.simulations import federation as lab
from fedtl.simulations.engine import descendants, simulate

pytestmark = pytest.mark.slow  # whole federations on Flower's engine

DP_SGD = mechanisms.DP_SGD.kind

ROUNDS = 3


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """Run one federation (and a second one on the same site caches); record every training reply."""
    home = tmp_path_factory.mktemp("fedtl-home")
    out = tmp_path_factory.mktemp("runs")
    replies: list[dict] = []
    original = report.RunRecorder.screen_train

    def spy(self, server_round, msgs):
        for msg in msgs:
            if not msg.has_error():
                arrays = next(iter(msg.content.array_records.values()))
                replies.append(
                    {
                        "round": server_round,
                        "array_records": list(msg.content.array_records.keys()),
                        "arrays": {name: tuple(a.shape) for name, a in arrays.items()},
                        "bytes": arrays.count_bytes(),
                    }
                )
        return original(self, server_round, msgs)

    cfg = RunConfig(backbone="tiny", num_rounds=ROUNDS, out=str(out), seed=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDTL_HOME", str(home))
        mp.setattr(report.RunRecorder, "screen_train", spy)
        # The first run skips the lab's preparation (which installs the backbone at each site before the engine
        # starts): its sites start empty, as deployed ones do, so the server must send them the weights.
        with pytest.MonkeyPatch.context() as unprepared:
            unprepared.setattr(lab, "prepare_simulated_sites", lambda *args, **kwargs: None)
            first = simulate(cfg, num_sites=2)
        second = simulate(cfg.replace(num_rounds=1), num_sites=2)
    return {"home": home, "first": first, "second": second, "replies": replies}


def _metrics(summary):
    return [json.loads(line) for line in (Path(summary["run-dir"]) / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_config_metrics_summary_and_model(federation):
    run_dir = Path(federation["first"]["run-dir"])
    for name in ("config.json", "metrics.jsonl", "summary.json", "model.safetensors", "model.md"):
        assert (run_dir / name).is_file(), name
    config = json.loads((run_dir / "config.json").read_text())
    assert RunConfig.from_mapping(config["config"]).num_rounds == ROUNDS
    lines = _metrics(federation["first"])
    assert [line["round"] for line in lines] == list(range(ROUNDS + 1))
    assert set(lines[-1]["sites"]) == {"site-0", "site-1"}


def test_loss_falls_over_rounds(federation):
    lines = _metrics(federation["first"])
    central = [line["central"]["loss"] for line in lines]
    federated = [line["evaluate"]["loss"] for line in lines[1:]]
    assert central[-1] < central[0] - 0.2, central
    assert federated[-1] < federated[0], federated
    assert lines[-1]["central"]["accuracy"] > 2 * federation["first"]["majority-rate"]


def test_epsilon_grows_every_round_and_matches_the_accountant(federation):
    lines = _metrics(federation["first"])
    run_id = federation["first"]["run-id"]
    for site in ("site-0", "site-1"):
        reported = [line["epsilon-per-site"][site] for line in lines[1:]]
        assert all(b > a for a, b in zip(reported, reported[1:])), reported
        store = PrivacyLedger(Path(federation["first"]["run-dir"]) / "sites" / site / "privacy" / "ledger.jsonl")
        charges = [c for c in store.charges() if c.run_id == run_id]
        # Independent recomputation: Opacus' accountant over the stored history, round by round.
        acc = RDPAccountant()
        for charge in charges:
            acc.history.append((charge.noise_multiplier, charge.sample_rate, charge.steps))
            if charge.kind == DP_SGD:
                expected = acc.get_epsilon(delta=charge.delta)
                assert reported[charge.server_round - 1] == pytest.approx(expected, rel=1e-9)
        assert [c.server_round for c in charges if c.kind == DP_SGD] == list(range(1, ROUNDS + 1))
        assert reported[-1] <= 8.0


def test_backbone_is_bit_identical_after_training(federation):
    fingerprint = federation["first"]["backbone-fingerprint"]
    assert fingerprint == fingerprint_state_dict(backbone_state_dict(build_backbone("tiny")))
    for site in ("site-0", "site-1"):
        store = BackboneStore(federation["home"] / "sim-sites" / site / "backbones")
        assert store.fingerprints() == [fingerprint]
        assert fingerprint_state_dict(backbone_state_dict(store.load("tiny", fingerprint))) == fingerprint
    assert load_model(federation["first"]["model"]).backbone_fingerprint == fingerprint


def test_only_head_tensors_travel(federation):
    # The default head-solver "auto": a linear head on k public directions, which travel with it, frozen.
    plan = federation["first"]["head-plan"]
    assert plan["method"] == "dp-gd" and plan["reason"].startswith("dp-gd: 2 sites")
    dim = plan["projection-dim"]
    head_keys = set(load_model(federation["first"]["model"]).arrays)
    assert head_keys == {"center", "projection", "layers.0.weight", "layers.0.bias"}
    replies = federation["replies"]
    assert len(replies) == 2 * ROUNDS + 2  # two runs: 3 rounds, then 1 round
    for reply in replies:
        assert reply["array_records"] == ["arrays"]
        assert set(reply["arrays"]) == head_keys
        assert reply["arrays"]["layers.0.weight"] == (10, dim) and reply["arrays"]["projection"] == (dim, 32)
    assert max(r["bytes"] for r in replies) < 4096


def test_backbone_sent_once_then_only_its_fingerprint(federation):
    first, second = federation["first"], federation["second"]
    assert set(first["backbone-bytes-sent-per-site"]) == {"site-0", "site-1"}
    assert all(n >= first["backbone-bytes"] for n in first["backbone-bytes-sent-per-site"].values())
    assert second["backbone-bytes-sent-per-site"] == {"site-0": 0, "site-1": 0}
    assert np.isfinite(second["epsilon-max"])


def test_predict_round_trips_the_model_file(federation, tmp_path, capsys):
    from PIL import Image

    from fedtl.cli.main import main
    from fedtl.server.predict import load_model_backbone
    from fedtl.shared.data import load_dataset
    from fedtl.shared.features import extract_features
    from fedtl.shared.heads import predict_proba

    model_path = federation["first"]["model"]
    test = load_dataset("digits").test
    paths = []
    for i in range(6):
        path = tmp_path / f"digit-{i}.png"
        Image.fromarray(test.images[i]).save(path)
        paths.append(str(path))
    assert main(["predict", model_path, *paths]) == 0
    printed = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert [p for p, _, _ in printed] == paths
    # Oracle: the same head on the same backbone's features, computed directly.
    model = load_model(model_path)
    feats = extract_features(load_model_backbone(model), test.images[:6], model.preprocessing, progress=False)
    probs = predict_proba(model.build_head(), feats)
    assert [label for _, label, _ in printed] == [model.label_names[i] for i in probs.argmax(1)]
    np.testing.assert_allclose([float(p) for _, _, p in printed], probs.max(1), atol=1e-4)
    # A folder stands for its images, found recursively in sorted order; other files there are left out.
    folder = tmp_path / "scans"
    (folder / "b").mkdir(parents=True)
    for i, name in ((0, "b/x.png"), (1, "a.png")):
        Image.fromarray(test.images[i]).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    assert main(["predict", model_path, str(folder), paths[2]]) == 0
    printed = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert [p for p, _, _ in printed] == [str(folder / "a.png"), str(folder / "b" / "x.png"), paths[2]]
    assert [label for _, label, _ in printed] == [model.label_names[i] for i in probs[[1, 0, 2]].argmax(1)]
    for image in folder.rglob("*.png"):
        image.unlink()
    assert main(["predict", model_path, str(folder)]) == 2
    assert re.search(r"folder .*scans holds no image file \(\.png, .*\); fix:", capsys.readouterr().err)


def test_predict_names_a_corrupt_image_and_a_foreign_backbone(federation, tmp_path, capsys):
    import dataclasses

    from fedtl.cli.main import main
    from fedtl.server.model_file import save_model
    from fedtl.server.predict import predict_images
    from fedtl.shared.errors import FingerprintMismatchError

    bad = tmp_path / "scan.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    assert main(["predict", federation["first"]["model"], str(bad)]) == 2
    assert "scan.png" in capsys.readouterr().err
    model = load_model(federation["first"]["model"])
    foreign = save_model(tmp_path / "foreign.safetensors", dataclasses.replace(model, backbone_fingerprint="f" * 64))
    good = tmp_path / "ok.png"
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(good)
    with pytest.raises(FingerprintMismatchError, match="f" * 64):
        predict_images(foreign, [good])


def test_a_failing_server_app_reaches_the_caller_and_leaves_no_ray_behind(tmp_path):
    import time

    import ray

    class Failing(lab.FederationApp):
        def run(self, grid):
            raise RuntimeError("the server logic failed")

    before = descendants(os.getpid())
    cfg = RunConfig(backbone="tiny", num_rounds=1, out=str(tmp_path / "runs"))
    with pytest.raises(RuntimeError, match="the server logic failed"):
        simulate(cfg, num_sites=2, app=Failing)
    assert not ray.is_initialized()
    deadline = time.time() + 30  # Ray's processes were told to stop; give them time to exit
    while descendants(os.getpid()) - before:
        assert time.time() < deadline, f"processes left running: {descendants(os.getpid()) - before}"
        time.sleep(0.2)
