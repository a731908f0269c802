"""Deeper fine-tuning at a site: activations at the cut, cached on disk, and DP-SGD on [last blocks + head]. No Flower.

The frozen part of the backbone (everything below the last `trainable-blocks` blocks) runs once per
(backbone, data, preprocessing, cut) and its activations are cached like features; each round then
trains the trainable part (all its tensors, or its LoRA adapters) together with the head under Opacus,
with exactly the Poisson sampling and step count of `train_head`, so the ledger's charge is the same.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import warnings

import numpy as np
import torch
from opacus import GradSampleModule, PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedtl.client.site import Site, SiteFeatures, _data_index, load_site_data
from fedtl.client.training import TrainResult, steps_per_epoch
from fedtl.shared import constants as k
from fedtl.shared.backbones import get_backbone_spec, resolve_preprocessing
from fedtl.shared.deep import (
    BACKBONE_LR_FACTOR,
    HEAD_CLIP_SHARE,
    Adaptation,
    AdaptedHead,
    adapt_backbone,
    check_deep_run,
    clip_bounds,
    cut_fingerprint,
    predict_adapted,
    split_backbone,
)
from fedtl.shared.errors import BackboneError, DataError
from fedtl.shared.features import FeatureCache, cached_features, feature_cache_key
from fedtl.shared.files import atomic_write_bytes
from fedtl.shared.heads import build_head
from fedtl.shared.metrics import classification_metrics, majority_rate
from fedtl.shared.protocol import RoundSettings

log = logging.getLogger(__name__)


def activation_cache(site: Site) -> FeatureCache:
    """Return the site's on-disk cache of activations at the cut (apart from its feature cache)."""
    return FeatureCache(site.cache_dir / "activations")


def load_site_activations(site: Site, settings: RoundSettings, *, progress: bool | None = None) -> SiteFeatures:
    """Return the site's activations at the cut (train and local test), running the frozen part once per data.

    Keyed like the feature cache, with the cut's fingerprint (`cut_fingerprint`: backbone fingerprint,
    backbone name, trainable-blocks) in place of the backbone's. `train_features`/`test_features` hold
    float32 activations (N, C, H, W).

    Raises:
        BackboneError: the announced backbone is not in the site cache.
        DataError: the site's label names differ from the federation's.
    """
    expected = json.loads(settings.label_names)
    if not site.backbones.has(settings.backbone_fingerprint):
        raise BackboneError(
            f"backbone `{settings.backbone_name}` {settings.backbone_fingerprint[:12]} is not in site {site.name}'s "
            f"cache {site.backbones.root}; the server sends it before round 1"
        )
    pre = resolve_preprocessing(settings.backbone_name, settings.image_size)
    cut = cut_fingerprint(settings.backbone_fingerprint, settings.backbone_name, settings.trainable_blocks)
    cache = activation_cache(site)
    index = _data_index(site, expected)
    if index is not None and index.is_file():  # data decoded and validated before (by this or the feature path)
        recorded = json.loads(index.read_text())
        found = [cache.load(feature_cache_key(cut, recorded[split], pre)) for split in ("train", "test")]
        if all(f is not None for f in found):
            (train_x, train_y), (test_x, test_y) = found  # type: ignore[misc]
            return SiteFeatures(train_x, train_y, test_x, test_y, tuple(expected), 2)
    train, test = load_site_data(site, tuple(expected))
    if list(train.label_names) != expected:
        raise DataError(
            f"site {site.name} data {site.data} has {len(train.label_names)} classes {list(train.label_names)}, "
            f"but the federation trains a {settings.num_classes}-class head on {expected}; every site needs the "
            "same label names in the same order (rename the class folders or set label_names in the .npz)"
        )
    if progress is None:
        progress = site.simulation is None

    @functools.cache
    def frozen_part() -> nn.Module:  # built at most once, and only on a cache miss
        backbone = site.backbones.load(settings.backbone_name, settings.backbone_fingerprint)
        return split_backbone(settings.backbone_name, backbone, settings.trainable_blocks)[0].eval()

    out, hits, fingerprints = [], 0, {}
    for name, split in (("train", train), ("test", test)):
        fingerprints[name] = split.fingerprint()
        acts, labels, hit = cached_features(
            cache,
            load_backbone=frozen_part,
            backbone_fingerprint=cut,
            images=split.images,
            labels=split.labels,
            data_fingerprint=fingerprints[name],
            preprocessing=pre,
            batch_size=settings.feature_batch_size,
            device=settings.device,
            progress=progress,
        )
        hits += int(hit)
        out.append((acts, labels))
    if index is not None:
        atomic_write_bytes(index, json.dumps(fingerprints).encode())
    log.info(
        "site %s: activations before the last %d blocks, %s per example (%d of 2 from cache)",
        site.name,
        settings.trainable_blocks,
        tuple(out[0][0].shape[1:]),
        hits,
    )
    return SiteFeatures(out[0][0], out[0][1], out[1][0], out[1][1], tuple(train.label_names), hits)


