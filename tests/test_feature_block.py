"""feature-block: a head-only run reads the frozen EfficientNet-Lite features after an earlier MBConv block."""

import json
import math

import numpy as np
import pytest
import torch

from fedtl.server.model_file import load_model, model_card
from fedtl.server.solvers.auto import resolve_feature_block
from fedtl.shared.backbones import build_backbone, resolve_preprocessing
from fedtl.shared.config import RunConfig
from fedtl.shared.cut import Cut
from fedtl.shared.data import load_dataset
from fedtl.shared.deep import (
    FINAL_FEATURES,
    MIN_FEATURE_GRID,
    Adaptation,
    check_deep_run,
    choose_feature_block,
    read_after_block,
)
from fedtl.shared.errors import ConfigError
from fedtl.shared.features import extract_features
from fedtl.simulations.inprocess import run_inprocess

LITE = "efficientnet_lite0"


def _block_outputs(module: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Return every MBConv block's output of the full network's own forward (the oracle), via forward hooks."""
    outputs: list[torch.Tensor] = []
    handles = [block.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for block in module._blocks]
    try:
        with torch.inference_mode():
            module(images)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def test_the_features_after_a_block_are_the_full_networks_block_output_pooled():
    module = build_backbone(LITE)
    pre = resolve_preprocessing(LITE, 64)
    images = load_dataset("digits").test.images[:8]
    expected = _block_outputs(module, pre.apply(images))[10].mean((2, 3)).numpy()  # (8, 112)
    got = extract_features(read_after_block(LITE, module, 10), images, pre, device="cpu", progress=False)
    assert got.shape == (8, 112)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # The reader shares the network's modules and changes none: the full network still gives its own features.
    assert extract_features(module, images, pre, device="cpu", progress=False).shape == (8, 1280)


@pytest.mark.parametrize("size, block, channels", [(32, 4, 40), (64, 10, 112), (224, 15, 320)])
def test_the_rule_is_the_last_block_with_an_output_of_at_least_4_px_a_side(size, block, channels):
    outputs = _block_outputs(build_backbone(LITE), torch.zeros(1, 3, size, size))
    sides = [int(out.shape[-1]) for out in outputs]
    assert choose_feature_block(LITE, size) == max(i for i, s in enumerate(sides) if s >= MIN_FEATURE_GRID) == block
    cut = Cut(LITE, "fp", resolve_preprocessing(LITE, size), Adaptation(feature_block=block))
    assert cut.feature_dim == int(outputs[block].shape[1]) == channels


@pytest.mark.parametrize("name", ["tiny", "resnet18", "minilm_l6", "tabular"])
def test_backbones_without_mbconv_blocks_read_their_own_features(name):
    assert choose_feature_block(name, 224) == FINAL_FEATURES


def test_the_block_is_resolved_from_the_public_config_alone():
    base = RunConfig(backbone=LITE, image_size=64)
    assert base.feature_block is None  # "auto"
    assert resolve_feature_block(base).feature_block == 10
    assert resolve_feature_block(base.replace(image_size=0)).feature_block == 15  # the backbone's own 224 px
    assert resolve_feature_block(base.replace(head_solver="dp-sgd")).feature_block == FINAL_FEATURES
    assert resolve_feature_block(base.replace(head="mlp")).feature_block == FINAL_FEATURES  # auto's fallback
    assert resolve_feature_block(base.replace(backbone="tiny", image_size=32)).feature_block == FINAL_FEATURES
    assert resolve_feature_block(base.replace(feature_block=12)).feature_block == 12  # a set value is kept
    assert resolve_feature_block(base.replace(feature_block=-1)).feature_block == FINAL_FEATURES
    assert RunConfig.from_mapping({"feature-block": "auto"}).feature_block is None
    assert RunConfig.from_mapping({"feature-block": 8}).to_mapping()["feature-block"] == 8


@pytest.mark.parametrize(
    "value, match",
    [
        ("final", r'`feature-block` must be an integer \(-1: the backbone\'s own features\) or "auto", got \'final\''),
        (1.5, r"`feature-block` must be an integer .* got 1\.5"),
        (-2, r"`feature-block` must be -1 \(the backbone's own features\), a block number >= 0 or \"auto\", got -2"),
    ],
)
def test_a_malformed_feature_block_is_a_config_error(value, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_mapping({"feature-block": value})


def test_a_block_the_backbone_lacks_or_beside_deeper_fine_tuning_is_refused():
    with pytest.raises(
        ConfigError, match=r"for backbone 'efficientnet_lite0' must be an MBConv block in 0\.\.15.*got 16"
    ):
        check_deep_run(RunConfig(feature_block=16))
    with pytest.raises(ConfigError, match=r"supports the backbones efficientnet_lite0, .*got backbone 'resnet18'"):
        check_deep_run(RunConfig(backbone="resnet18", feature_block=3))
    with pytest.raises(ConfigError, match=r"also trains backbone blocks \(last 1 blocks\); set feature-block = -1"):
        check_deep_run(RunConfig(feature_block=3, trainable_blocks=1))
    check_deep_run(RunConfig(feature_block=3))  # a head on block 3's features: fine


def test_each_block_has_its_own_cache_key_and_the_final_features_keep_theirs():
    pre = resolve_preprocessing(LITE, 64)
    final, b9, b10 = (Cut(LITE, "fp", pre, Adaptation(feature_block=b)) for b in (FINAL_FEATURES, 9, 10))
    assert final.fingerprint == "fp"  # feature caches written before feature-block existed stay valid
    assert len({final.fingerprint, b9.fingerprint, b10.fingerprint}) == 3
    assert b10.at_end and b10.at_end_cut() == b10  # the centre and closed-form releases read the same features
    assert final.feature_dim == 1280 and b9.feature_dim == b10.feature_dim == 112


@pytest.fixture(scope="module")
def block_run(tmp_path_factory):
    """An auto federation of EfficientNet-Lite0 at 32 px (the rule: block 4, 40 features), 3 sites, 2 rounds."""
    home, out = tmp_path_factory.mktemp("home"), tmp_path_factory.mktemp("runs")
    cfg = RunConfig(
        image_size=32, num_rounds=2, target_epsilon=8.0, federated_evaluation=False, device="cpu", out=str(out)
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDTL_HOME", str(home))
        return run_inprocess(cfg, num_sites=3)


def test_an_auto_run_reads_the_rules_block_records_it_and_predict_reads_it_too(block_run, tmp_path, capsys):
    from builders import predict_images, projected_head_probs

    from fedtl.server.predict import load_model_backbone

    run_dir = block_run["model"].rsplit("/", 1)[0]
    with open(f"{run_dir}/config.json") as fh:
        assert json.load(fh)["config"]["feature-block"] == 4
    model = load_model(block_run["model"])
    assert model.feature_block == 4 and model.feature_dim == 40
    assert model.arrays["projection"].shape[1] == 40
    assert "pooled output of MBConv block 4" in model_card(model)
    assert block_run["final"]["central-accuracy"] > 0.5  # 10 classes: chance is 0.1
    images = load_dataset("digits").test.images[:5]
    printed = predict_images(block_run["model"], images, tmp_path, capsys)
    # Oracle: block 4's pooled output of the full network, through the stored tensors' numpy maths.
    feats = _block_outputs(load_model_backbone(model), model.preprocessing.apply(images))[4].mean((2, 3)).numpy()
    probs = projected_head_probs(model.arrays, feats)
    assert [label for label, _ in printed] == [model.label_names[i] for i in probs.argmax(1)]
    np.testing.assert_allclose([p for _, p in printed], probs.max(1), atol=1e-3)
    assert math.isfinite(block_run["epsilon-max"]) and block_run["epsilon-max"] <= 8.0 + 1e-9


def test_a_site_refuses_a_feature_block_its_backbone_lacks_before_anything_is_charged(tmp_path, monkeypatch):
    from builders import round_settings

    from fedtl.client.centering import feature_sum_round
    from fedtl.client.site import resolve_site
    from fedtl.client.solvers.dp_sgd import train_round
    from fedtl.shared.backbones import backbone_state_dict, fingerprint_state_dict
    from fedtl.shared.heads import build_head, head_arrays
    from fedtl.shared.protocol import SimulationSettings

    monkeypatch.setenv("FEDTL_SIMULATED_SITES", "1")
    sim = SimulationSettings("digits", "iid", 0, 0.2, 0.2, "", str(tmp_path / "state"), str(tmp_path / "cache"))
    site = resolve_site({"partition-id": 0, "num-partitions": 4}, sim)
    state = backbone_state_dict(build_backbone("tiny"))
    fingerprint = site.backbones.install("tiny", fingerprint_state_dict(state), state).stem
    settings = round_settings(fingerprint, feature_block=3)  # as a server could send it; tiny has no MBConv blocks
    refusal = r"`feature-block` = 3: reading the features after an earlier block supports the backbones"
    with pytest.raises(ConfigError, match=refusal):
        train_round(site, settings, head_arrays(build_head("linear", 32, 10)), server_round=1)
    with pytest.raises(ConfigError, match=refusal):
        feature_sum_round(site, settings, noise_multiplier=4.0)
    assert site.ledger.charges() == []
