"""Site data: load image datasets (sklearn digits, MedMNIST .npz, image folders), partition and split them."""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.model_selection import train_test_split

from fedtl.shared.errors import ConfigError, DataError
from fedtl.shared.partitioners import NATURAL, parse_partition, partition_indices, validate_groups

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataSplits",
    "ImageDataset",
    "check_split_settings",
    "load_dataset",
    "load_image_file",
    "site_split",
    "split_dataset",
    "validate_labels",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")
DIGITS = "digits"
NPZ_IMAGE_KEYS = ("train_images", "val_images", "test_images")
NPZ_LABEL_KEYS = ("train_labels", "val_labels", "test_labels")
NPZ_LABEL_NAMES_KEY = "label_names"
NPZ_SITE_KEYS = {"train": "train_sites", "val": "val_sites", "test": "test_sites"}
NPZ_LAYOUT = (
    "a MedMNIST-style .npz with keys train_images, train_labels, val_images, val_labels, test_images, "
    "test_labels (images uint8 (N,H,W) or (N,H,W,3), labels (N,) or (N,1); the val pair may be left out), "
    "optionally label_names (K strings) and train_sites/val_sites/test_sites (one site id per image, for the "
    "'natural' partition)"
)
ACCEPTED_SOURCES = (
    f"'{DIGITS}' (sklearn's bundled 8x8 digits), a path to {NPZ_LAYOUT}, "
    "a directory of images with one sub-folder per class (optionally split into train/ and test/), "
    "or a CSV manifest path,label[,split][,site]; folders and manifests may list DICOM files"
)
# Inferred class counts above this mean the labels are not class indices (ids, regression targets...).
MAX_INFERRED_CLASSES = 100_000


@dataclass(frozen=True, eq=False, repr=False)
class ImageDataset:
    """Images with integer class labels (and optionally the site id of each image), validated at construction."""

    images: np.ndarray  # uint8, (N, H, W) grey or (N, H, W, 3) RGB
    labels: np.ndarray  # int64, (N,)
    label_names: tuple[str, ...]
    source: str  # human-readable origin, used in error messages
    groups: np.ndarray | None = None  # (N,) str or int64 site ids: the 'natural' partition's sites

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            got = images.dtype if isinstance(images, np.ndarray) else type(images).__name__
            raise DataError(
                f"{self.source}: `images` must be a uint8 numpy array, got {got}; "
                "fix: convert pixel values to 0..255 and cast with .astype(np.uint8)"
            )
        if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
            raise DataError(
                f"{self.source}: `images` must have shape (N,H,W) or (N,H,W,3), got {images.shape}; "
                "fix: squeeze single-channel axes or convert images to RGB"
            )
        if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "iu":
            got = labels.dtype if isinstance(labels, np.ndarray) else type(labels).__name__
            raise DataError(
                f"{self.source}: `labels` must be an integer numpy array, got {got}; "
                "fix: pass labels through validate_labels()"
            )
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise DataError(
                f"{self.source}: `labels` must have shape ({images.shape[0]},) to match {images.shape[0]} images, "
                f"got {labels.shape}; fix: one label per image"
            )
        if isinstance(self.label_names, str) or not all(isinstance(n, str) for n in self.label_names):
            raise DataError(
                f"{self.source}: `label_names` must be a sequence of strings, got {self.label_names!r}; "
                "fix: pass e.g. ('benign', 'malignant')"
            )
        names = tuple(self.label_names)
        if not names or len(set(names)) != len(names):
            raise DataError(
                f"{self.source}: `label_names` must be non-empty and unique, got {names!r}; "
                "fix: give each class exactly one name"
            )
        object.__setattr__(self, "label_names", names)
        object.__setattr__(self, "labels", validate_labels(labels, len(names), source=self.source))
        if self.groups is not None:
            object.__setattr__(self, "groups", validate_groups(self.groups, images.shape[0], source=self.source))

    def __len__(self) -> int:
        """Number of images."""
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        sites = "" if self.groups is None else f", sites={np.unique(self.groups).size}"
        return (
            f"ImageDataset(n={len(self)}, image_shape={self.images.shape[1:]}, "
            f"classes={len(self.label_names)}{sites}, source={self.source!r})"
        )

    def subset(self, indices: np.ndarray) -> ImageDataset:
        """The images at `indices` (integer positions or a boolean mask), in that order, with their site ids."""
        indices = np.asarray(indices)
        if indices.size == 0:
            indices = indices.astype(np.intp)  # np.asarray([]) is float64
        return ImageDataset(
            images=self.images[indices],
            labels=self.labels[indices],
            label_names=self.label_names,
            source=self.source,
            groups=None if self.groups is None else self.groups[indices],
        )

    def fingerprint(self) -> str:
        """SHA-256 hex over dtype, shape and bytes of images and labels, and the label names (not `source`).

        Site ids (`groups`) are left out: they change neither features nor labels, and this fingerprint keys
        the feature cache and names a test set in reports, which should not move when a site column is added.
        """
        digest = hashlib.sha256(b"fedtl.ImageDataset.v1\0")
        for name, array in (("images", self.images), ("labels", self.labels)):
            array = np.ascontiguousarray(array)
            digest.update(f"{name}:{array.dtype.str}:{array.shape}\0".encode())
            digest.update(array.tobytes())
        digest.update(json.dumps(list(self.label_names)).encode())
        return digest.hexdigest()

    def class_counts(self) -> list[int]:
        """Images per class, indexed like `label_names`."""
        return np.bincount(self.labels, minlength=len(self.label_names)).tolist()


