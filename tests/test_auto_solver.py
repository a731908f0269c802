"""head-solver = "auto": planned from public quantities, run in process, and its projected head's model file."""

import json
import logging
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from fedtl.client.client_app import app as client_app
from fedtl.client.ledger import PrivacyLedger
from fedtl.server.model_file import load_model
from fedtl.server.solvers.auto import AutoSolver, fallback_reason
from fedtl.shared import constants as k
from fedtl.shared.config import RunConfig, fedtl_home
from fedtl.shared.dp_heads import plan_dp_head
from fedtl.shared.errors import ConfigError
from fedtl.shared.heads import build_head, head_arrays
from fedtl.shared.privacy import compute_epsilon
from fedtl.shared.public_basis import SYNTHETIC_COUNT, centre_features, project_features
from fedtl.simulations.inprocess import run_inprocess

SITES = 3
ROUNDS = 2  # the plan keeps the configured rounds and splits its 50 steps over them: 25 per round


class CountingApp:
    """The sites' ClientApp, counting each (message type, query action) it answers."""

    def __init__(self) -> None:
        self.messages: Counter = Counter()

    def __call__(self, msg, context):  # noqa: ANN001, ANN204 - a ClientApp's call
        config = msg.content.config_records.get(k.CONFIG)
        action = str(config.get(k.ACTION, "")) if config is not None else ""
        self.messages[(msg.metadata.message_type, action)] += 1
        return client_app(msg, context)


