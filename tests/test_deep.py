"""Deeper fine-tuning under DP: splits, BN -> GN, LoRA, per-sample gradients, and a real federation."""

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.validators import ModuleValidator
from PIL import Image
from torch import nn

from fedtl.client.ledger import PrivacyLedger
from fedtl.client.training import steps_per_epoch, train_model
from fedtl.server import report
from fedtl.server.model_file import load_model
from fedtl.server.predict import predict_images
from fedtl.shared import constants as k
from fedtl.shared import mechanisms
from fedtl.shared.backbones import (
    _construct,
    _freeze,
    _new_classifier,
    _to_feature_extractor,
    build_backbone,
    resolve_preprocessing,
)
from fedtl.shared.config import RunConfig
from fedtl.shared.data import load_dataset
from fedtl.shared.deep import (
    Adaptation,
    AdaptedHead,
    DepthwiseConv2d,
    adapt_backbone,
    add_lora,
    build_adapted_backbone,
    check_deep_run,
    clip_bounds,
    extract_trainable,
    prepare_trainable,
    split_backbone,
    trainable_names,
)
from fedtl.shared.errors import ConfigError, ReplyError
from fedtl.shared.features import extract_features
from fedtl.shared.heads import build_head
from fedtl.simulations import baselines as bl
from fedtl.simulations.inprocess import run_inprocess

DP_SGD = mechanisms.DP_SGD.kind

LITE = "efficientnet_lite0"


@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    """EfficientNet-Lite0's real architecture, frozen, with seeded random weights (structure tests need no ImageNet)."""
    torch.manual_seed(0)
    module = _freeze(_construct(lambda: _to_feature_extractor(LITE, _new_classifier(LITE))))
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a BN that learns or vanishes shows up
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return module


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


# --- splitting --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("blocks", [1, 2])
def test_tiny_split_composes_to_the_backbone_and_keeps_its_names(blocks):
    backbone = build_backbone("tiny")
    x = torch.randn(5, 3, 32, 32)
    expected = backbone(x)
    frozen, trainable = split_backbone("tiny", build_backbone("tiny"), blocks)
    assert torch.equal(trainable(frozen(x)), expected)
    names = set(frozen.state_dict()) | set(trainable.state_dict())
    assert names == set(backbone.state_dict()) and not set(frozen.state_dict()) & set(trainable.state_dict())


@pytest.mark.parametrize("blocks", [1, 2, 17])
def test_lite0_split_composes_to_the_backbone_and_keeps_its_names(lite0, blocks):
    x = torch.randn(2, 3, 64, 64)
    expected = lite0(x)
    frozen, trainable = split_backbone(LITE, copy.deepcopy(lite0), blocks)
    assert torch.allclose(trainable(frozen(x)), expected, rtol=0, atol=1e-6)
    assert set(frozen.state_dict()) | set(trainable.state_dict()) == set(lite0.state_dict())
    above = {name.split(".")[1] for name in trainable.state_dict() if name.startswith("_blocks.")}
    assert above == {str(i) for i in range(17 - blocks, 16)}  # the last blocks - 1 MBConv blocks + the conv stage


def test_unsupported_backbones_and_block_counts_are_config_errors():
    with pytest.raises(ConfigError, match=r"`trainable-blocks` for backbone 'tiny' must be in 1\.\.2 .*got 3"):
        split_backbone("tiny", build_backbone("tiny"), 3)
    with pytest.raises(
        ConfigError, match=r"supports the backbones tiny, efficientnet_lite0, .* got backbone 'resnet18'"
    ):
        Adaptation(trainable_blocks=1).check("resnet18")
    with pytest.raises(ConfigError, match=r"`lora-rank` = 2 .* needs trainable-blocks >= 1, got 0"):
        check_deep_run(RunConfig(backbone="tiny", lora_rank=2))
    with pytest.raises(ConfigError, match=r"`personalization` = 'finetune' .* needs personalization = 'none'"):
        check_deep_run(RunConfig(backbone="tiny", trainable_blocks=1, personalization="finetune"))
    check_deep_run(RunConfig(backbone="resnet18"))  # head only: nothing to check


# --- preparing the trainable part -------------------------------------------------------------------------


