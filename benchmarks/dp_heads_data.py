"""Cached backbone features of the DP-head benchmark's data sets, split exactly as `fedtl simulate` splits them.

Every distinct image of a data set is run through the backbone once (keyed by its bytes), so the seeds' different
train/test splits and site partitions reuse one extraction. The splits themselves come from fedtl's own code:
`load_dataset` (the server's held-out split), `site_split` (each simulated site's partition and local split).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
# name -> (data source, number of sites); the three benchmarks (issue 17).
DATASETS = {
    "digits": ("digits", 5),
    "pneumonia": (str(DATA_DIR / "pneumoniamnist_reassembled.npz"), 5),
    "breast": (str(DATA_DIR / "breastmnist_64.npz"), 3),
}


@dataclass(frozen=True)
class FederatedFeatures:
    """One simulated federation's features: each site's training split, and the server's held-out split."""

    site_x: list[np.ndarray]  # per site (N_k, D) float32
    site_y: list[np.ndarray]  # per site (N_k,) int64
    test_x: np.ndarray  # (N_test, D)
    test_y: np.ndarray  # (N_test,)
    num_classes: int
    val_x: np.ndarray  # (N_val, D): the sites' local test splits pooled; what defaults may be tuned on
    val_y: np.ndarray  # (N_val,)

    @property
    def site_sizes(self) -> list[int]:
        """Return each site's training-set size (public in fedtl: sites declare it)."""
        return [len(y) for y in self.site_y]


def _image_key(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes() + str(image.shape).encode()).hexdigest()


def _home() -> Path:
    return Path(os.environ.get("FEDTL_HOME", Path.home() / ".cache" / "fedtl")).expanduser()


def feature_table(name: str, images: np.ndarray, *, backbone: str, image_size: int) -> dict[str, np.ndarray]:
    """Return image key -> feature for `images`, extracting (and caching) only the images not seen before."""
    from fedtl.shared.backbones import build_backbone, resolve_preprocessing
    from fedtl.shared.features import extract_features

    path = _home() / "dp_heads" / f"{name}-{backbone}-{image_size}.npz"
    table: dict[str, np.ndarray] = {}
    if path.is_file():
        with np.load(path) as data:
            table = {str(k): v for k, v in zip(data["keys"], data["features"])}
    keys = [_image_key(im) for im in images]
    missing = [i for i, key in enumerate(keys) if key not in table]
    if missing:
        unique = list({keys[i]: i for i in missing}.values())
        feats = extract_features(
            build_backbone(backbone), images[unique], resolve_preprocessing(backbone, image_size), device="cpu"
        )
        table.update({keys[i]: f for i, f in zip(unique, feats)})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, keys=np.array(list(table), dtype="U40"), features=np.stack(list(table.values())))
        tmp.replace(path)
    return {key: table[key] for key in keys}  # in the order of `images` (duplicates once)


def block_feature_tables(name: str, images: np.ndarray, *, image_size: int) -> dict[str, dict[str, np.ndarray]]:
    """Return layer -> (image key -> feature) for EfficientNet-Lite0's MBConv blocks and its final features.

    One pass over `images` with forward hooks on every block (`b0`..`b15`, each output average-pooled, as
    `shared/deep.read_after_block` reads it) and the final features (`final`); cached per data set and size.
    """
    import torch

    from fedtl.shared.backbones import build_backbone, resolve_preprocessing

    path = _home() / "dp_heads" / f"{name}-efficientnet_lite0-{image_size}-blocks.npz"
    keys = [_image_key(im) for im in images]
    if path.is_file():
        with np.load(path) as data:
            stored = list(data["keys"])
            if set(keys) <= set(stored):
                row = {key: i for i, key in enumerate(stored)}
                # Each `data[layer]` reads the whole array again, and a row of it keeps that array alive: read once.
                arrays = {layer: data[layer] for layer in data.files if layer != "keys"}
                return {layer: {key: array[row[key]] for key in keys} for layer, array in arrays.items()}
    module = build_backbone("efficientnet_lite0")
    prep = resolve_preprocessing("efficientnet_lite0", image_size)
    outputs: dict[str, torch.Tensor] = {}
    for i, block in enumerate(module._blocks):
        block.register_forward_hook(lambda _m, _i, out, i=i: outputs.__setitem__(f"b{i}", out.mean((2, 3))))
    unique = list({key: i for i, key in enumerate(keys)}.values())
    chunks: dict[str, list[np.ndarray]] = {}
    with torch.inference_mode():
        for start in range(0, len(unique), 128):
            final = module(prep.apply(images[unique[start : start + 128]]))
            for layer, value in [*outputs.items(), ("final", final)]:
                chunks.setdefault(layer, []).append(value.float().numpy())
    arrays = {layer: np.concatenate(parts) for layer, parts in chunks.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, keys=np.array([keys[i] for i in unique], dtype="U40"), **arrays)
    tmp.replace(path)
    row = {keys[i]: j for j, i in enumerate(unique)}
    return {layer: {key: arrays[layer][row[key]] for key in keys} for layer in arrays}


def federated_features(
    name: str,
    *,
    seed: int,
    backbone: str = "efficientnet_lite0",
    image_size: int = 64,
    table: dict[str, np.ndarray] | None = None,
) -> FederatedFeatures:
    """Return data set `name`'s federation for `seed`: iid sites as `fedtl simulate` makes them, held-out split.

    `table`: image key -> feature to use instead of the backbone's final features (e.g. a block's).
    """
    from fedtl.shared.data import load_dataset, site_split

    source, num_sites = DATASETS[name]
    splits = load_dataset(source, seed=seed, test_fraction=0.2)
    pool = np.concatenate([splits.train.images, splits.test.images])
    if table is None:
        table = feature_table(name, pool, backbone=backbone, image_size=image_size)

    def lookup(images: np.ndarray) -> np.ndarray:
        return np.stack([table[_image_key(im)] for im in images]).astype(np.float32)

    site_x, site_y, val_x, val_y = [], [], [], []
    for site in range(num_sites):
        train, local_test = site_split(splits.train, site, num_sites, scheme="iid", seed=seed, local_test_fraction=0.2)
        site_x.append(lookup(train.images))
        site_y.append(train.labels.astype(np.int64))
        val_x.append(lookup(local_test.images))
        val_y.append(local_test.labels.astype(np.int64))
    return FederatedFeatures(
        site_x,
        site_y,
        lookup(splits.test.images),
        splits.test.labels.astype(np.int64),
        len(splits.train.label_names),
        np.concatenate(val_x),
        np.concatenate(val_y),
    )


if __name__ == "__main__":  # extract everything once: python benchmarks/dp_heads_data.py
    for data_name in DATASETS:
        for s in (0, 1, 2):
            fed = federated_features(data_name, seed=s)
            print(data_name, s, fed.site_sizes, fed.test_x.shape, np.bincount(fed.test_y))


def synthetic_features(*, backbone: str = "efficientnet_lite0", image_size: int = 64) -> np.ndarray:
    """Return the backbone's features (M, D) of fedtl's public synthetic images (shared/public_basis), cached."""
    from fedtl.shared.public_basis import generate_synthetic_images

    images = generate_synthetic_images()
    table = feature_table("synthetic", images, backbone=backbone, image_size=image_size)
    return np.stack(list(table.values())).astype(np.float32)