class _Lines(logging.Handler):
    """Collects the progress lines a run prints to the user's terminal."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _auto_run(home: Path, out: Path, *, target_epsilon: float, **changes) -> tuple[dict, CountingApp]:
    cfg = RunConfig(
        backbone="tiny",
        image_size=32,
        num_rounds=ROUNDS,
        target_epsilon=target_epsilon,
        federated_evaluation=False,
        device="cpu",
        out=str(out),
        **changes,
    )
    assert cfg.head_solver == "auto"  # the default
    app = CountingApp()
    progress, lines = logging.getLogger("fedtl.progress"), _Lines()
    level = progress.level
    progress.addHandler(lines)
    progress.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FEDTL_HOME", str(home))
            summary = run_inprocess(cfg, num_sites=SITES, client_app=app)
    finally:
        progress.removeHandler(lines)
        progress.setLevel(level)
    summary["progress"] = "\n".join(lines.lines)
    return summary, app


@pytest.fixture(scope="module")
def auto_eps1(tmp_path_factory):
    """An auto run at epsilon 1 on digits, 3 sites, the tiny backbone (a centre is released)."""
    return _auto_run(tmp_path_factory.mktemp("home"), tmp_path_factory.mktemp("runs"), target_epsilon=1.0)


_HEAD_PLAN = "head-plan"


def _plan(summary: dict) -> dict:
    return summary[_HEAD_PLAN]


def test_the_plan_is_printed_and_recorded_with_the_keys_it_overrides(auto_eps1):
    summary, _ = auto_eps1
    plan = _plan(summary)
    assert "head-solver auto: dp-gd: 3 sites" in summary["progress"]
    assert plan["reason"] in summary["progress"]
    assert "head-solver auto sets" in summary["progress"] and "learning-rate = " in summary["progress"]
    stored = json.loads((Path(summary["run-dir"]) / "config.json").read_text())
    assert stored[_HEAD_PLAN] == plan
    config = stored["config"]
    assert config["head"] == "projected" and config["projection-dim"] == plan["projection-dim"] == 16
    assert config["batch-size"] == max(plan["site-sizes"].values())  # full batch at every site
    assert config["learning-rate"] == plan["learning-rate"] and config["num-rounds"] == plan["num-rounds"] == ROUNDS
    assert config["local-epochs"] == plan["local-steps"] == 25 and plan["steps"] == 50
    assert plan["overrides"]["learning-rate"] == {"asked": 8.0, "planned": plan["learning-rate"]}
    assert plan["public-basis"]["synthetic-images"] == SYNTHETIC_COUNT  # how many public images the basis came from


def test_a_fresh_sites_ledger_spends_exactly_the_plans_epsilon(auto_eps1):
    summary, _ = auto_eps1
    plan = _plan(summary)
    # Oracle: the plan recomputed from the public counts alone, and the accountant over each ledger.
    sizes = list(plan["site-sizes"].values())
    again = plan_dp_head(
        target_epsilon=1.0, target_delta=1e-5, site_sizes=sizes, feature_dim=32, num_classes=10, rounds=ROUNDS
    )
    assert again.noise_multiplier == plan["noise-multiplier"]
    for site in summary["sites"]:
        ledger = PrivacyLedger(Path(summary["run-dir"]) / "sites" / site / "privacy" / "ledger.jsonl").charges()
        kinds = Counter(c.kind for c in ledger)
        assert kinds == {"feature-sum": 1, "dp-sgd": ROUNDS}
        assert {c.noise_multiplier for c in ledger if c.kind == "dp-sgd"} == {plan["noise-multiplier"]}
        assert {(c.sample_rate, c.steps) for c in ledger if c.kind == "dp-sgd"} == {(1.0, 25)}
        spent = compute_epsilon([c.step for c in ledger], delta=1e-5)
        assert spent == pytest.approx(plan["epsilon"], rel=1e-9)
        assert summary["epsilon-per-site"][site] == pytest.approx(plan["epsilon"], rel=1e-9) and spent <= 1.0 + 1e-9


def test_the_sites_are_asked_their_count_once_and_a_k_dim_centre_once(auto_eps1):
    summary, app = auto_eps1
    assert app.messages[("query", k.ACTION_COUNT_EXAMPLES)] == SITES
    assert app.messages[("query", k.ACTION_FEATURE_SUM)] == SITES
    assert app.messages[("train", "")] == SITES * ROUNDS
    assert _plan(summary)["center-noise-multiplier"] is not None


def test_no_centre_query_is_sent_when_the_plan_releases_none(tmp_path):
    # At epsilon 0.2 over ~1150 examples the k-dim centre's noise norm exceeds the plan's limit (checked first).
    sizes = [383, 383, 383]
    assert (
        plan_dp_head(
            target_epsilon=0.2, target_delta=1e-5, site_sizes=sizes, feature_dim=32, num_classes=10
        ).center_noise_multiplier
        is None
    )
    summary, app = _auto_run(tmp_path / "home", tmp_path / "runs", target_epsilon=0.2)
    assert _plan(summary)["center-noise-multiplier"] is None
    assert app.messages[("query", k.ACTION_FEATURE_SUM)] == 0
    assert "synthetic images' projected features (public, no release)" in summary["progress"]
    for site in summary["sites"]:
        ledger = PrivacyLedger(Path(summary["run-dir"]) / "sites" / site / "privacy" / "ledger.jsonl").charges()
        assert {c.kind for c in ledger} == {"dp-sgd"}


def test_a_non_private_run_says_the_plans_noise_and_epsilon_are_not_its_own(tmp_path):
    summary, _ = _auto_run(tmp_path / "home", tmp_path / "runs", target_epsilon=1.0, non_private=True)
    lines = summary["progress"].splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("head-solver auto"))
    assert lines[first].startswith("head-solver auto: NON-PRIVATE run (non-private = true): the epsilon-1 plan")
    assert lines[first + 1] == f"head-solver auto: {_plan(summary)['reason']}"  # the plan it qualifies
    assert "(noise 0.00, expected noise norm 0.000)" in summary["progress"]  # the centre, sent unnoised
    assert summary["epsilon-max"] == math.inf


def test_the_projected_model_file_round_trips_through_fedtl_predict(auto_eps1, tmp_path, capsys):
    from builders import predict_images, projected_head_probs

    from fedtl.server.predict import load_model_backbone
    from fedtl.shared.data import load_dataset
    from fedtl.shared.features import extract_features

    summary, _ = auto_eps1
    model = load_model(summary["model"])
    assert model.head == "projected" and model.arrays["projection"].shape == (16, 32)
    images = load_dataset("digits").test.images[:6]
    printed = predict_images(summary["model"], images, tmp_path, capsys)
    # Oracle: the numpy maths of shared/public_basis on the stored tensors, not the torch head.
    feats = extract_features(load_model_backbone(model), images, model.preprocessing, progress=False)
    probs = projected_head_probs(model.arrays, feats)
    assert [label for label, _ in printed] == [model.label_names[i] for i in probs.argmax(1)]
    np.testing.assert_allclose([p for _, p in printed], probs.max(1), atol=1e-4)


def test_the_projected_head_computes_the_public_basis_maths():
    rng = np.random.default_rng(0)
    head = build_head("projected", 12, 3, projection_dim=4, seed=0)
    arrays = head_arrays(head)
    assert not arrays["layers.0.weight"].any() and not arrays["layers.0.bias"].any()  # starts at zero
    arrays["projection"] = (rng.normal(size=(4, 12)) * 2).astype(np.float32)  # rows longer than 1: the clip acts
    arrays["center"] = rng.normal(size=4).astype(np.float32) * 0.1
    arrays["layers.0.weight"] = rng.normal(size=(3, 4)).astype(np.float32)
    arrays["layers.0.bias"] = rng.normal(size=3).astype(np.float32)
    head.load_arrays(arrays)
    x = rng.normal(size=(20, 12))
    u = centre_features(project_features(x, arrays["projection"]), arrays["center"])
    expected = u @ arrays["layers.0.weight"].T.astype(np.float64) + arrays["layers.0.bias"]
    with torch.no_grad():
        got = head(torch.as_tensor(x, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_projected_head_needs_the_auto_solver_and_a_width_below_the_features():
    with pytest.raises(ConfigError, match=r'`head = "projected"` is the head the auto plan chooses'):
        RunConfig(head="projected", head_solver="dp-sgd", projection_dim=16)
    with pytest.raises(ConfigError, match=r"projection-dim < the feature dim 32, got 32"):
        build_head("projected", 32, 10, projection_dim=32)


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"trainable_blocks": 1}, "deeper fine-tuning"),
        ({"personalization": "finetune"}, "personalization = 'finetune'"),
        ({"head": "mlp"}, 'head = "mlp"'),
        ({"strategy": "fedadam"}, "strategy = fedadam"),
        ({"client_dp": "server"}, "client-dp = 'server'"),
        ({"backbone": "tabular"}, "backbone 'tabular' reads rows"),
    ],
)
def test_auto_runs_dp_sgd_as_configured_where_the_plan_does_not_apply(changes, why):
    cfg = RunConfig(**changes)
    assert why in fallback_reason(cfg)
    solver = AutoSolver()
    assert solver.configure(cfg) == cfg and solver.fallback == fallback_reason(cfg)


def test_auto_fixes_the_schedule_before_any_site_is_asked():
    cfg = AutoSolver().configure(RunConfig(num_rounds=3, local_epochs=1, noise_multiplier=2.0))
    # The configured rounds (a site's policy checks them at set-up), ceil(50 / 3) full-batch steps in each.
    assert (cfg.num_rounds, cfg.local_epochs, cfg.noise_multiplier, cfg.feature_centering) == (3, 17, None, False)
    assert AutoSolver().configure(RunConfig()).local_epochs == 5  # the default 10 rounds: the tuned 5 steps each


def test_the_public_basis_is_stored_once_and_a_bad_stored_file_is_recomputed(monkeypatch):
    from fedtl.server.setup import load_server_backbone
    from fedtl.server.solvers import auto

    cfg = RunConfig(backbone="tiny", projection_dim=16, image_size=32)
    backbone = load_server_backbone(cfg)
    monkeypatch.setattr(auto, "_PUBLIC_BASES", {})  # an earlier test's basis, kept in this process, is not stored here
    first = auto.public_basis(backbone, cfg)
    (stored,) = (fedtl_home() / "server-cache" / "public-basis").iterdir()
    monkeypatch.setattr(auto, "_PUBLIC_BASES", {})  # a new process: only the file remains

    def no_synthetic_inputs(*_a, **_k):
        raise AssertionError("a stored basis was recomputed")

    draw = auto.generate_synthetic_images
    monkeypatch.setattr(auto, "generate_synthetic_images", no_synthetic_inputs)
    again = auto.public_basis(backbone, cfg)
    assert all(np.array_equal(a, b) for a, b in zip(first[:2], again[:2])) and again[2] is None

    monkeypatch.setattr(auto, "generate_synthetic_images", draw)
    monkeypatch.setattr(auto, "_PUBLIC_BASES", {})
    stored.write_bytes(b"not an npz")  # torn or tampered: recomputed from the public inputs, then rewritten
    redone = auto.public_basis(backbone, cfg)
    assert all(np.array_equal(a, b) for a, b in zip(first[:2], redone[:2]))
    with np.load(stored) as data:
        assert np.array_equal(data["projection"], first[0])
    monkeypatch.setattr(auto, "_PUBLIC_BASES", {})
    wider = auto.public_basis(backbone, cfg.replace(projection_dim=8))  # another width: its own file
    assert wider[0].shape == (8, first[0].shape[1])
    assert len(list(stored.parent.iterdir())) == 2


def test_the_lab_extracts_the_public_inputs_before_its_engine_and_a_warm_run_draws_none(tmp_path, monkeypatch):
    import fedtl.shared.features as features
    import fedtl.simulations.federation as lab
    from fedtl.server.solvers import auto

    monkeypatch.setattr(auto, "_PUBLIC_BASES", {})  # an earlier test's basis, kept in this process
    passes, preparing = [], []
    extract, prepare = features.extract_features, lab.prepare_simulated_sites

    def spied_extract(*args, **kwargs):
        passes.append((kwargs.get("desc"), bool(preparing)))
        return extract(*args, **kwargs)

    def spied_prepare(*args, **kwargs):
        preparing.append(True)
        try:
            return prepare(*args, **kwargs)
        finally:
            preparing.clear()

    monkeypatch.setattr(features, "extract_features", spied_extract)
    monkeypatch.setattr(lab, "prepare_simulated_sites", spied_prepare)
    first, _ = _auto_run(tmp_path / "home", tmp_path / "runs", target_epsilon=1.0)
    # Once, in the lab's preparation (the main thread, with a bar), never again by the ServerApp.
    assert [p for p in passes if p[0] == "public synthetic inputs"] == [("public synthetic inputs", True)]

    def no_synthetic_inputs(*_a, **_k):
        raise AssertionError("a warm run drew the synthetic images")

    monkeypatch.setattr(auto, "generate_synthetic_images", no_synthetic_inputs)
    monkeypatch.setattr(auto, "_PUBLIC_BASES", {})  # a new process: only the files remain
    passes.clear()
    again, _ = _auto_run(tmp_path / "home", tmp_path / "runs", target_epsilon=1.0)
    assert passes == []  # every feature, the public ones included, read from the caches
    assert again["final"] == first["final"]
