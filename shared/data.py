"""A federation's data: load it from any source (digits, .npz, image folder, CSV manifest) and check it before a run.

The pieces live in their own modules, in import order: shared.dataset (ImageDataset, splits, sites'
shares), shared.labels (class names), shared.images (pixels and bit depth), shared.npz (.npz files),
shared.loaders (folders, manifests, DICOM); this module sits on top and re-exports what callers use.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedtl.shared.dataset import (
    DIGITS,
    DataSplits,
    ImageDataset,
    check_split_settings,
    site_split,
    split_dataset,
    validate_labels,
)
from fedtl.shared.errors import ConfigError, DataError
from fedtl.shared.images import IMAGE_EXTENSIONS, load_image_file
from fedtl.shared.labels import MIN_CLASSES, check_label_names
from fedtl.shared.loaders import (
    CSV_EXTENSION,
    JSONL_EXTENSION,
    NPZ_EXTENSION,
    LoadReport,
    SiteData,
    load_site_dataset,
)
from fedtl.shared.named_data import NAMED_SOURCES, named_source
from fedtl.shared.npz import NPZ_LAYOUT
from fedtl.shared.tables import TABLE_EXTENSIONS, TableSchema

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataSplits",
    "FederationData",
    "ImageDataset",
    "check_federation_data",
    "check_split_settings",
    "load_dataset",
    "load_image_file",
    "site_split",
    "split_dataset",
    "validate_labels",
]

ACCEPTED_SOURCES = (
    f"'{DIGITS}' (sklearn's bundled 8x8 digits), a path to {NPZ_LAYOUT}, "
    "a directory of images with one sub-folder per class (optionally split into train/ and test/), "
    "or a CSV manifest path,label[,split][,site]; folders and manifests may list DICOM files; texts: a CSV "
    "text,label[,split] or a .jsonl file; table rows: a .csv or .parquet file under the federation's `schema`; "
    f"or a named data set: {', '.join(NAMED_SOURCES)}"
)


@dataclass(frozen=True)
class FederationData:
    """What check_federation_data found: the federation's classes, how the data was read, each site's size."""

    label_names: tuple[str, ...]
    report: LoadReport
    site_sizes: tuple[tuple[int, int], ...]  # (train, local test) images of each simulated site

    def summary(self) -> str:
        """The loader's report and one line on the sites' shares."""
        sizes = [train + test for train, test in self.site_sizes]
        return (
            f"{self.report.summary()}\nsites: {len(sizes)}, {min(sizes)}..{max(sizes)} images each (train + local test)"
        )


def load_dataset(
    source: str | Path,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    label_names: Sequence[str] | None = None,
    schema: TableSchema | None = None,
) -> DataSplits:
    """Load 'digits', a MedMNIST-style .npz file, an image folder or a CSV manifest as train/test splits.

    Args:
        source: "digits" (checked before any path of that name), a path to a .npz file, a directory with
            one sub-folder per class (or train/ and test/ folders of that layout), or a CSV manifest
            (path,label[,split][,site]); folders and manifests may hold DICOM files (see shared.loaders).
        seed: seeds the stratified train/test split of "digits" and of directories without train/test.
        test_fraction: share of images held out as test where the source has no test split, in (0, 1).
        label_names: the federation's declared classes, in any order, which becomes the class order;
            every label must be one of them. None: derived from the data (shared.labels rules).
        schema: the federation's table schema, under which a .csv or .parquet source is read as table rows.

    Returns:
        DataSplits; `train` is the pool to partition over sites, `test` the held-out set (None only for
        an .npz without test images).

    Raises:
        ConfigError: `test_fraction` outside (0, 1), `seed` not an integer in [0, 2**32), bad `label_names`.
        DataError: unknown source, missing keys, bad, clashing or unknown labels, fewer than 2 classes with
            training images, corrupt/empty/mixed-size images.
    """
    read = _read_federation_data(source, seed=seed, test_fraction=test_fraction, label_names=label_names, schema=schema)
    return read.splits


def check_federation_data(
    data: str,
    *,
    label_names: Sequence[str] = (),
    num_sites: int,
    partition: str = "iid",
    seed: int = 0,
    test_fraction: float = 0.2,
    local_test_fraction: float = 0.2,
    permuted_label_sites: Sequence[int] = (),
    schema: TableSchema | None = None,
) -> FederationData:
    """Check a simulated federation's data before any site trains: classes, images, and every site's share.

    Everything a simulated site would find wrong at its first message (after other sites were charged)
    is found here first: the data loads as the sites load it, its classes are declared or derived once
    (at least 2 with training images, no clashing labels), and every site's partition can be split.

    Args:
        data, label_names, partition, seed, test_fraction, local_test_fraction: the run config's values
            (`data`, `label-names` as a sequence, `partition`, `seed`, `test-fraction`, `local-test-fraction`).
        num_sites: number of simulated sites.
        permuted_label_sites: the run config's `permuted-label-sites`, as site numbers.

    Raises:
        ConfigError: no data, a bad partition, too many sites for the data, a permuted site out of range.
        DataError: the data cannot be used (the message names the input, the problem and the fix).
    """
    if not data:
        raise ConfigError(
            "`data` is \"\", but simulated sites take their share of the data; fix: set data to 'digits', an "
            ".npz, an image folder or a CSV manifest"
        )
    if isinstance(num_sites, bool) or not isinstance(num_sites, numbers.Integral) or num_sites < 1:
        raise ConfigError(f"the number of sites must be an integer >= 1, got {num_sites!r}")
    outside = sorted(p for p in permuted_label_sites if not 0 <= p < num_sites)
    if outside:
        raise ConfigError(
            f"`permuted-label-sites` names site(s) {outside}, but the federation has sites 0..{num_sites - 1}; "
            "fix: name existing sites"
        )
    declared = tuple(label_names) or None
    read = _read_federation_data(data, seed=seed, test_fraction=test_fraction, label_names=declared, schema=schema)
    train = read.splits.train
    sizes = []
    for partition_id in range(num_sites):
        site_train, site_test = site_split(
            train,
            partition_id,
            num_sites,
            scheme=partition,
            seed=seed,
            local_test_fraction=local_test_fraction,
            permute_labels=partition_id in permuted_label_sites,
        )
        sizes.append((len(site_train), len(site_test)))
    return FederationData(train.label_names, read.report, tuple(sizes))


def _read_federation_data(
    source: str | Path,
    *,
    seed: int,
    test_fraction: float,
    label_names: Sequence[str] | None,
    schema: TableSchema | None = None,
) -> SiteData:
    """The data and load report of a federation's shared pool, with at least MIN_CLASSES classes to train."""
    check_split_settings(seed=seed, test_fraction=test_fraction)
    declared = None if label_names is None else check_label_names(label_names, source="`label-names`")
    if isinstance(source, str) and source.strip().lower() == DIGITS:
        read = load_site_dataset(DIGITS, label_names=declared, seed=seed, test_fraction=test_fraction)
    elif not isinstance(source, (str, Path)):
        raise DataError(f"data source must be a string or path, got {source!r}; accepted: {ACCEPTED_SOURCES}")
    elif named_source(source) is not None and not Path(source).expanduser().exists():
        read = load_site_dataset(
            source, label_names=declared, seed=seed, test_fraction=test_fraction, require_test=False, schema=schema
        )
    else:
        path = Path(source).expanduser()
        suffix = path.suffix.lower()
        accepted = (CSV_EXTENSION, NPZ_EXTENSION, JSONL_EXTENSION, *TABLE_EXTENSIONS)
        if not (path.is_dir() or (path.is_file() and suffix in accepted)):
            reason = f"is a file but not one of {', '.join(accepted)}" if path.is_file() else "does not exist"
            raise DataError(f"data source {str(source)!r} {reason}; accepted: {ACCEPTED_SOURCES}")
        # Image folders, CSV manifests, DICOM and .npz: the same loader and validation a real site uses.
        read = load_site_dataset(
            path, label_names=declared, seed=seed, test_fraction=test_fraction, require_test=False, schema=schema
        )
    _check_training_classes(read.splits.train)
    return read


def _check_training_classes(train: ImageDataset) -> None:
    """Raise DataError unless at least MIN_CLASSES classes have training images (the federation learns them)."""
    counts = dict(zip(train.label_names, train.class_counts()))
    present = [name for name, n in counts.items() if n]
    if len(present) < MIN_CLASSES:
        raise DataError(
            f"{train.source}: only {len(present)} class(es) {present} have training images (counts {counts}); a "
            f"classifier needs at least {MIN_CLASSES} (one class trains to accuracy 1.0 and learns nothing, while "
            "charging epsilon); fix: add training images of the other classes"
        )
