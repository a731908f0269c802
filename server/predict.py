"""Predict with an adapted model: backbone by name (site cache or registry), fingerprint checked.

What a model reads follows its preprocessing: image files; texts (literal arguments, or the `text` column of
a .csv/.jsonl file); or table rows (a .csv/.parquet file with the schema's columns, the label column optional).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from fedtl.server.model_file import AdaptedModel, load_model
from fedtl.shared.backbones import TablePreprocessing, build_backbone, fingerprint_backbone
from fedtl.shared.data import load_image_file
from fedtl.shared.dataset import ROWS, TEXTS
from fedtl.shared.errors import BackboneError, DataError, FingerprintMismatchError
from fedtl.shared.features import extract_features
from fedtl.shared.heads import predict_proba
from fedtl.shared.heap import reuse_freed_memory
from fedtl.shared.images import IMAGE_EXTENSIONS
from fedtl.shared.loaders import image_files_below
from fedtl.shared.tables import read_table_rows
from fedtl.shared.texts import read_text_records


@dataclass(frozen=True)
class Prediction:
    """The most likely label of one input (an image, a text, a table row) and its probability."""

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
        pre = model.preprocessing
        backbone = build_backbone(
            model.backbone_name, schema=pre.schema if isinstance(pre, TablePreprocessing) else None
        )
    actual = fingerprint_backbone(backbone)
    if actual != model.backbone_fingerprint:
        raise FingerprintMismatchError(
            f"backbone `{model.backbone_name}` found has fingerprint {actual}, but the model's head was trained on "
            f"{model.backbone_fingerprint}; pass --backbone-weights with the site's cached weights of that fingerprint"
        )
    return backbone


def image_files(items: list[str | Path]) -> list[str | Path]:
    """Return `items` with each folder replaced by the image files under it (`image_files_below`: sorted by path).

    Raises:
        DataError: a folder holds no image file.
    """
    out: list[str | Path] = []
    for item in items:
        folder = Path(item).expanduser()
        if not folder.is_dir():
            out.append(item)
            continue
        found = image_files_below(folder)
        if not found:
            raise DataError(
                f"folder {folder} holds no image file ({', '.join(IMAGE_EXTENSIONS)}); fix: pass a folder of images, "
                "or the image files themselves"
            )
        out += [str(p) for p in found]
    return out


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
    image_paths = image_files(image_paths)
    images = [load_image_file(p) for p in image_paths]  # validate every file before any compute
    # Deeper fine-tuning: the changed tensors go into the pretrained backbone after its fingerprint check.
    backbone = model.adapt_backbone(load_model_backbone(model, weights_file=weights_file))
    head = model.build_head()
    out = []
    with reuse_freed_memory():  # one heap for every image's pass, handed back once (shared/heap.py)
        for path, image in zip(image_paths, images):
            feats = extract_features(backbone, image[None], model.preprocessing, device=device, progress=False)
            probs = predict_proba(head, feats)[0]
            best = int(np.argmax(probs))
            out.append(Prediction(str(path), model.label_names[best], float(probs[best])))
    return out


def predict_inputs(
    model_path: str | Path,
    items: list[str],
    *,
    weights_file: str | Path | None = None,
    device: str = "auto",
) -> list[Prediction]:
    """Return label + probability for each input of `items`, read as the model's kind of input.

    Images: each item is an image file or a folder of them (`image_files`). Texts: an item that is an existing
    .csv or .jsonl file gives every text in its `text` column, any other item is itself a text. Rows: each item
    is a .csv or .parquet file with the schema's columns (the label column may be left out). All inputs are read
    before any compute.

    Raises:
        ModelFileError: the model file is unreadable.
        DataError: an input is missing, unreadable or does not fit the schema (named in the message).
        FingerprintMismatchError: see `load_model_backbone`.
    """
    model = load_model(model_path)
    kind = model.preprocessing.kind
    if kind not in (TEXTS, ROWS):
        return predict_images(model_path, list(items), weights_file=weights_file, device=device)
    names, inputs = [], []
    for item in items:
        path = Path(item).expanduser()
        if kind == TEXTS and path.suffix.lower() in (".csv", ".jsonl") and path.is_file():
            records = read_text_records(path, require_label=False)
            names += [f"{item}:{origin}" for origin in records.origins]
            inputs += records.texts
        elif kind == TEXTS:
            if not item.strip():
                raise DataError("an empty text cannot be labelled; fix: pass the text, or a .csv/.jsonl file of texts")
            names.append(item if len(item) <= 40 else item[:37] + "...")
            inputs.append(item)
        else:
            rows = read_table_rows(path, model.preprocessing.schema, require_label=False)
            names += [f"{item}:{origin}" for origin in rows.origins]
            inputs.append(rows.rows)
    if kind == TEXTS:
        raw = np.empty(len(inputs), dtype=object)
        raw[:] = inputs  # (N,) str
    else:
        raw = np.concatenate(inputs)  # (N, C) coded rows
    backbone = load_model_backbone(model, weights_file=weights_file)
    feats = extract_features(backbone, raw, model.preprocessing, device=device, progress=False)
    probs = predict_proba(model.build_head(), feats)
    best = probs.argmax(axis=1)
    return [Prediction(name, model.label_names[b], float(p[b])) for name, b, p in zip(names, best, probs)]
