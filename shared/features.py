"""Frozen-backbone feature extraction, cached on disk per (backbone, data, preprocessing)."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fedtl.shared.backbones import AnyPreprocessing
from fedtl.shared.dataset import IMAGES, input_kind
from fedtl.shared.errors import DataError
from fedtl.shared.files import NPZ_READ_ERRORS, atomic_write_npz
from fedtl.shared.heap import reuse_freed_memory

log = logging.getLogger(__name__)
progress_log = logging.getLogger("fedtl.progress")  # the lab's terminal or log (cli/main.show_progress)

FEATURES_FORMAT = 1  # bump when the cached file layout or extraction semantics change
# Batches the host may queue on a GPU ahead of the features it has back: enough that the GPU never waits for the host
# to read and send the next batch, few enough to bound the memory in flight (a batch of 256 at 224 px: 38 MB of
# pixels, 154 MB once normalised there).
QUEUED_BATCHES = 8
# Under FEDTL_HOME: features per raw input, of one party's data only. The server keeps its own held-out data's
# there; in the lab, where the server and the simulated sites are one researcher's data on one machine, they
# share it. A real site's inputs never enter it (client/inputs.py).
EXAMPLE_STORE = "example-store"


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
    batch_size: int = 32,
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
    on_gpu = dev.type == "cuda"
    chunks: list[torch.Tensor] = []  # each batch's features in host memory (on a GPU: once its copy has arrived)
    copied: deque[torch.cuda.Event] = deque()  # on a GPU: marks after each batch's copy back, in queue order
    # A bar where someone watches (a terminal); in a log, one line once done (tqdm's disable=None: no terminal).
    bar = tqdm(total=len(images), desc=desc, unit="img", disable=None if progress else True, leave=False)
    started = time.perf_counter()
    with reuse_freed_memory():  # each batch reuses the last one's activations' memory (shared/heap.py)
        for start in range(0, len(images), batch_size):
            batch = preprocessing.apply(images[start : start + batch_size], device=dev)  # (B, 3, S, S), (B, 2, L)...
            if batch.dim() == 4:
                batch = batch.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=on_gpu):
                feats = backbone(batch)  # (B, D)
            # From a GPU, a copy into pinned memory queued behind the batch: nothing here waits for the GPU, which
            # stays fed while the next batches are read and sent (the CPU's features are already in place).
            chunks.append(feats.float().to("cpu", non_blocking=True))
            if on_gpu:
                copied.append(torch.cuda.Event())
                copied[-1].record()
                if len(copied) > QUEUED_BATCHES:  # bounds the batches (and the memory) in flight
                    copied.popleft().synchronize()
            bar.update(len(batch))
    if on_gpu:
        torch.cuda.synchronize(dev)  # every copy back has arrived before its features are read
    bar.close()
    if progress and bar.disable and len(images):
        seconds = time.perf_counter() - started
        progress_log.info("%s: %d inputs through the backbone in %.1f s", desc, len(images), seconds)
    if not chunks:
        # No images: still report the backbone's feature width, so callers build heads of the right size.
        width = backbone(preprocessing.example_batch().to(dev)).shape[1]
        return np.zeros((0, width), dtype=np.float32)
    return np.concatenate([chunk.numpy() for chunk in chunks]).astype(np.float32, copy=False)


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
        except NPZ_READ_ERRORS as exc:
            log.warning("feature cache file %s is unreadable (%s); recomputing it", path, exc)
            return None

    def save(self, key: str, features: np.ndarray, labels: np.ndarray) -> Path:
        """Store (features, labels) under `key` atomically and return the file's path."""
        return atomic_write_npz(self.path(key), features=features, labels=labels)


def example_hashes(inputs: np.ndarray) -> list[str]:
    """Return one SHA-256 per raw input (image, text or row), over its bytes, shape and dtype."""
    out = []
    for x in inputs:
        if isinstance(x, str):
            out.append(hashlib.sha256(b"text:" + x.encode()).hexdigest())
        else:
            a = np.ascontiguousarray(x)
            out.append(hashlib.sha256(f"{a.dtype.str}{a.shape}:".encode() + a.tobytes()).hexdigest())
    return out


@dataclass
class _StoreIndex:
    """What one process has read of one store folder: hash -> (shard's features, row), and which shards."""

    stamp: int = -1  # the folder's mtime (ns) when it was last listed
    shards: set[str] = field(default_factory=set)
    rows: dict[str, tuple[np.ndarray, int]] = field(default_factory=dict)

    def take(self, name: str, hashes: np.ndarray, features: np.ndarray) -> None:
        """Index one shard (an input already indexed keeps its first row: the same input, the same features)."""
        self.shards.add(name)
        for row, h in enumerate(hashes):
            self.rows.setdefault(str(h), (features, row))