@dataclass(frozen=True)
class DataSplits:
    """The training pool (partitioned over sites) and the held-out test set, if any."""

    train: ImageDataset
    test: ImageDataset | None

    def __post_init__(self) -> None:
        test = self.test
        if test is None:
            return
        if test.label_names != self.train.label_names:
            raise DataError(
                f"test split {test.source} has label_names {test.label_names!r} but train split "
                f"{self.train.source} has {self.train.label_names!r}; fix: use the same classes in both"
            )
        if test.images.shape[1:] != self.train.images.shape[1:]:
            raise DataError(
                f"test split {test.source} has images of shape {test.images.shape[1:]} but train split "
                f"{self.train.source} has {self.train.images.shape[1:]}; fix: resize/convert them to match"
            )


def validate_labels(labels: np.ndarray, num_classes: int, *, source: str) -> np.ndarray:
    """Return `labels` as int64 (N,) class indices in [0, num_classes), or raise DataError naming the first bad one."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ConfigError(f"`num_classes` must be an integer >= 1, got {num_classes!r}")
    array = _as_integer_labels(labels, source=source)
    bad = np.flatnonzero((array < 0) | (array >= num_classes))
    if bad.size:
        index = int(bad[0])
        raise DataError(
            f"{source}: label {array[index].item()} at index {index} is outside the allowed range [0, {num_classes}) "
            f"({bad.size} bad label(s) in all); fix: check the label column / label_names"
        )
    return array


def _as_integer_labels(labels: np.ndarray, *, source: str) -> np.ndarray:
    """Flatten (N,1) labels and check they are integers >= 0 (integral floats accepted); returns int64 (N,)."""
    array = np.asarray(labels)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise DataError(
            f"{source}: labels must have shape (N,) or (N,1), got {array.shape}; multi-label or one-hot labels "
            "are not supported; fix: store one class index per image (e.g. labels.argmax(axis=1))"
        )
    if array.dtype.kind == "b":
        array = array.astype(np.int64)
    if array.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(array) | (array != np.round(array)))
        if bad.size:
            index = int(bad[0])
            raise DataError(
                f"{source}: label {array[index].item()} at index {index} is not an integer; labels must be class "
                "indices 0..K-1; fix: check the label column / label_names"
            )
    elif array.dtype.kind not in "iu":
        raise DataError(
            f"{source}: labels must be integers, got dtype {array.dtype}; fix: store labels as an integer "
            "array of class indices 0..K-1 and the class names separately (label_names)"
        )
    negative = np.flatnonzero(array < 0)
    if negative.size:
        index = int(negative[0])
        raise DataError(
            f"{source}: label {array[index].item()} at index {index} is negative; labels must be class indices "
            "in [0, K); fix: check the label column / label_names"
        )
    if array.dtype.kind == "u" and array.size and array.max() > np.iinfo(np.int64).max:
        index = int(np.argmax(array))
        raise DataError(f"{source}: label {array[index].item()} at index {index} is too large for a class index")
    return array.astype(np.int64)


def load_image_file(path: str | Path) -> np.ndarray:
    """Decode one image as uint8 (H,W) for grey modes ('L', '1', 'LA', 'I', 'I;16', 'F') or (H,W,3) for all others.

    Integer/float modes are kept as is when every value lies in 0..255 and scaled by 255/65535 when they
    lie in 0..65535 ('I;16' is always scaled), so 16-bit scans are not clipped to white.
    Raises DataError naming the path when the file is missing, corrupt or not an image.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file {path} does not exist or is not a file; fix: check the path")
    try:
        with Image.open(path) as image:
            image.load()  # PIL decodes lazily: corrupt or truncated data only shows here
            return _image_to_array(image, path)
    except DataError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise DataError(
            f"cannot decode image file {path}: {type(exc).__name__}: {exc}; fix: re-export or remove this file"
        ) from exc