def test_prepare_trainable_turns_batchnorm_into_groupnorm_from_the_pretrained_affine(lite0):
    original = copy.deepcopy(lite0)
    _, trainable = split_backbone(LITE, copy.deepcopy(lite0), 2)
    trainable = prepare_trainable(trainable)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in trainable.modules())
    groupnorms = {name: m for name, m in trainable.named_modules() if isinstance(m, nn.GroupNorm)}
    assert set(groupnorms) == {"_blocks.15._bn0", "_blocks.15._bn1", "_blocks.15._bn2", "_bn1"}
    for name, gn in groupnorms.items():
        bn = original.get_submodule(name)
        assert gn.num_groups == math.gcd(32, bn.num_features) and gn.eps == bn.eps
        assert torch.equal(gn.weight, bn.weight) and torch.equal(gn.bias, bn.bias)
    # Static-'same' convs became plain convs computing the same function (Opacus' conv grad samplers).
    for name in ("_blocks.15._expand_conv", "_blocks.15._depthwise_conv", "_conv_head"):
        plain, padded = trainable.get_submodule(name), original.get_submodule(name)
        assert type(plain) is (DepthwiseConv2d if "depthwise" in name else nn.Conv2d)
        x = torch.randn(2, plain.in_channels, 5, 5)
        assert torch.allclose(plain(x), padded(x), rtol=0, atol=1e-5)
    assert all(p.requires_grad for p in trainable.parameters())
    assert ModuleValidator.validate(trainable.train(), strict=False) == []


@pytest.mark.parametrize("name", ["tiny", LITE])
def test_lora_starts_at_the_pretrained_function_and_trains_only_its_adapters(name, lite0):
    backbone = build_backbone("tiny") if name == "tiny" else copy.deepcopy(lite0)
    size = 32 if name == "tiny" else 64
    x = torch.randn(3, 3, size, size)
    expected = backbone(x)
    blocks = 1 if name == "tiny" else 2
    adaptation = Adaptation(blocks, lora_rank=2, lora_alpha=8.0)
    frozen, trainable = adapt_backbone(name, copy.deepcopy(backbone), adaptation)
    assert torch.allclose(trainable(frozen(x)), expected, rtol=0, atol=1e-6)  # B = 0: exactly the pretrained net
    names = trainable_names(trainable)
    assert names and all(".lora_A.default." in n or ".lora_B.default." in n for n in names)
    targets = {"2"} if name == "tiny" else {"_blocks.15._expand_conv", "_blocks.15._project_conv", "_conv_head"}
    assert {n.split(".lora_")[0] for n in names} == targets  # pointwise convs; depthwise ones left alone
    if name == LITE:  # BatchNorms stay BatchNorms: frozen, ImageNet statistics
        assert sum(isinstance(m, nn.BatchNorm2d) for m in trainable.modules()) == 4


# --- per-sample gradients ---------------------------------------------------------------------------------


def _per_sample_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of each example's loss, computed one example at a time (no Opacus)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows = []
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum").backward()
        rows.append({n: p.grad.detach().clone() for n, p in params.items()})
    return {n: torch.stack([r[n] for r in rows]) for n in params}