# Per process and folder: a lab run of 10,000 simulated sites looks up each site's inputs after the others added
# theirs, so reading every shard per lookup would be quadratic. Shards are immutable (named by their content),
# so an indexed shard never needs reading again; the folder is listed again only when its mtime moved.
_STORE_INDEXES: dict[Path, _StoreIndex] = {}


@dataclass(frozen=True)
class ExampleStore:
    """Features per raw input, by content: a folder of shards `<key>/<n>.npz` (hashes, features), written atomically.

    One party's store (the lab's simulated sites, or the server's own held-out data): a new partition or a split
    that shares inputs with an earlier one extracts only the inputs never seen. Extraction does not depend on
    how inputs are batched on CPU, so stored rows equal a fresh pass bit for bit. Each process keeps an index of
    the shards it has read; one another process writes is found when the folder's mtime moves (at worst, an
    input whose shard was missed is extracted again: never a wrong row).
    """

    root: Path

    def lookup(self, key: str, hashes: list[str]) -> dict[int, np.ndarray]:
        """Return position -> stored features of the inputs whose hashes the store holds."""
        folder = Path(self.root) / key
        try:
            stamp = folder.stat().st_mtime_ns
        except OSError:  # nothing stored yet
            return {}
        index = _STORE_INDEXES.setdefault(folder.resolve(), _StoreIndex())
        if stamp != index.stamp:
            index.stamp = stamp
            for shard in sorted(folder.glob("*.npz")):
                if shard.name not in index.shards:
                    self._read(shard, index)
        found: dict[int, np.ndarray] = {}
        for i, h in enumerate(hashes):  # identical inputs (duplicated images) share one stored row
            if (hit := index.rows.get(h)) is not None:
                found[i] = hit[0][hit[1]]
        return found

    @staticmethod
    def _read(shard: Path, index: _StoreIndex) -> None:
        try:
            with np.load(shard) as data:
                index.take(shard.name, data["hashes"], data["features"])
        except NPZ_READ_ERRORS as exc:
            log.warning("example store shard %s is unreadable (%s); its inputs are extracted again", shard, exc)

    def add(self, key: str, hashes: list[str], features: np.ndarray) -> None:
        """Store the features of new inputs as one more shard (a unique name: concurrent writers never collide)."""
        name = hashlib.sha256("".join(hashes).encode()).hexdigest()[:32]
        folder = Path(self.root) / key
        before = folder.stat().st_mtime_ns if folder.is_dir() else None
        path = atomic_write_npz(folder / f"{name}.npz", hashes=np.asarray(hashes), features=features)
        index = _STORE_INDEXES.get(folder.resolve())
        if index is not None:
            index.take(path.name, np.asarray(hashes), np.asarray(features))
            if before == index.stamp:  # nobody else wrote since the last listing: no need to list again
                index.stamp = folder.stat().st_mtime_ns


def cached_features(
    cache: FeatureCache,
    *,
    load_backbone: Callable[[], nn.Module],
    backbone_fingerprint: str,
    images: np.ndarray | Callable[[], np.ndarray],
    labels: np.ndarray,
    data_fingerprint: str,
    preprocessing: AnyPreprocessing,
    batch_size: int = 32,
    device: str = "auto",
    progress: bool = True,
    desc: str = "features",
    store: ExampleStore | None = None,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Return (features, labels, hit): the cached features, or extract and cache them first.

    `load_backbone` is only called on a cache miss, so a hit costs neither weights nor a forward pass. With a
    `store`, a miss extracts only the inputs the store has not seen (a new partition of the same data). `images`
    may be a function that draws them (inputs fedtl generates itself, fingerprinted by how they are drawn): it is
    called only on a miss.
    """
    if not callable(images):
        check_input_kind(images, preprocessing)  # before a cache hit can hide a mismatch
    key = feature_cache_key(backbone_fingerprint, data_fingerprint, preprocessing)
    found = cache.load(key)
    if found is not None:
        return found[0], found[1], True
    if callable(images):
        images = images()
        check_input_kind(images, preprocessing)

    def extract(inputs: np.ndarray) -> np.ndarray:
        return extract_features(
            load_backbone(), inputs, preprocessing, batch_size=batch_size, device=device, progress=progress, desc=desc
        )

    if store is None or len(images) == 0:
        feats = extract(images)
    else:
        store_key = feature_cache_key(backbone_fingerprint, "per-example", preprocessing)
        hashes = example_hashes(images)
        known = store.lookup(store_key, hashes)
        missing = [i for i in range(len(hashes)) if i not in known]
        if missing:
            new = extract(images[missing] if isinstance(images, np.ndarray) else [images[i] for i in missing])
            store.add(store_key, [hashes[i] for i in missing], new)
            known.update(zip(missing, new))
        feats = np.stack([known[i] for i in range(len(hashes))]).astype(np.float32, copy=False)
    cache.save(key, feats, np.asarray(labels, dtype=np.int64))
    return feats, np.asarray(labels, dtype=np.int64), False
