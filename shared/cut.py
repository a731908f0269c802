"""Where the network is cut: the frozen part below it runs once per data and is cached; the model above it trains.

Head-only training is the cut at the very end (inputs are the backbone's features, (N, D)); deeper
fine-tuning cuts before the last `trainable-blocks` blocks (inputs are activations, (N, C, H, W)). A
site, the server's central evaluation and the lab's baselines all get their inputs at the cut from
`inputs_at_cut` and build the model above it with `build_model`, so there is one way to do either.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch import nn

from fedtl.shared.backbones import AnyPreprocessing, get_backbone_spec, resolve_preprocessing
from fedtl.shared.deep import (
    FINAL_FEATURES,
    Adaptation,
    AdaptedHead,
    adapt_backbone,
    cut_fingerprint,
    feature_block_dim,
    feature_block_fingerprint,
    read_after_block,
    split_backbone,
)
from fedtl.shared.features import ExampleStore, FeatureCache, cached_features
from fedtl.shared.heads import PROJECTED, Head, build_head
from fedtl.shared.named_data import federation_schema


@dataclass(frozen=True)
class Cut:
    """A backbone (name, verified fingerprint, preprocessing) and how much of it trains above the cut."""

    backbone_name: str
    backbone_fingerprint: str
    preprocessing: AnyPreprocessing
    adaptation: Adaptation = field(default_factory=Adaptation)

    @classmethod
    def of(cls, settings: Any, *, backbone_fingerprint: str | None = None) -> Cut:
        """Return the cut a RoundSettings (or a RunConfig, given the fingerprint) describes.

        A table's schema is the settings' `schema` (the JSON a site receives, whose hash the backbone's
        fingerprint pins) or, for a RunConfig, the federation's schema file or named table.
        """
        name = getattr(settings, "backbone_name", None) or settings.backbone
        if hasattr(settings, "backbone_name"):
            schema = getattr(settings, "schema", "") or None
        else:  # a RunConfig: its schema file, or the named table's own
            schema = federation_schema(settings.schema, settings.data)
        return cls(
            backbone_name=name,
            backbone_fingerprint=backbone_fingerprint or settings.backbone_fingerprint,
            preprocessing=resolve_preprocessing(name, settings.image_size, schema=schema),
            adaptation=Adaptation.of(settings),
        )

    def at_end_cut(self) -> Cut:
        """Return the head-only cut of the same backbone: its inputs are the features the run reads."""
        return dataclasses.replace(self, adaptation=self.adaptation.head_only())

    @property
    def reads_final_features(self) -> bool:
        """Return True when the inputs at an end cut are the backbone's own features (not an earlier block's)."""
        return self.adaptation.feature_block == FINAL_FEATURES

    @property
    def at_end(self) -> bool:
        """Return True when only the head trains, on the backbone's features."""
        return not self.adaptation.enabled

    @property
    def fingerprint(self) -> str:
        """Return the fingerprint of the frozen part below the cut: what its cached outputs are keyed by."""
        if self.at_end and self.reads_final_features:
            return self.backbone_fingerprint
        if self.at_end:
            return feature_block_fingerprint(
                self.backbone_fingerprint, self.backbone_name, self.adaptation.feature_block
            )
        return cut_fingerprint(self.backbone_fingerprint, self.backbone_name, self.adaptation.trainable_blocks)

    @property
    def cache_folder(self) -> str:
        """Return the cache sub-folder of inputs at this cut ("features" at the end, else "activations")."""
        return "features" if self.at_end else "activations"

    @property
    def feature_dim(self) -> int:
        """Return the backbone's feature dimension D (the head's input; a table's: its schema's encoded width)."""
        if not self.reads_final_features:
            return feature_block_dim(self.backbone_name, self.preprocessing.image_size, self.adaptation.feature_block)
        return get_backbone_spec(self.backbone_name).feature_dim or self.preprocessing.feature_dim

    def frozen_part(self, backbone: nn.Module) -> nn.Module:
        """Return the part of `backbone` below the cut, in eval() (BatchNorms keep their ImageNet statistics)."""
        if self.at_end and self.reads_final_features:
            return backbone.eval()
        if self.at_end:
            return read_after_block(self.backbone_name, backbone, self.adaptation.feature_block)
        return split_backbone(self.backbone_name, backbone, self.adaptation.trainable_blocks)[0].eval()


def inputs_at_cut(
    cache_root: Path,
    cut: Cut,
    load_backbone: Callable[[], nn.Module],
    *,
    images: np.ndarray | Callable[[], np.ndarray],
    labels: np.ndarray,
    data_fingerprint: str,
    batch_size: int,
    device: str,
    progress: bool,
    desc: str = "features",
    store_root: Path | None = None,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Return (inputs at the cut, labels, cache hit) of one data split, running the frozen part once per data.

    Cached in `cache_root/<cut.cache_folder>` under (cut fingerprint, data fingerprint, preprocessing);
    `load_backbone` (the verified backbone) is only called on a cache miss. With `store_root`, a miss reuses the
    inputs at the cut of every raw input seen before (`ExampleStore` in `store_root/<cut.cache_folder>`). `images`
    may be a function drawing them, called only on a miss (`shared/features.cached_features`).
    """
    return cached_features(
        FeatureCache(Path(cache_root) / cut.cache_folder),
        load_backbone=lambda: cut.frozen_part(load_backbone()),
        backbone_fingerprint=cut.fingerprint,
        images=images,
        labels=labels,
        data_fingerprint=data_fingerprint,
        preprocessing=cut.preprocessing,
        batch_size=batch_size,
        device=device,
        progress=progress,
        desc=desc,
        store=None if store_root is None else ExampleStore(Path(store_root) / cut.cache_folder),
    )


def build_model(
    cut: Cut,
    *,
    head: str,
    head_hidden: int,
    num_classes: int,
    load_backbone: Callable[[], nn.Module],
    seed: int,
    head_seed: int = 0,
    projection_dim: int = 0,
) -> Head | AdaptedHead:
    """Return the model above the cut: the head alone, or [trainable blocks (or their LoRA adapters) + head].

    `seed` seeds the LoRA adapters (every site and the server build the same ones); `head_seed` the head's
    initial weights (the server's initial model; sites load the server's tensors over them);
    `projection_dim` the width of a "projected" head's public projection (ignored by other heads).
    `load_backbone` is only called when blocks of the backbone train.
    """
    top = build_head(
        head,
        cut.feature_dim,
        num_classes,
        hidden=head_hidden,
        seed=head_seed,
        projection_dim=projection_dim if head == PROJECTED else 0,
    )
    if cut.at_end:
        return top
    _, trainable = adapt_backbone(cut.backbone_name, load_backbone(), cut.adaptation, seed=seed)
    return AdaptedHead(trainable, top)
