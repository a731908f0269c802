"""Data sets in memory: validated raw inputs (images, texts or table rows) and labels, splits and sites' shares.

A data set's raw inputs are of one kind (`input_kind`): uint8 images (N, H, W[, 3]), texts (an (N,) object
array of str), or table rows (an (N, C) float64 array in a declared schema's column order, numbers as read
and categories as their index in the schema's list: a coding that reads nothing from the data, see
shared.tables). The backbone's preprocessing turns them into a batch (shared.backbones, shared.encoders).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import math
import numbers
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedtl.shared.errors import ConfigError, DataError
from fedtl.shared.partitioners import NATURAL, parse_partition, partition_indices, validate_groups

__all__ = [
    "DIGITS",
    "IMAGES",
    "INPUT_KINDS",
    "ROWS",
    "TEXTS",
    "DataSplits",
    "ImageDataset",
    "cast_integer_labels",
    "check_split_settings",
    "input_kind",
    "load_digits_splits",
    "site_split",
    "split_dataset",
    "validate_labels",
]

DIGITS = "digits"
IMAGES, TEXTS, ROWS = "images", "texts", "rows"
INPUT_KINDS = (IMAGES, TEXTS, ROWS)


def input_kind(inputs: object) -> str | None:
    """Return the kind of raw inputs an array holds (IMAGES, TEXTS or ROWS), or None when it is none of them."""
    if not isinstance(inputs, np.ndarray):
        return None
    if inputs.dtype == np.uint8 and (inputs.ndim == 3 or (inputs.ndim == 4 and inputs.shape[-1] == 3)):
        return IMAGES
    if inputs.dtype == object and inputs.ndim == 1 and all(isinstance(t, str) for t in inputs):
        return TEXTS
    if inputs.dtype == np.float64 and inputs.ndim == 2:
        return ROWS
    return None


@dataclass(frozen=True, eq=False, repr=False)
class ImageDataset:
    """Raw inputs with integer class labels (and optionally the site id of each), validated at construction.

    `images` keeps its name for the many callers that read images, but holds raw inputs of any kind
    (`input_kind`); `inputs` and `kind` name them generally.
    """

    images: np.ndarray  # uint8 (N, H, W) grey or (N, H, W, 3) RGB; (N,) object array of str; (N, C) float64 rows
    labels: np.ndarray  # int64, (N,)
    label_names: tuple[str, ...]
    source: str  # human-readable origin, used in error messages
    groups: np.ndarray | None = None  # (N,) str or int64 site ids: the 'natural' partition's sites

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if input_kind(images) in (TEXTS, ROWS):
            pass  # texts and rows are checked by their loaders (shared.texts, shared.tables) before they get here
        elif not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            got = images.dtype if isinstance(images, np.ndarray) else type(images).__name__
            raise DataError(
                f"{self.source}: `images` must be a uint8 numpy array, got {got}; fix: convert pixel values to "
                "0..255 and cast with .astype(np.uint8) (texts: an object array of str; rows: float64 (N, C))"
            )
        elif not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
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
        """Number of examples."""
        return int(self.images.shape[0])

    @property
    def inputs(self) -> np.ndarray:
        """Return the raw inputs (the `images` field, whatever their kind)."""
        return self.images

    @property
    def kind(self) -> str:
        """Return the kind of the raw inputs: IMAGES, TEXTS or ROWS."""
        return input_kind(self.images) or IMAGES

    def __repr__(self) -> str:
        sites = "" if self.groups is None else f", sites={np.unique(self.groups).size}"
        return (
            f"ImageDataset(n={len(self)}, kind={self.kind}, shape={self.images.shape[1:]}, "
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
        if self.kind == TEXTS:  # strings have no fixed-width bytes: hash each one, length-prefixed
            digest = hashlib.sha256(b"fedtl.TextDataset.v1\0")
            for text in self.images:
                raw = text.encode("utf-8")
                digest.update(len(raw).to_bytes(8, "little"))
                digest.update(raw)
            labels = np.ascontiguousarray(self.labels)
            digest.update(f"labels:{labels.dtype.str}:{labels.shape}\0".encode())
            digest.update(labels.tobytes())
            digest.update(json.dumps(list(self.label_names)).encode())
            return digest.hexdigest()
        digest = hashlib.sha256(b"fedtl.ImageDataset.v1\0")  # rows hash like images: dtype, shape and bytes
        for name, array in (("images", self.images), ("labels", self.labels)):
            array = np.ascontiguousarray(array)
            digest.update(f"{name}:{array.dtype.str}:{array.shape}\0".encode())
            digest.update(array.tobytes())
        digest.update(json.dumps(list(self.label_names)).encode())
        return digest.hexdigest()

    def class_counts(self) -> list[int]:
        """Examples per class, indexed like `label_names`."""
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
        if test.kind != self.train.kind:
            raise DataError(
                f"test split {test.source} holds {test.kind} but train split {self.train.source} holds "
                f"{self.train.kind}; fix: give both splits the same kind of data"
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
    array = cast_integer_labels(labels, source=source)
    bad = np.flatnonzero((array < 0) | (array >= num_classes))
    if bad.size:
        index = int(bad[0])
        raise DataError(
            f"{source}: label {array[index].item()} at index {index} is outside the allowed range [0, {num_classes}) "
            f"({bad.size} bad label(s) in all); fix: check the label column / label_names"
        )
    return array


def cast_integer_labels(labels: np.ndarray, *, source: str) -> np.ndarray:
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


def load_digits_splits(*, seed: int = 0, test_fraction: float = 0.2) -> DataSplits:
    """sklearn's bundled 8x8 digits, 0..16 rescaled to 0..255, split stratified by class (seeded)."""
    check_split_settings(seed=seed, test_fraction=test_fraction)
    pixels, target = _bundled_digits()
    images = np.round(pixels * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    source = "sklearn digits"
    labels = validate_labels(target, 10, source=source)
    dataset = ImageDataset(images, labels, tuple(str(d) for d in range(10)), source)
    return _split_dataset(dataset, seed=seed, test_fraction=test_fraction)


def _bundled_digits() -> tuple[np.ndarray, np.ndarray]:
    """Return scikit-learn's bundled digits, (1797, 8, 8) pixels 0..16 and (1797,) labels, read as `load_digits` does.

    The file is read where the installed scikit-learn keeps it, without importing scikit-learn (1 s of every
    run's start-up); tests/test_data.py checks the arrays equal `load_digits()`'s.

    Raises:
        DataError: scikit-learn, or its digits file, is not installed.
    """
    spec = importlib.util.find_spec("sklearn")  # finds the package without running it
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(roots[0]) / "datasets" / "data" / "digits.csv.gz" if roots else None
    if path is None or not path.is_file():
        raise DataError(
            f"sklearn digits: the bundled file {path or 'digits.csv.gz'} is missing; fix: pip install scikit-learn"
        )
    with gzip.open(path, mode="rt", encoding="utf-8") as fh:
        data = np.loadtxt(fh, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


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
    rng = np.random.RandomState(seed)
    if not stratified:
        order = rng.permutation(n)
        return np.sort(order[n_test:]), np.sort(order[:n_test]), False
    # scikit-learn's stratified shuffle split (`train_test_split(..., stratify=labels, random_state=seed)`), step
    # for step so the same seed draws the same split (tests/test_data.py checks it against scikit-learn), without
    # importing scikit-learn: every site's ClientApp process splits its data.
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    by_class = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    n_train_i = _approximate_mode(counts, n - n_test, rng)
    n_test_i = _approximate_mode(counts - n_train_i, n_test, rng)
    train, test = [], []
    for members, n_tr, n_te in zip(by_class, n_train_i, n_test_i):
        shuffled = members.take(rng.permutation(len(members)), mode="clip")
        train.extend(shuffled[:n_tr])
        test.extend(shuffled[n_tr : n_tr + n_te])
    return np.sort(np.asarray(train, dtype=np.intp)), np.sort(np.asarray(test, dtype=np.intp)), True


def _approximate_mode(counts: np.ndarray, draws: int, rng: np.random.RandomState) -> np.ndarray:
    """Per-class draws closest to `draws` x the class shares, ties broken by `rng` (sklearn's `_approximate_mode`)."""
    continuous = counts / counts.sum() * draws
    floored = np.floor(continuous)
    need = int(draws - floored.sum())
    if need > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:  # the largest remainders first
            (tied,) = np.where(remainder == value)
            take = min(len(tied), need)
            floored[rng.choice(tied, size=take, replace=False)] += 1
            need -= take
            if need == 0:
                break
    return floored.astype(int)


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