def load_adapted_head(site: Site, settings: RoundSettings, global_arrays: dict[str, np.ndarray]) -> AdaptedHead:
    """Return [trainable part + head] built from the site's verified backbone, with the round's global tensors loaded.

    Raises:
        ConfigError: the settings' adaptation does not fit the backbone.
        ReplyError: the global tensors do not fit (names, shapes, NaN/Inf).
    """
    check_deep_run(settings)
    backbone = site.backbones.load(settings.backbone_name, settings.backbone_fingerprint)
    _, trainable = adapt_backbone(settings.backbone_name, backbone, Adaptation.of(settings), seed=settings.seed)
    head = build_head(
        settings.head,
        get_backbone_spec(settings.backbone_name).feature_dim,
        settings.num_classes,
        hidden=settings.head_hidden,
    )
    model = AdaptedHead(trainable, head)
    model.load_arrays(global_arrays, source="the server's global model")
    return model


def load_deep_round(
    site: Site, settings: RoundSettings, global_arrays: dict[str, np.ndarray]
) -> tuple[AdaptedHead, SiteFeatures]:
    """Return the round's model (global tensors loaded) and the site's cached activations."""
    return load_adapted_head(site, settings, global_arrays), load_site_activations(site, settings)


def _wire_name(param_name: str) -> str:
    """Return the message name of an AdaptedHead parameter: head tensors bare, backbone tensors `backbone.`-prefixed."""
    return param_name[len("head.") :] if param_name.startswith("head.") else param_name


