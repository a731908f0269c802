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

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataSplits",
    "ImageDataset",
    "check_split_settings",
    "load_dataset",
    "load_image_file",
    "parse_partition",
    "partition_indices",
    "site_split",
    "split_dataset",
    "validate_labels",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")
DIGITS = "digits"
NPZ_IMAGE_KEYS = ("train_images", "val_images", "test_images")
NPZ_LABEL_KEYS = ("train_labels", "val_labels", "test_labels")
NPZ_LABEL_NAMES_KEY = "label_names"
NPZ_LAYOUT = (
    "a MedMNIST-style .npz with keys train_images, train_labels, val_images, val_labels, test_images, "
    "test_labels (images uint8 (N,H,W) or (N,H,W,3), labels (N,) or (N,1); the val pair may be left out) "
    "and optionally label_names (K strings)"
)
ACCEPTED_SOURCES = (
    f"'{DIGITS}' (sklearn's bundled 8x8 digits), a path to {NPZ_LAYOUT}, "
    "a directory of images with one sub-folder per class (optionally split into train/ and test/), "
    "or a CSV manifest path,label[,split]; folders and manifests may list DICOM files"
)
ACCEPTED_PARTITIONS = "'iid' or 'dirichlet:<alpha>' with alpha > 0 (e.g. 'dirichlet:0.5')"
# Dirichlet draws tried before giving up; each draw only computes partition sizes, so this is cheap.
MAX_DIRICHLET_ATTEMPTS = 10_000
# Inferred class counts above this mean the labels are not class indices (ids, regression targets...).
MAX_INFERRED_CLASSES = 100_000


@dataclass(frozen=True, eq=False, repr=False)
class ImageDataset:
    """Images with integer class labels, validated at construction."""

    images: np.ndarray  # uint8, (N, H, W) grey or (N, H, W, 3) RGB
    labels: np.ndarray  # int64, (N,)
    label_names: tuple[str, ...]
    source: str  # human-readable origin, used in error messages

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

    def __len__(self) -> int:
        """Number of images."""
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return (
            f"ImageDataset(n={len(self)}, image_shape={self.images.shape[1:]}, "
            f"classes={len(self.label_names)}, source={self.source!r})"
        )

    def subset(self, indices: np.ndarray) -> ImageDataset:
        """The images at `indices` (integer positions or a boolean mask), in that order."""
        indices = np.asarray(indices)
        if indices.size == 0:
            indices = indices.astype(np.intp)  # np.asarray([]) is float64
        return ImageDataset(
            images=self.images[indices],
            labels=self.labels[indices],
            label_names=self.label_names,
            source=self.source,
        )

    def fingerprint(self) -> str:
        """SHA-256 hex over dtype, shape and bytes of images and labels, and the label names (not `source`)."""
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
            (path,label[,split]); folders and manifests may hold DICOM files (see shared.loaders).
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
        train=ImageDataset(train.images, train.labels, train.label_names, f"{dataset.source} (train)"),
        test=ImageDataset(test.images, test.labels, test.label_names, f"{dataset.source} (test)"),
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
    train = ImageDataset(
        images=np.concatenate([images[s] for s in train_splits]),
        labels=np.concatenate([labels[s] for s in train_splits]),
        label_names=label_names,
        source=f"{path} ({'+'.join(train_splits)})",
    )
    test = ImageDataset(images["test"], labels["test"], label_names, f"{path} (test)")
    return DataSplits(train=train, test=test if len(test) else None)


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


def parse_partition(scheme: str) -> tuple[str, float | None]:
    """Parse a partition spec: 'iid' -> ('iid', None); 'dirichlet:0.5' -> ('dirichlet', 0.5)."""
    if not isinstance(scheme, str):
        raise ConfigError(f"partition scheme must be a string, got {scheme!r}; accepted: {ACCEPTED_PARTITIONS}")
    text = scheme.strip().lower()
    if text == "iid":
        return "iid", None
    name, sep, value = text.partition(":")
    if name.strip() == "dirichlet" and sep:
        try:
            alpha = float(value)
        except ValueError:
            raise ConfigError(
                f"partition scheme {scheme!r}: dirichlet alpha {value.strip()!r} is not a number; "
                f"accepted: {ACCEPTED_PARTITIONS}"
            ) from None
        if not (math.isfinite(alpha) and alpha > 0):
            raise ConfigError(
                f"partition scheme {scheme!r}: dirichlet alpha must be a finite number > 0, got {alpha}; "
                "smaller alpha = more label skew (0.1 strong, 1.0 mild, 100 near-iid)"
            )
        return "dirichlet", alpha
    raise ConfigError(f"unknown partition scheme {scheme!r}; accepted: {ACCEPTED_PARTITIONS}")