def _opacus_per_sample(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    gsm = GradSampleModule(model, loss_reduction="sum")
    try:
        nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
        return {n: p.grad_sample.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    finally:
        gsm._close()


class _TinyConvNet(nn.Module):
    """A tiny conv block + GroupNorm + depthwise conv + head; the padded conv is EfficientNet-Lite's (functorch)."""

    def __init__(self) -> None:
        super().__init__()
        from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding

        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(4, 8)
        self.depthwise = DepthwiseConv2d(8, 16, 3, padding=1, groups=8)  # depth multiplier 2, fedtl's sampler
        self.padded = Conv2dStaticSamePadding(8, 8, 3, stride=2, image_size=8, bias=True)  # asymmetric 'same' pad
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm(self.conv(x)))
        x = self.depthwise(x)
        x = torch.relu(self.padded(x[:, :8] + x[:, 8:]))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("lora", [False, True])
def test_opacus_per_sample_gradients_match_one_example_at_a_time(lora):
    torch.manual_seed(0)
    model = _TinyConvNet()
    if lora:  # peft's LoRA layers around the 3x3 conv and the linear layer; base weights frozen
        model = add_lora(model, 2, 4.0)
        with torch.no_grad():  # B starts at 0, which would make A's gradient 0: move it first
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_()
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    expected = _per_sample_reference(model, x, y)
    got = _opacus_per_sample(model, x, y)
    assert set(got) == set(expected) and (not lora or all("lora_" in n for n in got))
    for name in expected:
        assert torch.allclose(got[name], expected[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("adaptation", [Adaptation(1), Adaptation(1, lora_rank=2)])
def test_per_sample_gradients_of_the_adapted_tiny_backbone_and_head(adaptation):
    _, trainable = adapt_backbone("tiny", build_backbone("tiny"), adaptation)
    head = build_head("linear", 32, 10)
    head.center.normal_(0, 0.1)
    model = AdaptedHead(trainable, head).train()
    if adaptation.lora_rank:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_()
    x, y = torch.randn(4, 16, 16, 16), torch.randint(0, 10, (4,))  # activations at the cut (B, 16, 16, 16)
    expected = _per_sample_reference(model, x, y)
    got = _opacus_per_sample(model, x, y)
    for name in expected:
        assert torch.allclose(got[name], expected[name], rtol=1e-4, atol=1e-6), name


# --- a DP-SGD round changes only the unfrozen tensors ----------------------------------------------------


@pytest.mark.parametrize("name,adaptation", [("tiny", Adaptation(1)), (LITE, Adaptation(1, lora_rank=2))])
def test_a_dp_round_changes_only_the_unfrozen_tensors(name, adaptation, lite0):
    pretrained = build_backbone("tiny") if name == "tiny" else copy.deepcopy(lite0)
    before_pretrained = _snapshot(pretrained)
    frozen, trainable = adapt_backbone(name, copy.deepcopy(pretrained), adaptation)
    head = build_head("linear", 32 if name == "tiny" else 1280, 3)
    model = AdaptedHead(trainable, head)
    before_frozen, before_model = _snapshot(frozen), _snapshot(model)
    size = 32 if name == "tiny" else 64
    acts = extract_features(
        frozen,
        np.random.default_rng(0).integers(0, 256, (24, size, size, 3), dtype=np.uint8),
        resolve_preprocessing(name, size),
        device="cpu",
        progress=False,
    )
    labels = np.arange(24) % 3
    result = train_model(
        model, acts, labels, epochs=1, batch_size=8, learning_rate=0.5, max_grad_norm=1.0, noise_multiplier=1.0, seed=0
    )
    moved = {n for n, t in model.state_dict().items() if not torch.equal(t, before_model[n])}
    expected = {"head.layers.0.weight", "head.layers.0.bias"} | {"backbone." + n for n in trainable_names(trainable)}
    assert moved == expected  # every trainable tensor got noise; nothing else moved (BN statistics included)
    assert all(torch.equal(t, before_frozen[n]) for n, t in frozen.state_dict().items())
    assert all(torch.equal(t, before_pretrained[n]) for n, t in pretrained.state_dict().items())
    assert set(result.arrays) == {"layers.0.weight", "layers.0.bias", "center"} | {
        k.BACKBONE_TENSOR_PREFIX + n for n in trainable_names(trainable)
    }
    assert (result.sample_rate, result.steps) == steps_per_epoch(24, 8)


def test_per_tensor_clip_bounds_keep_the_total_norm_and_the_head_share():
    names = ["head.layers.0.weight", "head.layers.0.bias", "backbone.a", "backbone.b", "backbone.c"]
    bounds = np.array(clip_bounds(names, 2.0, head_share=0.3))
    # The sensitivity the noise is calibrated to (sigma * C) is the L2 norm of the per-tensor bounds.
    assert np.linalg.norm(bounds) == pytest.approx(2.0, rel=1e-12)
    assert np.sum(bounds[:2] ** 2) == pytest.approx(0.3 * 4.0, rel=1e-12)
    assert len(set(bounds[:2])) == 1 and len(set(bounds[2:])) == 1
    assert clip_bounds(["head.layers.0.weight"], 1.5) == [1.5]


def test_wrong_backbone_tensors_are_refused():
    _, trainable = adapt_backbone("tiny", build_backbone("tiny"), Adaptation(1))
    model = AdaptedHead(trainable, build_head("linear", 32, 10))
    arrays = model.arrays()
    arrays["backbone.2.weight"] = arrays["backbone.2.weight"][:1]
    with pytest.raises(ReplyError, match=r"tensor `backbone.2.weight` from test has shape \(1, 16, 3, 3\)"):
        model.load_arrays(arrays, source="test")
    del arrays["backbone.2.weight"]
    with pytest.raises(ReplyError, match=r"missing \['2.weight'\]"):
        model.load_arrays(arrays, source="test")


# --- a real federation -----------------------------------------------------------------------------------


def _ledger_epsilon(run_dir: Path, site: str, delta: float) -> float:
    accountant = RDPAccountant()
    for charge in PrivacyLedger(run_dir / "sites" / site / "privacy" / "ledger.jsonl").charges():
        accountant.history.append((charge.noise_multiplier, charge.sample_rate, charge.steps))
    return accountant.get_epsilon(delta=delta)


@pytest.mark.parametrize("adaptation", [Adaptation(1), Adaptation(1, lora_rank=2)], ids=["last-block", "lora"])
def test_a_federation_sends_only_trainable_tensors_and_exports_a_usable_model(adaptation, tmp_path, monkeypatch):
    sent: list[dict[str, tuple[int, ...]]] = []
    original = report.RunRecorder.screen_train

    def spy(self, server_round, msgs):
        sent.extend({n: tuple(a.shape) for n, a in m.content.array_records[k.ARRAYS].items()} for m in msgs)
        return original(self, server_round, msgs)

    monkeypatch.setattr(report.RunRecorder, "screen_train", spy)
    cfg = RunConfig(
        backbone="tiny",
        image_size=16,  # digits are 8x8: 16 px keeps every activation map small and the test fast
        num_rounds=2,
        local_epochs=1,
        out=str(tmp_path / "runs"),
        seed=3,
        trainable_blocks=adaptation.trainable_blocks,
        lora_rank=adaptation.lora_rank,
    )
    summary = run_inprocess(cfg, num_sites=2)
    run_dir = Path(summary["run-dir"])

    _, trainable = adapt_backbone("tiny", build_backbone("tiny"), adaptation)
    backbone_shapes = {k.BACKBONE_TENSOR_PREFIX + n: tuple(v.shape) for n, v in extract_trainable(trainable).items()}
    head_shapes = {"layers.0.weight": (10, 32), "layers.0.bias": (10,), "center": (32,)}
    assert len(sent) == 4 and all(s == {**head_shapes, **backbone_shapes} for s in sent)
    assert summary["rejected-replies"] == []

    lab = bl.load_lab_federation(cfg, 2)
    for site in lab.sites:
        charges = [
            c
            for c in PrivacyLedger(run_dir / "sites" / site.name / "privacy" / "ledger.jsonl").charges()
            if c.kind == DP_SGD
        ]
        q, per_epoch = steps_per_epoch(len(site.train_labels), cfg.batch_size)
        assert [(c.sample_rate, c.steps) for c in charges] == [(q, per_epoch)] * 2
        eps = summary["epsilon-per-site"][site.name]
        assert eps == pytest.approx(_ledger_epsilon(run_dir, site.name, cfg.target_delta), rel=1e-9)
        assert eps <= cfg.target_epsilon

    model = load_model(summary["model"])
    assert set(model.changed_tensors) == {n[len(k.BACKBONE_TENSOR_PREFIX) :] for n in backbone_shapes}
    assert model.adaptation == Adaptation.of(cfg)
    card = (run_dir / "model.md").read_text()
    assert all(f"`{name}`" in card for name in model.changed_tensors)

    # predict = pretrained backbone (fingerprint checked) + changed tensors + head; checked against an
    # independent rebuild, and the server's central accuracy against the model file's own predictions.
    test = load_dataset("digits", seed=cfg.seed, test_fraction=cfg.test_fraction).test
    rebuilt = build_adapted_backbone(
        "tiny",
        build_backbone("tiny"),
        adaptation,
        {n: model.arrays[k.BACKBONE_TENSOR_PREFIX + n] for n in model.changed_tensors},
    )
    head = model.build_head()
    pre = resolve_preprocessing("tiny", cfg.image_size)
    with torch.no_grad():
        probs = torch.softmax(
            head(torch.as_tensor(extract_features(rebuilt, test.images, pre, device="cpu", progress=False))), dim=1
        ).numpy()
    assert float(np.mean(probs.argmax(1) == test.labels)) == pytest.approx(summary["final"]["central-accuracy"])
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"digit{i}.png")
        Image.fromarray(test.images[i]).save(paths[-1])
    predictions = predict_images(summary["model"], paths, device="cpu")
    for i, p in enumerate(predictions):
        best = int(np.argmax(probs[i]))
        assert p.label == model.label_names[best] and p.probability == pytest.approx(float(probs[i, best]), rel=1e-5)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 1, 2]