def _image_to_array(image: Image.Image, path: Path) -> np.ndarray:
    """Convert a loaded PIL image to uint8 (H,W) or (H,W,3)."""
    mode = image.mode
    if mode == "L":
        return np.array(image, dtype=np.uint8)
    if mode in ("1", "LA"):
        return np.array(image.convert("L"), dtype=np.uint8)
    if mode in ("I", "F") or mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float64)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > 65535:
            raise DataError(
                f"image file {path} (mode {mode}) has pixel values in [{low}, {high}], outside 0..65535; "
                "fix: convert it to 8-bit grey ('L') or RGB"
            )
        if mode.startswith("I;16") or high > 255:
            values = values * (255.0 / 65535.0)
        return np.round(values).astype(np.uint8)
    if mode == "RGB":
        return np.array(image, dtype=np.uint8)
    return np.array(image.convert("RGB"), dtype=np.uint8)  # RGBA, P, PA, CMYK, YCbCr, ...


def load_dataset(source: str | Path, *, seed: int = 0, test_fraction: float = 0.2) -> DataSplits:
    """Load 'digits', a MedMNIST-style .npz file, an image folder or a CSV manifest as train/test splits.

    Args:
        source: "digits" (checked before any path of that name), a path to a .npz file, a directory with
            one sub-folder per class (or train/ and test/ folders of that layout), or a CSV manifest
            (path,label[,split][,site]); folders and manifests may hold DICOM files (see shared.loaders).
        seed: seeds the stratified train/test split of "digits" and of directories without train/test.
        test_fraction: share of images held out as test where the source has no test split, in (0, 1).

    Returns:
        DataSplits; `train` is the pool to partition over sites, `test` the held-out set.

    Raises:
        ConfigError: `test_fraction` outside (0, 1) or `seed` not an integer in [0, 2**32).
        DataError: unknown source, missing keys, bad labels, corrupt/empty/mixed-size images.
    """
    _check_fraction("test_fraction", test_fraction)
    _check_seed(seed)
    if isinstance(source, str) and source.strip().lower() == DIGITS:
        return _load_digits(seed=seed, test_fraction=test_fraction)
    if not isinstance(source, (str, Path)):
        raise DataError(f"data source must be a string or path, got {source!r}; accepted: {ACCEPTED_SOURCES}")
    path = Path(source).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix.lower() == ".csv"):
        # Image folders, CSV manifests and DICOM: the same loader and validation a real site uses.
        from fedtl.shared.loaders import load_site_dataset  # it builds on this module

        return load_site_dataset(path, seed=seed, test_fraction=test_fraction).splits
    if path.is_file() and path.suffix.lower() == ".npz":
        return _load_npz(path)
    reason = "is a file but not a .npz or .csv" if path.is_file() else "does not exist"
    raise DataError(f"data source {str(source)!r} {reason}; accepted: {ACCEPTED_SOURCES}")


