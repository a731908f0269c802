"""MedMNIST-style .npz files as train/test splits, their class names from the file, MedMNIST's docs or indices."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedtl.shared.dataset import DataSplits, ImageDataset, cast_integer_labels, validate_labels
from fedtl.shared.errors import DataError
from fedtl.shared.labels import check_known_labels, check_label_names
from fedtl.shared.partitioners import validate_groups

__all__ = [
    "FILE",
    "INDICES",
    "MEDMNIST",
    "MEDMNIST_LABEL_NAMES",
    "NPZ_LAYOUT",
    "NpzSplits",
    "map_onto_label_names",
    "read_npz",
]

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
# Inferred class counts above this mean the labels are not class indices (ids, regression targets...).
MAX_INFERRED_CLASSES = 100_000
# Class names the MedMNIST v2 authors document for files that carry none (Yang et al., Scientific Data
# 10:41, 2023, and medmnist/info.py): file-name stem (or its prefix before '_') -> names by label index.
MEDMNIST_LABEL_NAMES = {
    "breastmnist": ("malignant", "normal/benign"),
    "pneumoniamnist": ("normal", "pneumonia"),
    "retinamnist": ("grade 0", "grade 1", "grade 2", "grade 3", "grade 4"),  # diabetic retinopathy grades
}
FILE, MEDMNIST, INDICES = "file", "medmnist", "indices"


@dataclass(frozen=True)
class NpzSplits:
    """An .npz's splits, where their class names came from (FILE, MEDMNIST or INDICES) and notes for a report."""

    splits: DataSplits
    names_from: str
    notes: tuple[str, ...] = ()


