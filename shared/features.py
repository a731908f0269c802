"""Frozen-backbone feature extraction, cached on disk per (backbone, data, preprocessing)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fedtl.shared.backbones import AnyPreprocessing
from fedtl.shared.dataset import IMAGES, input_kind
from fedtl.shared.errors import DataError
from fedtl.shared.files import atomic_write_bytes

log = logging.getLogger(__name__)

FEATURES_FORMAT = 1  # bump when the cached file layout or extraction semantics change


def resolve_device(device: str = "auto") -> torch.device:
    """Return the torch device for "auto" (CUDA when present, else CPU), "cpu" or "cuda"."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError('`device` is "cuda" but no CUDA device is visible; use "auto" or "cpu"')
    return torch.device(device)


@torch.inference_mode()
def extract_features(
    backbone: nn.Module,
    images: np.ndarray,
    preprocessing: AnyPreprocessing,
    *,
    batch_size: int = 64,
    device: str | torch.device = "auto",
    progress: bool = True,
    desc: str = "features",
) -> np.ndarray:
    """Run the frozen backbone over raw inputs (`images`, texts or rows) in batches; return float32 features (N, D).

    The preprocessing turns each batch of raw inputs into the backbone's input (resized, normalised
    images; token ids and masks; schema-encoded rows). The backbone is put in eval() so BatchNorm uses
    its ImageNet running statistics and never updates them from private data. On CUDA the forward pass
    runs under bf16 autocast.

    Raises:
        DataError: the raw inputs are not of the kind the backbone reads (texts given to an image backbone...).
    """
    check_input_kind(images, preprocessing)
    dev = resolve_device(device) if isinstance(device, str) else device
    backbone.eval()
    # channels-last convolutions run ~1.5x faster on CPU here (and suit GPU tensor cores); the
    # weights' values, hence the fingerprint, are unchanged.
    backbone.to(dev, memory_format=torch.channels_last)
    chunks = []
    # A bar where someone watches (a terminal), nothing in logs and captured output (tqdm's disable=None).
    bar = tqdm(total=len(images), desc=desc, unit="img", disable=None if progress else True, leave=False)
    for start in range(0, len(images), batch_size):
        batch = preprocessing.apply(images[start : start + batch_size]).to(dev)  # (B, 3, S, S), (B, 2, L) or (B, D)
        if batch.dim() == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            feats = backbone(batch)  # (B, D)
        chunks.append(feats.float().cpu().numpy())
        bar.update(len(batch))
    bar.close()
    if not chunks:
        # No images: still report the backbone's feature width, so callers build heads of the right size.
        width = backbone(preprocessing.example_batch().to(dev)).shape[1]
        return np.zeros((0, width), dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32, copy=False)


def check_input_kind(inputs: np.ndarray, preprocessing: AnyPreprocessing) -> None:
    """Raise DataError when raw inputs are not of the kind the backbone's preprocessing reads."""
    expected, got = getattr(preprocessing, "kind", IMAGES), input_kind(inputs) or IMAGES
    if got != expected:
        hint = {"texts": "minilm_l6", "rows": "tabular"}.get(got, "an image backbone such as efficientnet_lite0")
        raise DataError(
            f"the data holds {got} but the run's backbone reads {expected}; fix: choose a backbone for {got} "
            f"(backbone = {hint!r})"
        )


def feature_cache_key(backbone_fingerprint: str, data_fingerprint: str, preprocessing: AnyPreprocessing) -> str:
    """Return the cache key: SHA-256 over backbone fingerprint, data fingerprint and preprocessing."""
    payload = json.dumps(
        {
            "format": FEATURES_FORMAT,
            "backbone": backbone_fingerprint,
            "data": data_fingerprint,
            "preprocessing": preprocessing.key(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class FeatureCache:
    """A folder of `<key>.npz` feature files; writes are atomic, so a crash never leaves half a file."""

    root: Path

    def path(self, key: str) -> Path:
        """Return where the features for `key` live."""
        return Path(self.root) / f"{key}.npz"

    def load(self, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        """Return (features, labels) for `key`, or None when absent or unreadable (then recomputed)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path) as data:
                return data["features"], data["labels"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            log.warning("feature cache file %s is unreadable (%s); recomputing it", path, exc)
            return None

    def save(self, key: str, features: np.ndarray, labels: np.ndarray) -> Path:
        """Store (features, labels) under `key` atomically and return the file's path."""
        buffer = io.BytesIO()
        np.savez(buffer, features=features, labels=labels)
        return atomic_write_bytes(self.path(key), buffer.getvalue())


def cached_features(
    cache: FeatureCache,
    *,
    load_backbone: Callable[[], nn.Module],
    backbone_fingerprint: str,
    images: np.ndarray,
    labels: np.ndarray,
    data_fingerprint: str,
    preprocessing: AnyPreprocessing,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = True,
    desc: str = "features",
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Return (features, labels, hit): the cached features, or extract and cache them first.

    `load_backbone` is only called on a cache miss, so a hit costs neither weights nor a forward pass.
    """
    check_input_kind(images, preprocessing)  # before a cache hit can hide a mismatch
    key = feature_cache_key(backbone_fingerprint, data_fingerprint, preprocessing)
    found = cache.load(key)
    if found is not None:
        return found[0], found[1], True
    feats = extract_features(
        load_backbone(), images, preprocessing, batch_size=batch_size, device=device, progress=progress, desc=desc
    )
    cache.save(key, feats, np.asarray(labels, dtype=np.int64))
    return feats, np.asarray(labels, dtype=np.int64), False