def _load_digits(*, seed: int, test_fraction: float) -> DataSplits:
    """sklearn's bundled 8x8 digits, 0..16 rescaled to 0..255, split stratified by class."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    source = "sklearn digits"
    labels = validate_labels(bunch.target, 10, source=source)
    dataset = ImageDataset(images, labels, tuple(str(d) for d in range(10)), source)
    return _split_dataset(dataset, seed=seed, test_fraction=test_fraction)


def check_split_settings(*, seed: int, test_fraction: float) -> None:
    """Raise ConfigError unless `seed` is an integer in [0, 2**32) and `test_fraction` a number in (0, 1)."""
    _check_fraction("test_fraction", test_fraction)
    _check_seed(seed)


def split_dataset(dataset: ImageDataset, *, seed: int = 0, test_fraction: float = 0.2) -> DataSplits:
    """Split `dataset` into train/test as load_dataset does: seeded, stratified by class when sklearn can.

    Raises:
        ConfigError: `seed` or `test_fraction` out of range.
        DataError: fewer than 2 images.
    """
    check_split_settings(seed=seed, test_fraction=test_fraction)
    return _split_dataset(dataset, seed=seed, test_fraction=test_fraction)


def _split_dataset(dataset: ImageDataset, *, seed: int, test_fraction: float) -> DataSplits:
    """Seeded train/test split, stratified by class when sklearn can (warns when it cannot)."""
    if len(dataset) < 2:
        raise DataError(
            f"{dataset.source}: {len(dataset)} image(s) cannot be split into train and test; "
            "fix: add images or provide train/ and test/ folders"
        )
    train_idx, test_idx, stratified = _split_indices(dataset.labels, test_fraction, seed)
    if not stratified:
        warnings.warn(
            f"{dataset.source}: class counts {dataset.class_counts()} are too small for a stratified "
            f"test_fraction={test_fraction} split; using a plain seeded split",
            stacklevel=3,
        )
    train = dataset.subset(train_idx)
    test = dataset.subset(test_idx)
    return DataSplits(
        train=ImageDataset(train.images, train.labels, train.label_names, f"{dataset.source} (train)", train.groups),
        test=ImageDataset(test.images, test.labels, test.label_names, f"{dataset.source} (test)", test.groups),
    )


def _split_indices(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Sorted (train, test) positions with >= 1 in each; stratified when every class allows it."""
    n = labels.size
    n_test = min(max(math.ceil(test_fraction * n), 1), n - 1)  # same rounding as sklearn
    classes, counts = np.unique(labels, return_counts=True)
    stratified = bool(counts.min() >= 2 and n_test >= classes.size and n - n_test >= classes.size)
    train_idx, test_idx = train_test_split(
        np.arange(n), test_size=n_test, stratify=labels if stratified else None, random_state=seed
    )
    return np.sort(train_idx), np.sort(test_idx), stratified