def read_npz(path: str | Path) -> NpzSplits:
    """Read a MedMNIST-style .npz: train (+ val appended) as the pool, test as the held-out set (None when empty).

    Class names: the file's 'label_names'; else, for a MedMNIST file by name (breastmnist*.npz, ...), the
    names MedMNIST documents (noted: the file does not carry them); else "0".."K-1" from the largest label
    (possibly one class: callers without declared classes refuse that, a site of a federation need not).

    Raises:
        DataError: missing keys, bad shapes or dtypes, labels out of range, duplicate names.
    """
    path = Path(path)
    try:
        _check_zip_magic(path)
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
    except Exception as exc:  # zipfile.BadZipFile (a cut file), OSError, ValueError (object arrays need pickle)
        raise DataError(
            f"cannot read {path} as .npz: {type(exc).__name__}: {exc}; fix: save it with numpy.savez "
            f"(no object arrays) as {NPZ_LAYOUT}"
        ) from exc

    splits = ["train", "val", "test"] if "val_images" in arrays else ["train", "test"]
    images = {split: _npz_images(arrays[f"{split}_images"], path, f"{split}_images") for split in splits}
    labels = {
        split: cast_integer_labels(arrays[f"{split}_labels"], source=f"{path} key '{split}_labels'") for split in splits
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

    notes: list[str] = []
    largest = max(int(lab.max()) for lab in labels.values() if lab.size)
    documented = _medmnist_names(path)
    if raw_names is not None:
        label_names, names_from = _npz_label_names(raw_names, path), FILE
    elif documented is not None and largest < len(documented[1]):
        label_names, names_from = documented[1], MEDMNIST
        notes.append(
            f"class names of {documented[0]} from MedMNIST's documentation, not from the file (it carries none): "
            + ", ".join(f"{k} {name}" for k, name in enumerate(label_names))
        )
    else:
        # The class count comes from the file's own labels: fine for the simulation's shared pool; a real
        # site maps them onto the federation's declared classes (map_onto_label_names).
        num_classes = largest + 1
        if num_classes > MAX_INFERRED_CLASSES:
            raise DataError(
                f"{path}: largest label is {num_classes - 1}, so these do not look like class indices "
                f"(at most {MAX_INFERRED_CLASSES} classes); fix: check the label column / label_names"
            )
        label_names, names_from = tuple(str(k) for k in range(num_classes)), INDICES
        notes.append(f"class names are the label indices 0..{num_classes - 1} (the .npz has no 'label_names' key)")
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
    return NpzSplits(DataSplits(train=train, test=test if len(test) else None), names_from, tuple(notes))


def _check_zip_magic(path: Path) -> None:
    """Refuse a file that is not a zip archive before numpy reads it (numpy would call it pickled data).

    Raises:
        DataError: the file is one .npy array, or not a zip archive at all.
        OSError: it cannot be opened (the caller names the file).
    """
    with path.open("rb") as fh:
        head = fh.read(6)
    if head.startswith(b"PK"):  # local file header or, for an archive with no arrays, end of central directory
        return
    if head == b"\x93NUMPY":
        what = "it is one .npy array, not an .npz archive of named arrays"
    else:
        what = f"it is not a zip archive (an .npz is one; its first bytes are {head!r}: corrupt, cut or another format)"
    raise DataError(f"cannot read {path} as .npz: {what}; fix: save it with numpy.savez as {NPZ_LAYOUT}")


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
    return check_label_names(names, source=f"{path} key 'label_names'", error=DataError)


def _medmnist_names(path: Path) -> tuple[str, tuple[str, ...]] | None:
    """(data set, documented class names) when the file is named like a MedMNIST file, else None."""
    stem = path.stem.lower()
    for name, names in MEDMNIST_LABEL_NAMES.items():
        if stem == name or stem.startswith(name + "_"):
            return name, names
    return None


def map_onto_label_names(data: NpzSplits, declared: tuple[str, ...], *, source: str) -> tuple[DataSplits, list[str]]:
    """The splits of an .npz (or digits) relabelled onto the federation's `declared` classes, and notes.

    Named classes (FILE) are matched by name. MedMNIST's documented names (MEDMNIST) are matched by name
    when `declared` holds them all, or read as indices when `declared` is "0".."K-1"; any other
    declaration is refused, as index order would silently swap classes (BreastMNIST's 0 is malignant).
    Without names (INDICES) labels are read as indices into `declared`.

    Raises:
        DataError: a label outside `declared`, or MedMNIST classes declared under other names.
    """
    splits = data.splits
    parts = [splits.train] + ([splits.test] if splits.test is not None else [])
    own = splits.train.label_names
    notes: list[str] = []
    as_indices = tuple(str(k) for k in range(len(declared)))
    if data.names_from == MEDMNIST and not set(own) <= set(declared) and declared[: len(own)] != as_indices[: len(own)]:
        raise DataError(
            f"{source} carries no class names; MedMNIST documents {', '.join(f'{k} {n!r}' for k, n in enumerate(own))} "
            f"for it, but the federation declares {list(declared)}, so reading labels as indices could swap "
            f"classes; fix: declare label-names with MedMNIST's names in any order (e.g. '{','.join(own)}'), or "
            "save label_names in the .npz"
        )
    if data.names_from == INDICES or (data.names_from == MEDMNIST and not set(own) <= set(declared)):
        largest = max(int(p.labels.max()) for p in parts if len(p))
        if largest >= len(declared):
            raise DataError(
                f"{source}: label {largest} is outside the federation's {len(declared)} classes {list(declared)}; "
                "the .npz has no 'label_names' key, so labels are read as indices into label_names; fix: "
                "save label_names in the .npz, or check that the site and the federation use the same classes"
            )
        mapping = np.arange(len(own), dtype=np.int64)
        notes.append("labels read as indices into label_names (the .npz has no 'label_names' key)")
    else:
        used = sorted(set().union(*(set(p.labels.tolist()) for p in parts)))
        check_known_labels({own[k]: [f"label index {k}"] for k in used}, declared, source=source)
        mapping = np.array([declared.index(n) if n in declared else -1 for n in own], dtype=np.int64)
        if data.names_from == MEDMNIST:
            notes.extend(data.notes)
    relabelled = [ImageDataset(p.images, mapping[p.labels], declared, p.source, p.groups) for p in parts]
    return DataSplits(train=relabelled[0], test=relabelled[1] if len(relabelled) > 1 else None), notes