def train_deep(
    model: AdaptedHead,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    max_grad_norm: float,
    noise_multiplier: float | None,
    seed: int | None,
    global_arrays: dict[str, np.ndarray] | None = None,
    proximal_mu: float = 0.0,
    backbone_lr_factor: float = BACKBONE_LR_FACTOR,
    head_clip_share: float = HEAD_CLIP_SHARE,
) -> TrainResult:
    """Train the trainable backbone part and the head of `model` in place on cached activations; return their tensors.

    DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy") exactly as `train_head` runs it:
    Poisson-sampled batches with sample rate and steps from `steps_per_epoch`, per-sample clipping of
    the gradient over ALL trainable tensors (backbone and head together) to total norm `max_grad_norm`,
    per tensor (`clip_bounds`: the head keeps `head_clip_share` of it), Gaussian noise of std
    noise_multiplier * max_grad_norm on every coordinate; the backbone steps at `backbone_lr_factor` x
    `learning_rate` (see shared/deep.py HEAD_CLIP_SHARE). `noise_multiplier=None` is the labelled
    non-private baseline (no clipping, no noise). Per-sample gradients come from Opacus' grad samplers
    (nn.Conv2d, nn.GroupNorm, nn.Linear, also inside peft's LoRA layers) and its functorch fallback for
    other layers. Frozen tensors (the LoRA base weights, frozen BatchNorms) get no gradient and never change.

    Args:
        model: [trainable part + head]; its current tensors are the starting point.
        features: float32 activations at the cut (N, C, H, W) of the site's training split.
        labels: int (N,) classes.
        epochs, batch_size, learning_rate, max_grad_norm, noise_multiplier, seed: as in `train_head`.
        global_arrays: the round's global tensors (message names); with `proximal_mu` > 0 they anchor FedProx
            (Li et al. 2020, "Federated Optimization in Heterogeneous Networks").
        proximal_mu: FedProx weight mu.

    Returns:
        TrainResult whose arrays are the head's tensors plus the trainable backbone tensors (`backbone.` names).
    """
    num_examples = len(labels)
    if num_examples == 0:
        raise ValueError("cannot train on an empty training split; the site needs at least one example")
    generator = torch.Generator()
    if seed is None:
        generator.seed()  # OS entropy
    else:
        generator.manual_seed(seed)
    dataset = TensorDataset(torch.as_tensor(features, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.long))
    sample_rate, per_epoch = steps_per_epoch(num_examples, batch_size)
    model.train()
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    # Head tensors first, then the backbone's: Opacus pairs the per-tensor clip bounds with this order.
    trainable.sort(key=lambda item: not item[0].startswith("head."))
    backbone_lr = learning_rate * backbone_lr_factor
    optimizer = torch.optim.SGD(
        [
            {"params": [p for n, p in trainable if n.startswith("head.")], "lr": learning_rate},
            {"params": [p for n, p in trainable if not n.startswith("head.")], "lr": backbone_lr},
        ],
        lr=learning_rate,
    )
    anchor = None
    if proximal_mu > 0 and global_arrays is not None:
        anchor = {id(p): torch.as_tensor(global_arrays[_wire_name(name)]) for name, p in trainable}
    with warnings.catch_warnings():
        if seed is not None:  # as in train_head: simulations only; real sites keep Opacus' secure-RNG warning
            warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        if noise_multiplier is not None:
            loader = DataLoader(dataset, batch_size=min(batch_size, num_examples), generator=generator)
            runner, optimizer, loader = PrivacyEngine(accountant="rdp").make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=noise_multiplier,
                max_grad_norm=clip_bounds([n for n, _ in trainable], max_grad_norm, head_share=head_clip_share),
                clipping="per_layer",
                poisson_sampling=True,
                noise_generator=generator,
            )
            # The accountant was charged with (sample_rate, epochs * per_epoch) before training.
            assert math.isclose(loader.sample_rate, sample_rate) and len(loader) == per_epoch, (
                loader.sample_rate,
                len(loader),
                sample_rate,
                per_epoch,
            )
        else:
            loader = DataLoader(dataset, batch_size=min(batch_size, num_examples), shuffle=True, generator=generator)
            runner = model
        criterion = nn.CrossEntropyLoss()
        losses: list[float] = []
        steps = 0
        try:
            for _ in range(epochs):
                for x, y in loader:
                    optimizer.zero_grad(set_to_none=True)
                    logits = runner(x)  # (B, K); Opacus' empty Poisson batch keeps the (0, C, H, W) shape
                    if len(y) == 0:
                        loss = logits.sum()  # an empty batch is still a step: Opacus adds pure noise
                    else:
                        loss = criterion(logits, y)
                        losses.append(float(loss.detach()))
                    loss.backward()
                    optimizer.step()
                    steps += 1
                    if anchor is not None:
                        # FedProx's proximal step depends on no data: applied after the private step
                        # (post-processing), as in train_head.
                        with torch.no_grad():
                            for group in optimizer.param_groups:
                                for p in group["params"]:
                                    p.sub_(group["lr"] * proximal_mu * (p - anchor[id(p)]))
        finally:
            if isinstance(runner, GradSampleModule):
                runner._close()  # remove Opacus' hooks and per-sample gradients from the caller's model
    if noise_multiplier is not None:
        assert steps == epochs * per_epoch, (steps, epochs, per_epoch)
    model.eval()
    return TrainResult(
        arrays=model.arrays(),
        num_examples=num_examples,
        train_loss=float(np.mean(losses)) if losses else float("nan"),
        steps=steps,
        sample_rate=sample_rate,
        noise_multiplier=noise_multiplier,
    )


def evaluate_deep_round(
    site: Site, settings: RoundSettings, global_arrays: dict[str, np.ndarray]
) -> tuple[dict[str, float], int]:
    """Return the global model's metrics on the site's local test split (activations at the cut), and its size."""
    model, acts = load_deep_round(site, settings, global_arrays)
    scores = classification_metrics(acts.test_labels, predict_adapted(model, acts.test_features))
    scores[k.MAJORITY_RATE] = majority_rate(acts.test_labels)
    return scores, len(acts.test_labels)
