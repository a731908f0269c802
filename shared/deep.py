"""Deeper fine-tuning under DP: cut a backbone before its last blocks, make them Opacus-ready, or add LoRA adapters.

Torch, peft and Opacus only; no Flower. A site runs the frozen part once and caches its activations at the cut,
then DP-SGD trains [trainable part + head] on them (client/deep_training.py). Tensor names are the
backbone's own (`_blocks.15._project_conv.weight`), so the model file can say which pretrained tensors
changed; on the wire they carry the prefix `backbone.` (constants.BACKBONE_TENSOR_PREFIX).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from opacus.grad_sample import register_grad_sampler
from opacus.validators import ModuleValidator
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fedtl.shared.backbones import new_lite
from fedtl.shared.constants import BACKBONE_TENSOR_PREFIX
from fedtl.shared.errors import BackboneError, ConfigError, ReplyError
from fedtl.shared.heads import Head, check_incoming_tensor, load_head_arrays

DEEP_FORMAT = 1  # bump when a split, the BN -> GN recipe or the LoRA targets change (activation cache keys)

# Blocks a site may unfreeze, counted from the top. EfficientNet-Lite: its MBConv blocks (16 in lite0, 21 in
# lite1 and lite2) and, last, the final 1x1 conv stage (`_conv_head` + `_bn1` + ReLU6), so k = 1 trains that
# stage alone; the stem never trains. tiny: its two (conv + ReLU) blocks.
BLOCK_COUNTS = {"tiny": 2, "efficientnet_lite0": 17, "efficientnet_lite1": 22, "efficientnet_lite2": 22}
LITE_BACKBONES = tuple(name for name in BLOCK_COUNTS if name != "tiny")  # the backbones with MBConv blocks


# Where a head-only run reads the frozen backbone (`feature-block`): FINAL_FEATURES is the backbone's own pooled
# features; 0..n-1 the average-pooled output of EfficientNet-Lite's MBConv block of that index (the blocks above
# it and the 1x1 conv stage are not run). The auto plan's rule is `choose_feature_block`.
FINAL_FEATURES = -1
# The rule: the last MBConv block whose output is at least MIN_FEATURE_GRID px a side. Chosen on digits only
# (EfficientNet-Lite0, 5 iid sites, the auto plan at epsilon 1 / 3 / 8, seeds 0-2), scored on the sites' pooled
# local test splits, every block 6..15 and the final features compared at 64 and at 224 px
# (benchmarks/dp_heads.py --feature-blocks): at 64 px blocks 8-10 (4 x 4 outputs) were best (block 10: 0.79 / 0.90
# / 0.93 against the final features' 0.65 / 0.81 / 0.86); at 224 px blocks 11-14 were best at epsilon 3 and 8 and
# the final features at 1 (block 15, the rule's: 0.63 / 0.82 / 0.88 against 0.66 / 0.79 / 0.85). No simpler rule
# was better at both sizes. The 1x1 conv stage that makes the final 1280 features feeds ImageNet's classifier, the
# most specialised part of the network (Evci et al. 2022, "Head2Toe: Utilizing Intermediate Representations for
# Better Transfer Learning").
MIN_FEATURE_GRID = 4


@dataclass(frozen=True)
class Adaptation:
    """How deep a site trains: the last `trainable_blocks` blocks, fully or through LoRA adapters of `lora_rank`.

    A head-only run (0 and 0) may instead read the frozen features after an earlier block: `feature_block`.
    """

    trainable_blocks: int = 0
    lora_rank: int = 0
    lora_alpha: float = 16.0
    feature_block: int = FINAL_FEATURES

    @classmethod
    def of(cls, settings: Any) -> Adaptation:
        """Return the adaptation a RunConfig, RoundSettings or AdaptedModel describes (same field names).

        A RunConfig's `feature-block` "auto" (None) reads as FINAL_FEATURES here: the server and the lab resolve it
        (server/solvers/auto.resolve_feature_block) before they build a cut or tell a site, and a site only ever
        receives a resolved block (its RoundSettings field is an int).
        """
        feature_block = getattr(settings, "feature_block", FINAL_FEATURES)
        if feature_block is None:
            feature_block = FINAL_FEATURES
        return cls(
            trainable_blocks=int(getattr(settings, "trainable_blocks", 0)),
            lora_rank=int(getattr(settings, "lora_rank", 0)),
            lora_alpha=float(getattr(settings, "lora_alpha", 16.0)),
            feature_block=feature_block,
        )

    def head_only(self) -> Adaptation:
        """Return the head-only adaptation that reads the same features (nothing of the backbone trains)."""
        return Adaptation(feature_block=self.feature_block)

    @property
    def enabled(self) -> bool:
        """Return True when anything beyond the head trains (0 and 0: head only, on cached features)."""
        return self.trainable_blocks > 0 or self.lora_rank > 0

    def describe(self) -> str:
        """Return a short human description, e.g. 'last 2 blocks' or 'LoRA rank 4 (alpha 16) in the last 1 blocks'."""
        if self.feature_block != FINAL_FEATURES:
            return f"head only, on the features after block {self.feature_block}"
        if not self.enabled:
            return "head only"
        return self.describe_training()

    def describe_training(self) -> str:
        """Return what trains beyond the head: 'last 2 blocks', 'LoRA rank 4 (alpha 16) in the last 1 blocks'."""
        if self.lora_rank > 0:
            return f"LoRA rank {self.lora_rank} (alpha {self.lora_alpha:g}) in the last {self.trainable_blocks} blocks"
        return f"last {self.trainable_blocks} blocks"

    def check(self, backbone_name: str) -> None:
        """Raise ConfigError when this adaptation does not fit backbone `backbone_name`."""
        if self.feature_block != FINAL_FEATURES:
            check_feature_block(backbone_name, self.feature_block)
            if self.enabled:
                raise ConfigError(
                    f"`feature-block` = {self.feature_block} reads the frozen features after that block for a head "
                    f"alone, but the run also trains backbone blocks ({self.describe_training()}); set "
                    "feature-block = -1 (the backbone's own features) or trainable-blocks = 0 and lora-rank = 0"
                )
        if not self.enabled:
            return
        if self.lora_rank > 0 and self.trainable_blocks == 0:
            raise ConfigError(
                f"`lora-rank` = {self.lora_rank} adds LoRA adapters to the last `trainable-blocks` blocks, so it "
                "needs trainable-blocks >= 1, got 0; set trainable-blocks (e.g. 1) or lora-rank = 0"
            )
        if self.lora_alpha <= 0 or not math.isfinite(self.lora_alpha):
            raise ConfigError(f"`lora-alpha` must be a finite number > 0, got {self.lora_alpha}")
        check_trainable_blocks(backbone_name, self.trainable_blocks)


def check_deep_run(settings: Any) -> None:
    """Raise ConfigError when a RunConfig or RoundSettings asks for deeper fine-tuning with something it excludes.

    It also checks the feature block a head-only run reads (`Adaptation.check`).

    The personalisation modes keep or finetune a head alone on cached features, so they need
    trainable-blocks = 0 and lora-rank = 0 (RunConfig itself refuses the closed-form head solver with them).
    """
    adaptation = Adaptation.of(settings)
    name = getattr(settings, "backbone", None) or getattr(settings, "backbone_name", "")
    adaptation.check(name)
    if not adaptation.enabled:
        return
    for key, allowed in (("personalization", "none"),):
        value = getattr(settings, key, allowed)
        if value != allowed:
            raise ConfigError(
                f"`{key.replace('_', '-')}` = {value!r} works on the frozen backbone's features only; deeper "
                f"fine-tuning ({adaptation.describe()}) needs {key.replace('_', '-')} = {allowed!r}, or set "
                "trainable-blocks = 0 and lora-rank = 0"
            )


def check_trainable_blocks(name: str, trainable_blocks: int) -> None:
    """Raise ConfigError when backbone `name` cannot unfreeze `trainable_blocks` blocks."""
    if name not in BLOCK_COUNTS:
        raise ConfigError(
            f"`trainable-blocks` = {trainable_blocks}: deeper fine-tuning supports the backbones "
            f"{', '.join(BLOCK_COUNTS)}, got backbone {name!r}; use one of these or trainable-blocks = 0"
        )
    count = BLOCK_COUNTS[name]
    if (
        isinstance(trainable_blocks, bool)
        or not isinstance(trainable_blocks, int)
        or not 1 <= trainable_blocks <= count
    ):
        raise ConfigError(
            f"`trainable-blocks` for backbone {name!r} must be in 1..{count} (0: head only), got {trainable_blocks!r}"
        )


# DP-SGD recipe for [trainable blocks + head] (client/deep_training.train_deep). A backbone block's per-example
# gradient is ~10x the head's (measured: median 13.4 vs 1.3 on `tiny`, one block), so one flat clip at C would
# leave the head ~1/10 of its signal under the same noise. Clipping is per tensor instead (Opacus "per_layer",
# McMahan et al. 2018, "A General Approach to Adding Differential Privacy to Iterative Training Procedures"):
# the head's tensors share HEAD_CLIP_SHARE of C^2, the backbone's the rest, each split evenly over its tensors,
# so the bounds' L2 norm is still C and the noise std sigma * C (the accounting is unchanged). The isotropic
# noise lands on every backbone coordinate too, so the backbone steps at BACKBONE_LR_FACTOR x learning-rate
# (fedtl's head learning rate, ~8, is sized for unit-norm features and would wreck conv weights).
HEAD_CLIP_SHARE = 0.5
BACKBONE_LR_FACTOR = 0.01


def clip_bounds(names: list[str], max_grad_norm: float, *, head_share: float = HEAD_CLIP_SHARE) -> list[float]:
    """Return per-tensor clipping bounds for AdaptedHead parameter `names` whose L2 norm is `max_grad_norm`.

    Head tensors (`head.` names) share `head_share` of max_grad_norm^2 evenly, backbone tensors the rest
    (all of it goes to one group when the other is empty).
    """
    heads = [n for n in names if n.startswith("head.")]
    share = head_share if heads and len(heads) < len(names) else (1.0 if heads else 0.0)
    per_head = share / len(heads) if heads else 0.0
    per_backbone = (1.0 - share) / (len(names) - len(heads)) if len(names) > len(heads) else 0.0
    return [max_grad_norm * math.sqrt(per_head if n in heads else per_backbone) for n in names]


def cut_fingerprint(backbone_fingerprint: str, name: str, trainable_blocks: int) -> str:
    """Return the fingerprint of the frozen part below the cut: cache key of its activations."""
    payload = f"{DEEP_FORMAT}/{name}/{backbone_fingerprint}/cut-before-last-{trainable_blocks}"
    return hashlib.sha256(payload.encode()).hexdigest()


def feature_block_fingerprint(backbone_fingerprint: str, name: str, feature_block: int) -> str:
    """Return the fingerprint of the backbone read after MBConv block `feature_block`: cache key of its features."""
    payload = f"{DEEP_FORMAT}/{name}/{backbone_fingerprint}/features-after-block-{feature_block}"
    return hashlib.sha256(payload.encode()).hexdigest()


# --- reading the features after an earlier block (feature-block) -----------------------------------------


def check_feature_block(name: str, feature_block: int) -> None:
    """Raise ConfigError when backbone `name` has no MBConv block `feature_block` to read features after."""
    if name not in LITE_BACKBONES:
        raise ConfigError(
            f"`feature-block` = {feature_block!r}: reading the features after an earlier block supports the "
            f"backbones {', '.join(LITE_BACKBONES)}, got backbone {name!r}; use one of "
            "these or feature-block = -1 (the backbone's own features)"
        )
    count = BLOCK_COUNTS[name] - 1  # the MBConv blocks; the last unit is the 1x1 conv stage of the final features
    if isinstance(feature_block, bool) or not isinstance(feature_block, int) or not 0 <= feature_block < count:
        raise ConfigError(
            f"`feature-block` for backbone {name!r} must be an MBConv block in 0..{count - 1}, or -1 for the "
            f"backbone's own features, got {feature_block!r}"
        )


@lru_cache(maxsize=None)
def lite_block_outputs(name: str, image_size: int) -> tuple[tuple[int, int], ...]:
    """Return (channels, side in px) of every MBConv block's output of EfficientNet-Lite `name` at `image_size` px.

    Measured on one black image through the architecture (random weights: shapes only), so the static 'same'
    padding's rounding is the network's own.
    """
    module = new_lite(name).eval()
    shapes: list[tuple[int, int]] = []
    x = torch.zeros(1, 3, image_size, image_size)
    with torch.no_grad():
        x = module._swish(module._bn0(module._conv_stem(x)))
        for block in module._blocks:
            x = block(x)
            shapes.append((int(x.shape[1]), int(x.shape[-1])))
    return tuple(shapes)


def choose_feature_block(name: str, image_size: int) -> int:
    """Return the auto plan's feature block: the last MBConv block whose output is >= MIN_FEATURE_GRID px a side.

    A function of the public architecture and image size only; FINAL_FEATURES for backbones without MBConv blocks
    (torchvision's, texts, tables, tiny) and when no block's output is that large.
    """
    if name not in LITE_BACKBONES:
        return FINAL_FEATURES
    fits = [i for i, (_, side) in enumerate(lite_block_outputs(name, image_size)) if side >= MIN_FEATURE_GRID]
    return fits[-1] if fits else FINAL_FEATURES


def feature_block_dim(name: str, image_size: int, feature_block: int) -> int:
    """Return the width of the features read after MBConv block `feature_block` (its output channels)."""
    check_feature_block(name, feature_block)
    return lite_block_outputs(name, image_size)[feature_block][0]


# --- splitting ---------------------------------------------------------------------------------------


class _LiteFront(nn.Module):
    """EfficientNet-Lite below the cut: stem, then its first MBConv blocks; keeps the backbone's tensor names."""

    def __init__(self, backbone: nn.Module, blocks: range) -> None:
        super().__init__()
        self._conv_stem = backbone._conv_stem
        self._bn0 = backbone._bn0
        self._swish = backbone._swish
        self._blocks = nn.ModuleDict({str(i): backbone._blocks[i] for i in blocks})

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, C, H, W)
        x = self._swish(self._bn0(self._conv_stem(x)))
        for block in self._blocks.values():
            # No drop connect (stochastic depth): the pretrained forward in eval() has none either.
            x = block(x)
        return x


