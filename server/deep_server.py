"""The server's side of deeper fine-tuning: initial backbone tensors, central evaluation at the cut, export fields."""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord

from fedtl.shared.backbones import build_backbone, get_backbone_spec
from fedtl.shared.config import RunConfig, fedtl_home
from fedtl.shared.constants import BACKBONE_TENSOR_PREFIX
from fedtl.shared.deep import (
    Adaptation,
    AdaptedHead,
    adapt_backbone,
    cut_fingerprint,
    extract_trainable,
    predict_adapted,
    split_backbone,
    split_wire_arrays,
)
from fedtl.shared.features import FeatureCache, cached_features
from fedtl.shared.heads import build_head
from fedtl.shared.metrics import classification_metrics

if TYPE_CHECKING:  # server_app imports this module
    from fedtl.server.server_app import Backbone


def initial_backbone_arrays(cfg: RunConfig, backbone: Backbone) -> OrderedDict[str, np.ndarray]:
    """Return the trainable backbone tensors every site starts from, named `backbone.<name>`.

    Built from the server's own pretrained backbone, prepared exactly as sites prepare theirs
    (`adapt_backbone`, LoRA adapters seeded with the run's seed). With full fine-tuning they are the
    pretrained tensors of the last blocks (BatchNorm affines now GroupNorm's); with LoRA, A and B (B = 0).
    """
    _, trainable = adapt_backbone(
        backbone.name, build_backbone(backbone.name, backbone.state), Adaptation.of(cfg), seed=cfg.seed
    )
    return OrderedDict((BACKBONE_TENSOR_PREFIX + name, v) for name, v in extract_trainable(trainable).items())


class DeepCentralEvaluation:
    """Central evaluation under deeper fine-tuning: test activations at the cut, cached once; the model each round.

    Same interface as server_app.CentralEvaluation: call it with the aggregated arrays.
    """

    def __init__(self, cfg: RunConfig, backbone: Backbone, test, label_names: tuple[str, ...]) -> None:
        adaptation = Adaptation.of(cfg)
        self.activations, self.labels, _ = cached_features(
            FeatureCache(fedtl_home() / "server-cache" / "activations"),
            load_backbone=lambda: split_backbone(
                backbone.name, build_backbone(backbone.name, backbone.state), adaptation.trainable_blocks
            )[0].eval(),
            backbone_fingerprint=cut_fingerprint(backbone.fingerprint, backbone.name, adaptation.trainable_blocks),
            images=test.images,
            labels=test.labels,
            data_fingerprint=test.fingerprint(),
            preprocessing=backbone.preprocessing,
            batch_size=cfg.feature_batch_size,
            device=cfg.device,
            progress=False,
        )
        _, trainable = adapt_backbone(
            backbone.name, build_backbone(backbone.name, backbone.state), adaptation, seed=cfg.seed
        )
        head = build_head(
            cfg.head, get_backbone_spec(backbone.name).feature_dim, len(label_names), hidden=cfg.head_hidden
        )
        self.model = AdaptedHead(trainable, head)

    def __call__(self, arrays: ArrayRecord) -> dict[str, float]:
        """Return the metrics of the aggregated model `arrays` (head + backbone tensors) on the server's test set."""
        self.model.load_arrays({name: a.numpy() for name, a in arrays.items()}, source="the aggregated model")
        return classification_metrics(self.labels, predict_adapted(self.model, self.activations))


def deep_model_fields(cfg: RunConfig, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Return the AdaptedModel fields recording the adaptation and which backbone tensors changed ({} for head only)."""
    adaptation = Adaptation.of(cfg)
    if not adaptation.enabled:
        return {}
    return {
        "trainable_blocks": adaptation.trainable_blocks,
        "lora_rank": adaptation.lora_rank,
        "lora_alpha": adaptation.lora_alpha,
        "changed_tensors": tuple(split_wire_arrays(arrays)[1]),
    }