def partition_indices(
    labels: np.ndarray, num_partitions: int, *, scheme: str = "iid", seed: int = 0
) -> list[np.ndarray]:
    """Split sample positions into `num_partitions` disjoint, sorted index arrays that cover every sample once.

    Args:
        labels: class index per sample, (N,) or (N,1).
        num_partitions: number of simulated sites, in [1, N].
        scheme: "iid" (seeded shuffle, near-equal sizes) or "dirichlet:<alpha>" (label skew).
        seed: the same seed gives the same partitions.

    Raises:
        ConfigError: bad scheme, num_partitions out of range, or a Dirichlet setting so extreme that
            no draw gives every partition min(10, N // num_partitions) samples.
    """
    kind, alpha = parse_partition(scheme)
    _check_seed(seed)
    labels = _as_integer_labels(labels, source="partition labels")
    n = labels.size
    if (
        isinstance(num_partitions, bool)
        or not isinstance(num_partitions, numbers.Integral)
        or not (1 <= num_partitions <= n)
    ):
        raise ConfigError(
            f"`num_partitions` must be an integer in [1, {n}] (the number of samples), got {num_partitions!r}; "
            "fix: use fewer sites or more data"
        )
    num_partitions = int(num_partitions)
    rng = np.random.default_rng(seed)
    if kind == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(n), num_partitions)]
    assert alpha is not None
    return _dirichlet_partition(labels, num_partitions, alpha, rng)


def _dirichlet_partition(
    labels: np.ndarray, num_partitions: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Label-skewed partitions: each class's samples split over partitions by proportions ~ Dir(alpha).

    The per-class Dirichlet split of Yurochkin et al. 2019 / Wang et al. 2020 (FedMA) that the FL literature
    uses for the label skew studied by Hsu et al. 2019, "Measuring the effects of non-identical data
    distribution"; as in those codes, draws are repeated until every partition has min(10, N // P) samples.
    alpha -> 0: each class on one site; alpha -> inf: iid.
    """
    n = labels.size
    min_size = min(10, n // num_partitions)
    classes = np.unique(labels)
    class_indices = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    counts = np.array([ix.size for ix in class_indices], dtype=np.int64)  # (K,)
    concentration = np.full(num_partitions, alpha)
    for _ in range(MAX_DIRICHLET_ATTEMPTS):
        proportions = rng.dirichlet(concentration, size=classes.size)  # (K, P)
        if not np.all(np.isfinite(proportions)):
            continue
        cuts = (np.cumsum(proportions, axis=1)[:, :-1] * counts[:, None]).astype(np.int64)  # (K, P-1)
        bounds = np.concatenate([np.zeros((classes.size, 1), np.int64), cuts, counts[:, None]], axis=1)
        bounds = np.minimum(bounds, counts[:, None])  # (K, P+1), guards cumsum rounding above 1
        sizes = np.diff(bounds, axis=1).sum(axis=0)  # (P,)
        if sizes.min() >= min_size:
            parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
            for k, ix in enumerate(class_indices):
                for p, chunk in enumerate(np.split(ix, bounds[k, 1:-1])):
                    parts[p].append(chunk)
            return [np.sort(np.concatenate(chunks)) for chunks in parts]
    raise ConfigError(
        f"partition scheme 'dirichlet:{alpha}' with num_partitions={num_partitions} over {n} samples of "
        f"{classes.size} classes left some partition with fewer than {min_size} samples in all "
        f"{MAX_DIRICHLET_ATTEMPTS} draws: alpha/num_partitions is too extreme; fix: raise alpha "
        "(e.g. 0.1 or more) or use fewer partitions"
    )


def site_split(
    dataset: ImageDataset,
    partition_id: int,
    num_partitions: int,
    *,
    scheme: str = "iid",
    seed: int = 0,
    local_test_fraction: float = 0.2,
) -> tuple[ImageDataset, ImageDataset]:
    """The (train, test) data of simulated site `partition_id`: its partition, split by a seeded local split.

    The local split is stratified when every class present has >= 2 samples (and sklearn can place each
    class on both sides), else a plain seeded split; both parts get at least one sample. Its seed is
    derived from (seed, partition_id) so sites do not share a shuffle.

    Raises:
        ConfigError: partition_id out of [0, num_partitions), a bad scheme/num_partitions, a
            local_test_fraction outside (0, 1), or a partition of fewer than 2 samples.
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
    part = partition_indices(dataset.labels, num_partitions, scheme=scheme, seed=seed)[int(partition_id)]
    if part.size < 2:
        raise ConfigError(
            f"partition {partition_id} of {num_partitions} over {dataset.source} has {part.size} sample(s), "
            "too few for a local train/test split; fix: use fewer partitions"
        )
    local_seed = int(np.random.SeedSequence([seed, int(partition_id)]).generate_state(1)[0])
    train_idx, test_idx, _ = _split_indices(dataset.labels[part], local_test_fraction, local_seed)
    return dataset.subset(part[train_idx]), dataset.subset(part[test_idx])


def _check_fraction(name: str, value: float) -> None:
    """Raise ConfigError unless `value` is a real number strictly between 0 and 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0 < value < 1):
        raise ConfigError(f"`{name}` must be a number in (0, 1), got {value!r}; fix: e.g. 0.2 holds out 20%")


def _check_seed(seed: int) -> None:
    """Raise ConfigError unless `seed` is an integer in [0, 2**32) (what numpy and sklearn accept)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not (0 <= seed < 2**32):
        raise ConfigError(f"`seed` must be an integer in [0, 2**32), got {seed!r}")