class _LiteFeatures(_LiteFront):
    """EfficientNet-Lite read after one MBConv block: the stem and the blocks up to it, average-pooled."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, C)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(super().forward(x), 1), 1)


def read_after_block(name: str, module: nn.Module, feature_block: int) -> nn.Module:
    """Return the frozen `module` cut after MBConv block `feature_block`: (B, 3, S, S) -> (B, C) pooled, in eval().

    It shares `module`'s submodules (nothing is copied or changed); the blocks above are not run.

    Raises:
        ConfigError: see `check_feature_block`.
    """
    check_feature_block(name, feature_block)
    return _LiteFeatures(module, range(feature_block + 1)).eval()


class _LiteBack(nn.Module):
    """EfficientNet-Lite above the cut: its last MBConv blocks, the 1x1 conv stage and average pooling."""

    def __init__(self, backbone: nn.Module, blocks: range) -> None:
        super().__init__()
        self._blocks = nn.ModuleDict({str(i): backbone._blocks[i] for i in blocks})
        self._conv_head = backbone._conv_head
        self._bn1 = backbone._bn1
        self._swish = backbone._swish
        self._avg_pooling = backbone._avg_pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 1280)
        for block in self._blocks.values():
            x = block(x)
        x = self._swish(self._bn1(self._conv_head(x)))  # (B, 1280, H, W)
        return torch.flatten(self._avg_pooling(x), 1)


def split_backbone(name: str, module: nn.Module, trainable_blocks: int) -> tuple[nn.Module, nn.Module]:
    """Return (frozen_part, trainable_part) with trainable_part(frozen_part(x)) == module(x).

    Both parts share `module`'s submodules and keep its tensor names, so the union of their state dicts
    is `module`'s. The trainable part holds the last `trainable_blocks` blocks (BLOCK_COUNTS) and the
    pooling; neither part is changed here (see `prepare_trainable`, `add_lora`).

    Raises:
        ConfigError: the backbone is not supported or `trainable_blocks` is outside 1..its block count.
    """
    check_trainable_blocks(name, trainable_blocks)
    count = BLOCK_COUNTS[name]
    if name == "tiny":
        children = list(module.named_children())  # conv, relu, conv, relu, pool, flatten
        cut = 2 * (count - trainable_blocks)
        return nn.Sequential(OrderedDict(children[:cut])), nn.Sequential(OrderedDict(children[cut:]))
    # EfficientNet-Lite: unit i < len(_blocks) is MBConv block i, the last unit the 1x1 conv stage (always above).
    if len(module._blocks) + 1 != count:
        raise BackboneError(f"backbone {name!r} has {len(module._blocks)} MBConv blocks, expected {count - 1}")
    first = count - trainable_blocks
    return _LiteFront(module, range(first)), _LiteBack(module, range(first, len(module._blocks)))


# --- making the trainable part DP-SGD-ready -----------------------------------------------------------


def _batchnorm_to_groupnorm(bn: _BatchNorm) -> nn.GroupNorm:
    """Return a GroupNorm over bn's channels whose per-channel affine starts at bn's pretrained weight and bias.

    Group Normalization (Wu & He 2018, "Group Normalization") with gcd(32, C) groups, as Opacus' own fixer
    picks. Its statistics differ from the BatchNorm it replaces: each example is normalised by the mean
    and variance of its own channel groups, not by the ImageNet running statistics, so the adapted
    block computes a different function from the first step on; copying gamma and beta keeps the
    pretrained per-channel scale and shift, and training adapts them.
    """
    gn = nn.GroupNorm(math.gcd(32, bn.num_features), bn.num_features, eps=bn.eps, affine=bn.affine)
    if bn.affine:
        with torch.no_grad():
            gn.weight.copy_(bn.weight)
            gn.bias.copy_(bn.bias)
    return gn.to(next(bn.buffers()).device if list(bn.buffers()) else "cpu")


class DepthwiseConv2d(nn.Conv2d):
    """An nn.Conv2d with groups == in_channels, given its own per-sample gradient (`_depthwise_grad_sample`)."""


@register_grad_sampler(DepthwiseConv2d)
def _depthwise_grad_sample(
    layer: DepthwiseConv2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Return per-sample gradients of a depthwise conv in O(B * C * k^2 * L) memory.

    Opacus' generic conv sampler forms (B, C_out, C_in * k^2) before keeping the diagonal groups: 48 MB per
    example for a 1152-channel 3x3 depthwise conv (3.4 GB at batch 64, measured). Here each channel's
    gradient is the product of its own backprops (B, C, m, L) with its own unfolded inputs (B, C, k^2, L).
    """
    x = activations[0].to(backprops.dtype)  # (B, C, H, W)
    n, channels = x.shape[0], layer.in_channels
    kk = layer.kernel_size[0] * layer.kernel_size[1]
    out: dict[nn.Parameter, torch.Tensor] = {}
    cols = torch.nn.functional.unfold(
        x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride
    ).view(n, channels, kk, -1)  # (B, C, k^2, L)
    grads = backprops.reshape(n, channels, layer.out_channels // channels, -1)  # (B, C, m, L)
    if layer.weight.requires_grad:
        out[layer.weight] = torch.einsum("ncml,nckl->ncmk", grads, cols).reshape(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.reshape(n, layer.out_channels, -1).sum(dim=2)
    return out


def _plain_conv(conv: nn.Conv2d) -> nn.Conv2d | None:
    """Return an nn.Conv2d computing exactly what a static-'same'-padding conv computes, or None if none can.

    EfficientNet-Lite's Conv2dStaticSamePadding pads with a ZeroPad2d before F.conv2d; when that padding
    is symmetric (always for 1x1 convs and stride-1 convs) a plain nn.Conv2d with the same padding is the
    same function. Opacus has a grad sampler for nn.Conv2d only (exact type), and peft rebuilds adapters
    with type(base_layer)(...), which the padded subclass does not accept. Depthwise convs become
    DepthwiseConv2d, whose per-sample gradient is cheap.
    """
    pad = getattr(conv, "static_padding", None)
    if pad is None:
        return None
    if isinstance(pad, nn.ZeroPad2d):
        left, right, top, bottom = pad.padding
        if left != right or top != bottom:
            return None
        padding = (top, left)
    elif type(pad).__name__ == "Identity":
        padding = (0, 0)
    else:
        return None
    depthwise = conv.groups > 1 and conv.groups == conv.in_channels
    plain = (DepthwiseConv2d if depthwise else nn.Conv2d)(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
    ).to(conv.weight.device)
    with torch.no_grad():
        plain.weight.copy_(conv.weight)
        if conv.bias is not None:
            plain.bias.copy_(conv.bias)
    plain.weight.requires_grad_(conv.weight.requires_grad)
    if conv.bias is not None:
        plain.bias.requires_grad_(conv.bias.requires_grad)
    return plain


def _replace_modules(module: nn.Module, make) -> nn.Module:  # type: ignore[no-untyped-def]
    """Replace, depth first, every submodule m for which make(m) is not None; return the (new) root."""
    for name, child in list(module.named_children()):
        setattr(module, name, _replace_modules(child, make))
    replacement = make(module)
    return module if replacement is None else replacement


def _validate_for_opacus(module: nn.Module) -> None:
    """Run Opacus' ModuleValidator on `module` in training mode; raise BackboneError listing its complaints."""
    was_training = module.training
    module.train()
    try:
        errors = ModuleValidator.validate(module, strict=False)
    finally:
        module.train(was_training)
    if errors:
        raise BackboneError(f"the trainable part is not Opacus-compatible after preparation: {errors[:3]}")


def prepare_trainable(module: nn.Module) -> nn.Module:
    """Make `module` trainable under Opacus DP-SGD, in place, and return it (a new object only if it was a BatchNorm).

    Every BatchNorm becomes a GroupNorm initialised from its pretrained affine (`_batchnorm_to_groupnorm`):
    BatchNorm mixes the examples of a batch, which per-example clipping cannot bound, so Opacus
    forbids it. Static-'same'-padding convs become plain nn.Conv2d where exact (`_plain_conv`); the
    others keep their class and get per-sample gradients from Opacus' functorch fallback. In-place
    activations are switched off (Opacus' backward hooks need their inputs intact). Every parameter
    requires grad. Checked with opacus.validators.ModuleValidator.

    Raises:
        BackboneError: Opacus' validator still rejects the module.
    """
    module = _replace_modules(
        module, lambda m: _batchnorm_to_groupnorm(m) if isinstance(m, _BatchNorm) else _plain_conv(m)
    )
    for sub in module.modules():
        if hasattr(sub, "inplace") and isinstance(sub.inplace, bool):
            sub.inplace = False
    for p in module.parameters():
        p.requires_grad_(True)
    _validate_for_opacus(module)
    return module


def lora_targets(module: nn.Module) -> list[str]:
    """Return the names of the layers `add_lora` adapts: every nn.Conv2d with groups == 1 and every nn.Linear.

    In EfficientNet-Lite's blocks these are the pointwise (1x1) expand and project convs and the 1x1 conv
    stage; depthwise convs (groups = channels) are left alone, as peft supports LoRA there only for ranks
    divisible by the groups. In `tiny` it is the 3x3 conv of each block.
    """
    return [
        name
        for name, m in module.named_modules()
        if name and ((type(m) is nn.Conv2d and m.groups == 1) or type(m) is nn.Linear)
    ]


def add_lora(module: nn.Module, rank: int, alpha: float, *, seed: int = 0) -> nn.Module:
    """Freeze `module` and add LoRA adapters (peft) of `rank` to its `lora_targets`, in place; return it.

    LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") learns W + (alpha / r) B A
    with B (out x r) starting at zero, so at the first step the adapted module computes exactly the
    pretrained function. Only A and B train; the base weights, and the BatchNorms with their ImageNet
    running statistics, stay frozen (the caller keeps those BatchNorms in eval(), where each is a
    fixed per-channel affine map that mixes no examples, so Opacus accepts them: it validates
    trainable layers only). Static-'same'-padding convs become plain nn.Conv2d first (`_plain_conv`).
    A is drawn from torch's generator seeded with `seed` (peft's Kaiming-uniform init), so every
    process builds the same adapters.

    Raises:
        ConfigError: `rank` < 1, or the module has no layer LoRA can adapt.
        BackboneError: Opacus' validator rejects the adapted module.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"`lora-rank` must be an int >= 1 to add adapters, got {rank!r}")
    for p in module.parameters():
        p.requires_grad_(False)
    module = _replace_modules(module, lambda m: _plain_conv(m) if not isinstance(m, _BatchNorm) else None)
    for sub in module.modules():
        if hasattr(sub, "inplace") and isinstance(sub.inplace, bool):
            sub.inplace = False
    targets = lora_targets(module)
    if not targets:
        raise ConfigError("`lora-rank` > 0 but the trainable blocks hold no conv (groups 1) or linear layer to adapt")
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules="|".join(re.escape(t) for t in targets),  # full match: exactly these layers
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = inject_adapter_in_model(config, module)
    _validate_for_opacus(module)
    return module


def adapt_backbone(
    name: str, module: nn.Module, adaptation: Adaptation, *, seed: int = 0
) -> tuple[nn.Module, nn.Module]:
    """Split `module` and prepare its trainable part as `adaptation` says; return (frozen_part, trainable_part).

    The frozen part is frozen and eval() (its BatchNorms keep their ImageNet statistics and never see
    private data in training mode). The trainable part is fully trainable (`prepare_trainable`) or
    frozen with LoRA adapters (`add_lora`). `module` itself must not be used afterwards: its
    submodules were replaced in the parts.

    Raises:
        ConfigError: see `Adaptation.check`.
    """
    adaptation.check(name)
    frozen, trainable = split_backbone(name, module, adaptation.trainable_blocks)
    for p in frozen.parameters():
        p.requires_grad_(False)
    frozen.eval()
    if adaptation.lora_rank > 0:
        trainable = add_lora(trainable, adaptation.lora_rank, adaptation.lora_alpha, seed=seed)
    else:
        trainable = prepare_trainable(trainable)
    return frozen, trainable.eval()


# --- the trainable tensors ----------------------------------------------------------------------------


def trainable_names(module: nn.Module) -> list[str]:
    """Return the names of `module`'s parameters that require grad, in registration order."""
    return [name for name, p in module.named_parameters() if p.requires_grad]


def extract_trainable(module: nn.Module) -> OrderedDict[str, np.ndarray]:
    """Return `module`'s trainable parameters as float32 numpy copies, by name."""
    return OrderedDict(
        (name, p.detach().cpu().numpy().astype(np.float32, copy=True))
        for name, p in module.named_parameters()
        if p.requires_grad
    )


def load_trainable(module: nn.Module, arrays: dict[str, np.ndarray], *, source: str = "message") -> None:
    """Copy `arrays` into `module`'s trainable parameters after checking names, shapes and finiteness.

    Raises:
        ReplyError: a name is missing or unexpected, a shape differs, or a value is NaN/Inf.
    """
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(params) - set(arrays)), sorted(set(arrays) - set(params))
    if missing or extra:
        raise ReplyError(
            f"backbone tensors from {source} do not match the trainable blocks: missing {missing[:5]}, "
            f"unexpected {extra[:5]}; sender and receiver must use the same backbone, trainable-blocks and lora-rank"
        )
    with torch.no_grad():
        for name, p in params.items():
            value = check_incoming_tensor(f"backbone.{name}", arrays[name], tuple(p.shape), source=source)
            p.copy_(torch.as_tensor(value, dtype=p.dtype))


def split_wire_arrays(arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Return (head arrays, backbone arrays without their `backbone.` prefix) of a message's arrays."""
    n = len(BACKBONE_TENSOR_PREFIX)
    head = {name: v for name, v in arrays.items() if not name.startswith(BACKBONE_TENSOR_PREFIX)}
    backbone = {name[n:]: v for name, v in arrays.items() if name.startswith(BACKBONE_TENSOR_PREFIX)}
    return head, backbone


class AdaptedHead(nn.Module):
    """The trainable part of the backbone followed by the head: cached activations (B, C, H, W) -> logits (B, K)."""

    def __init__(self, backbone: nn.Module, head: Head) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    # What the training loop and evaluation ask of any model above the cut (shared/heads.Head too).
    clipping = "per_layer"  # per-tensor bounds (clip_bounds): a backbone block's gradients dwarf the head's
    predict_batch_size = 256  # activations are far larger than features
    backbone_lr_factor = BACKBONE_LR_FACTOR
    head_clip_share = HEAD_CLIP_SHARE

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(activations))

    def trained_part(self, inputs: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
        """Return (the module the training loop runs, its inputs): the whole model on the cached activations."""
        return self, inputs

    def _trainable(self) -> list[tuple[str, nn.Parameter]]:
        """Return (name, parameter) of every trainable tensor, the head's first (Opacus pairs clip bounds in order)."""
        trainable = [(name, p) for name, p in self.named_parameters() if p.requires_grad]
        trainable.sort(key=lambda item: not item[0].startswith("head."))
        return trainable

    def param_groups(self, learning_rate: float) -> list[dict]:
        """Return the head's tensors at `learning_rate`, then the backbone's at `backbone_lr_factor` x it."""
        trainable = self._trainable()
        head = [p for n, p in trainable if n.startswith("head.")]
        backbone = [p for n, p in trainable if not n.startswith("head.")]
        return [
            {"params": head, "lr": learning_rate},
            {"params": backbone, "lr": learning_rate * self.backbone_lr_factor},
        ]

    def clip_bounds(self, max_grad_norm: float) -> list[float]:
        """Return per-tensor clipping bounds in `param_groups` order, their L2 norm `max_grad_norm` (clip_bounds)."""
        return clip_bounds([n for n, _ in self._trainable()], max_grad_norm, head_share=self.head_clip_share)

    def wire_names(self) -> dict[int, str]:
        """Return id(parameter) -> its name in messages: head tensors bare, backbone tensors `backbone.`-prefixed."""
        # The trainable part is the attribute `backbone`, so its parameters already carry the wire prefix.
        return {id(p): name[len("head.") :] if name.startswith("head.") else name for name, p in self._trainable()}

    def train(self, mode: bool = True) -> AdaptedHead:
        """Set training mode, but keep frozen BatchNorms (LoRA's blocks) in eval(): they never learn private data."""
        super().train(mode)
        for m in self.backbone.modules():
            if isinstance(m, _BatchNorm) and not any(p.requires_grad for p in m.parameters()):
                m.eval()
        return self

    def arrays(self) -> OrderedDict[str, np.ndarray]:
        """Return the tensors that travel: the head's (its state dict) plus the trainable backbone ones, prefixed."""
        out = OrderedDict(
            (name, v.detach().cpu().numpy().astype(np.float32, copy=True)) for name, v in self.head.state_dict().items()
        )
        out.update((BACKBONE_TENSOR_PREFIX + name, v) for name, v in extract_trainable(self.backbone).items())
        return out

    def load_arrays(self, arrays: dict[str, np.ndarray], *, source: str = "message") -> None:
        """Load a message's head and `backbone.` tensors (each checked).

        Raises:
            ReplyError: names, shapes or values do not fit.
        """
        head, backbone = split_wire_arrays(arrays)
        load_head_arrays(self.head, head, source=source)
        load_trainable(self.backbone, backbone, source=source)


def build_adapted_backbone(
    name: str, module: nn.Module, adaptation: Adaptation, tensors: dict[str, np.ndarray]
) -> nn.Module:
    """Return pretrained `module` with `adaptation` applied and its changed `tensors` loaded: images -> features.

    Raises:
        ConfigError: see `Adaptation.check`.
        ReplyError: `tensors` do not fit the trainable part.
    """
    frozen, trainable = adapt_backbone(name, module, adaptation)
    load_trainable(trainable, tensors, source="the model file")
    return nn.Sequential(OrderedDict([("frozen", frozen), ("trainable", trainable)])).eval()