def _load_npz(path: Path) -> DataSplits:
    """Read a MedMNIST-style .npz: train (+ val appended) as the pool, test as the held-out set."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            found = sorted(npz.files)
            missing = [k for k in ("train_images", "train_labels", "test_images", "test_labels") if k not in found]
            val_keys = [k for k in ("val_images", "val_labels") if k in found]
            if len(val_keys) == 1:
                missing.append(({"val_images", "val_labels"} - set(val_keys)).pop())
            if missing:
                raise DataError(
                    f"{path}: missing key(s) {', '.join(repr(k) for k in missing)}; found keys {found}; "
                    f"expected {NPZ_LAYOUT}; fix: re-save the file with those keys"
                )
            arrays = {key: npz[key] for key in found if key in NPZ_IMAGE_KEYS + NPZ_LABEL_KEYS}
            raw_names = npz[NPZ_LABEL_NAMES_KEY] if NPZ_LABEL_NAMES_KEY in found else None
            raw_sites = {split: npz[key] for split, key in NPZ_SITE_KEYS.items() if key in found}
    except DataError:
        raise
    except Exception as exc:  # zipfile.BadZipFile, OSError, ValueError (object arrays need pickle)
        raise DataError(
            f"cannot read {path} as .npz: {type(exc).__name__}: {exc}; fix: save it with numpy.savez "
            f"(no object arrays) as {NPZ_LAYOUT}"
        ) from exc

    splits = ["train", "val", "test"] if "val_images" in arrays else ["train", "test"]
    images = {split: _npz_images(arrays[f"{split}_images"], path, f"{split}_images") for split in splits}
    labels = {
        split: _as_integer_labels(arrays[f"{split}_labels"], source=f"{path} key '{split}_labels'") for split in splits
    }
    for split in splits:
        if labels[split].shape[0] != images[split].shape[0]:
            raise DataError(
                f"{path}: '{split}_labels' has {labels[split].shape[0]} labels but '{split}_images' has "
                f"{images[split].shape[0]} images; fix: one label per image"
            )
    shapes = {f"{split}_images": images[split].shape[1:] for split in splits}
    if len(set(shapes.values())) > 1:
        raise DataError(f"{path}: image shapes differ between splits: {shapes}; fix: resize/convert all splits alike")
    if images["train"].shape[0] == 0:
        raise DataError(f"{path}: 'train_images' is empty; fix: the training split needs images")

    if raw_names is not None:
        label_names = _npz_label_names(raw_names, path)
    else:
        # The class count comes from the file's own labels: fine for the simulation's shared pool; a real
        # site should check it against the federation's declared classes rather than announce it.
        maxima = [int(lab.max()) for lab in labels.values() if lab.size]
        num_classes = max(maxima) + 1
        if num_classes > MAX_INFERRED_CLASSES:
            raise DataError(
                f"{path}: largest label is {num_classes - 1}, so these do not look like class indices "
                f"(at most {MAX_INFERRED_CLASSES} classes); fix: check the label column / label_names"
            )
        label_names = tuple(str(k) for k in range(num_classes))
    for split in splits:
        labels[split] = validate_labels(labels[split], len(label_names), source=f"{path} key '{split}_labels'")

    train_splits = [s for s in splits if s != "test"]
    sites = _npz_sites(raw_sites, {split: images[split].shape[0] for split in splits}, path)
    train = ImageDataset(
        images=np.concatenate([images[s] for s in train_splits]),
        labels=np.concatenate([labels[s] for s in train_splits]),
        label_names=label_names,
        source=f"{path} ({'+'.join(train_splits)})",
        groups=np.concatenate([sites[s] for s in train_splits]) if "train" in sites else None,
    )
    test = ImageDataset(images["test"], labels["test"], label_names, f"{path} (test)", sites.get("test"))
    return DataSplits(train=train, test=test if len(test) else None)


def _npz_sites(raw: dict[str, np.ndarray], sizes: dict[str, int], path: Path) -> dict[str, np.ndarray]:
    """The optional site ids of an .npz per split; the training pool's splits carry them all or none."""
    unused = sorted(NPZ_SITE_KEYS[split] for split in raw if split not in sizes)
    if unused:
        raise DataError(f"{path}: {unused} given without the matching images; fix: remove it or add the split")
    pool = [split for split in ("train", "val") if split in sizes]
    given = [split for split in pool if split in raw]
    if given and len(given) != len(pool):
        missing = [NPZ_SITE_KEYS[split] for split in pool if split not in raw]
        raise DataError(
            f"{path}: has {[NPZ_SITE_KEYS[s] for s in given]} but not {missing}; the train and val images form one "
            "pool, so site ids must cover both or neither; fix: save the missing key"
        )
    sites = {
        split: validate_groups(raw[split], sizes[split], source=f"{path} key '{NPZ_SITE_KEYS[split]}'") for split in raw
    }
    kinds = {("text" if a.dtype.kind == "U" else "integer") for a in sites.values()}
    if len(kinds) > 1:
        raise DataError(f"{path}: site ids mix text and integer keys; fix: store every *_sites key with one dtype")
    return sites


def _npz_images(array: np.ndarray, path: Path, key: str) -> np.ndarray:
    """Check one image array of an .npz: uint8 (or lossless integers), (N,H,W), (N,H,W,1) or (N,H,W,3)."""
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 3 or (array.ndim == 4 and array.shape[-1] == 3)):
        raise DataError(
            f"{path}: '{key}' has shape {array.shape}, expected (N,H,W) or (N,H,W,3); "
            "fix: store grey images as (N,H,W) and colour ones as (N,H,W,3)"
        )
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind in "iu" and (array.size == 0 or (array.min() >= 0 and array.max() <= 255)):
        return array.astype(np.uint8)
    raise DataError(
        f"{path}: '{key}' has dtype {array.dtype}, expected uint8 pixel values 0..255; "
        "fix: rescale to 0..255 and save with .astype(np.uint8)"
    )


def _npz_label_names(raw: np.ndarray, path: Path) -> tuple[str, ...]:
    """Decode the optional 'label_names' array of an .npz into a tuple of unique strings."""
    if raw.ndim != 1 or raw.size == 0 or raw.dtype.kind not in "US":
        raise DataError(
            f"{path}: 'label_names' must be a non-empty 1-D string array, got dtype {raw.dtype} shape {raw.shape}; "
            "fix: save it as np.array(['name0', 'name1', ...])"
        )
    names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in raw.tolist())
    if len(set(names)) != len(names):
        raise DataError(f"{path}: 'label_names' has duplicates: {names!r}; fix: give each class one unique name")
    return names


