"""Predict with an adapted model: backbone by name (site cache or registry), fingerprint checked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from fedtl.server.model_file import AdaptedModel, load_model
from fedtl.shared.backbones import build_backbone, fingerprint_backbone
from fedtl.shared.data import load_image_file
from fedtl.shared.errors import BackboneError, FingerprintMismatchError
from fedtl.shared.features import extract_features
from fedtl.shared.heads import predict_proba


@dataclass(frozen=True)
class Prediction:
    """The most likely label of one image and its probability."""

    path: str
    label: str
    probability: float


def load_model_backbone(model: AdaptedModel, *, weights_file: str | Path | None = None) -> torch.nn.Module:
    """Return the model's backbone, from a verified weights file or the registry, fingerprint checked.

    Raises:
        FingerprintMismatchError: the backbone found is not the one the head was trained on.
    """
    if weights_file is not None:
        try:
            state = load_file(str(weights_file))
        except (OSError, SafetensorError) as exc:
            raise BackboneError(
                f"--backbone-weights {weights_file} is not a readable safetensors file ({exc}); pass a file "
                "from a site cache, <cache-dir>/backbones/<fingerprint>.safetensors"
            ) from exc
        backbone = build_backbone(model.backbone_name, state)
    else:
        backbone = build_backbone(model.backbone_name)
    actual = fingerprint_backbone(backbone)
    if actual != model.backbone_fingerprint:
        raise FingerprintMismatchError(
            f"backbone `{model.backbone_name}` found has fingerprint {actual}, but the model's head was trained on "
            f"{model.backbone_fingerprint}; pass --backbone-weights with the site's cached weights of that fingerprint"
        )
    return backbone


def predict_images(
    model_path: str | Path,
    image_paths: list[str | Path],
    *,
    weights_file: str | Path | None = None,
    device: str = "auto",
) -> list[Prediction]:
    """Return label + probability for each image under the adapted model.

    Raises:
        ModelFileError: the model file is unreadable.
        DataError: an image is missing or corrupt (named in the message).
        FingerprintMismatchError: see `load_model_backbone`.
    """
    model = load_model(model_path)
    images = [load_image_file(p) for p in image_paths]  # validate every file before any compute
    # Deeper fine-tuning: the changed tensors go into the pretrained backbone after its fingerprint check.
    backbone = model.adapt_backbone(load_model_backbone(model, weights_file=weights_file))
    head = model.build_head()
    out = []
    for path, image in zip(image_paths, images):
        feats = extract_features(backbone, image[None], model.preprocessing, device=device, progress=False)
        probs = predict_proba(head, feats)[0]
        best = int(np.argmax(probs))
        out.append(Prediction(str(path), model.label_names[best], float(probs[best])))
    return out