def site_split(
    dataset: ImageDataset,
    partition_id: int,
    num_partitions: int,
    *,
    scheme: str = "iid",
    seed: int = 0,
    local_test_fraction: float = 0.2,
    permute_labels: bool = False,
) -> tuple[ImageDataset, ImageDataset]:
    """The (train, test) data of simulated site `partition_id`: its partition, split by a seeded local split.

    The partition comes from shared.partitioners.partition_indices (memoized, so every site and message
    reuses one partitioning; 'natural' uses the dataset's site ids). The local split is stratified when
    every class present has >= 2 samples (and sklearn can place each class on both sides), else a plain
    seeded split; both parts get at least one sample. Its seed is derived from (seed, partition_id) so
    sites do not share a shuffle.

    permute_labels: relabel both parts by the fixed derangement label -> (label + 1) % num_classes. A
        negative-transfer probe: the site's images are honest but its label semantics differ from the
        federation's (a site coding classes differently), so its updates pull the shared head away.

    Raises:
        ConfigError: partition_id out of [0, num_partitions), a bad scheme/num_partitions, a
            local_test_fraction outside (0, 1), a partition of fewer than 2 samples, or permute_labels
            with a single class.
        DataError: scheme 'natural' on data without site ids.
    """
    _check_fraction("local_test_fraction", local_test_fraction)
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, numbers.Integral) or num_partitions < 1:
        raise ConfigError(f"`num_partitions` must be an integer >= 1, got {num_partitions!r}")
    if (
        isinstance(partition_id, bool)
        or not isinstance(partition_id, numbers.Integral)
        or not (0 <= partition_id < num_partitions)
    ):
        raise ConfigError(
            f"`partition_id` must be an integer in [0, {num_partitions}) for num_partitions={num_partitions}, "
            f"got {partition_id!r}; fix: number sites 0..{num_partitions - 1}"
        )
    num_classes = len(dataset.label_names)
    if permute_labels and num_classes < 2:
        raise ConfigError(
            f"`permute_labels` needs at least 2 classes to permute, but {dataset.source} has {num_classes}; "
            "fix: do not mark sites as permuted for single-class data"
        )
    natural = parse_partition(scheme).kind == NATURAL
    if natural and dataset.groups is None:
        raise DataError(
            f"partition scheme 'natural' needs the site of every image, but {dataset.source} has no site ids; "
            "fix: add a 'site' column to the CSV manifest (path,label[,split],site) or 'train_sites' (and "
            "'val_sites') arrays to the .npz, or choose another scheme"
        )
    parts = partition_indices(dataset.labels, num_partitions, scheme=scheme, seed=seed, groups=dataset.groups)
    part = parts[int(partition_id)]
    if part.size < 2:
        site = f" (site id {dataset.groups[part[0]].item()!r})" if natural and part.size else ""
        raise ConfigError(
            f"partition {partition_id}{site} of {num_partitions} over {dataset.source} has {part.size} sample(s), "
            "too few for a local train/test split; fix: use fewer partitions"
            + (" or merge that site's images into another site" if natural else "")
        )
    local_seed = int(np.random.SeedSequence([seed, int(partition_id)]).generate_state(1)[0])
    train_idx, test_idx, _ = _split_indices(dataset.labels[part], local_test_fraction, local_seed)
    train, test = dataset.subset(part[train_idx]), dataset.subset(part[test_idx])
    if permute_labels:
        train, test = (_permute_labels(split, num_classes) for split in (train, test))
    return train, test


def _permute_labels(dataset: ImageDataset, num_classes: int) -> ImageDataset:
    """`dataset` with every label moved to (label + 1) % num_classes: no label keeps its class."""
    labels = (dataset.labels + 1) % num_classes
    return ImageDataset(
        dataset.images, labels, dataset.label_names, f"{dataset.source} (permuted labels)", dataset.groups
    )


def _check_fraction(name: str, value: float) -> None:
    """Raise ConfigError unless `value` is a real number strictly between 0 and 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0 < value < 1):
        raise ConfigError(f"`{name}` must be a number in (0, 1), got {value!r}; fix: e.g. 0.2 holds out 20%")


def _check_seed(seed: int) -> None:
    """Raise ConfigError unless `seed` is an integer in [0, 2**32) (what numpy and sklearn accept)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not (0 <= seed < 2**32):
        raise ConfigError(f"`seed` must be an integer in [0, 2**32), got {seed!r}")
