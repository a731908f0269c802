"""Site data loaders: image folders, CSV manifests, DICOM, MedMNIST .npz, texts and tables, validated before training.

Texts (a CSV with text,label columns or JSON lines; shared.texts) and table rows (CSV or Parquet under
the federation's declared schema; shared.tables) are read by their own modules and become data sets
here, with the same label, split and report rules as images. So do the named bank data sets of
shared.named_data (`cfpb-complaints`, `german-credit`).

A real site's data is read here and checked once, at the boundary: unknown or inconsistent labels
(shared.labels), missing or corrupt files, mixed sizes and empty splits are errors that name the files and
the fix, or (bad-files = "skip", for unreadable/missing files only) omissions listed in a LoadReport. The
bit depth of 16-bit images is detected per data set (shared.images). Nothing under the source is written.

The LoadReport stays at the site: its class counts are raw, not differentially private, so it is for
the site operator (`fedtl site check`) and must not be sent to the server.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import logging
import math
import numbers
import os
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut

from fedtl.shared.dataset import (
    DIGITS,
    IMAGES,
    ROWS,
    TEXTS,
    DataSplits,
    ImageDataset,
    check_split_settings,
    load_digits_splits,
    split_dataset,
)
from fedtl.shared.errors import ConfigError, DataError
from fedtl.shared.images import (
    IMAGE_EXTENSIONS,
    DecodedImage,
    choose_bit_depth,
    describe_bit_depths,
    read_image_file,
    scale_to_uint8,
)
from fedtl.shared.labels import MIN_CLASSES, check_known_labels, check_label_names, derive_label_names
from fedtl.shared.named_data import NAMED_SOURCES, NamedSource, named_source, named_source_files, schema_path
from fedtl.shared.npz import FILE, INDICES, MEDMNIST, NpzSplits, map_onto_label_names, read_npz
from fedtl.shared.rows import SPLIT_COLUMN, SPLIT_VALUES, listing
from fedtl.shared.tables import TABLE_EXTENSIONS, TableSchema, load_schema, read_table_rows
from fedtl.shared.texts import TEXT_LAYOUT, is_text_csv, read_text_records

__all__ = [
    "BAD_FILES_MODES",
    "DICOM_EXTENSION",
    "SITE_FORMATS",
    "LoadReport",
    "SiteData",
    "SkippedFile",
    "check_site_source",
    "image_files_below",
    "load_dicom_file",
    "load_site_dataset",
]

logger = logging.getLogger(__name__)

SITE_FORMATS = ("folder", "csv", "dicom", "npz", "digits", "text", "table")
JSONL_EXTENSION = ".jsonl"
BAD_FILES_MODES = ("error", "skip")
DICOM_EXTENSION = ".dcm"
CSV_EXTENSION = ".csv"
NPZ_EXTENSION = ".npz"
MANIFEST_COLUMNS = ("path", "label")
SITE_COLUMN = "site"  # optional: the image's site id, for the 'natural' partition of simulated federations
SPLITS = ("train", "test")
SKIP_HINT = (
    'a site may set bad-files = "skip" in its policy (bad_files="skip" in load_site_dataset) to leave them out, '
    "listed in its report"
)
DICOM_PREAMBLE = 128  # the 'DICM' marker follows a 128-byte preamble (PS3.10 7.1)
GREY_PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")
VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")
ACCEPTED_SITE_SOURCES = (
    "a directory with one sub-folder per class (root/<class>/<file>, or root/train/<class>/... and "
    "root/test/<class>/...), a .csv manifest with columns path,label (optional split and site), "
    "a MedMNIST-style .npz file, or 'digits' (sklearn's bundled digits, to try a site out); texts: "
    f"{TEXT_LAYOUT}; table rows: a .csv or .parquet file with the columns of the federation's schema; or a named "
    f"data set: {', '.join(NAMED_SOURCES)}"
)
MANIFEST_LAYOUT = (
    "a header row path,label (optional split with values train, test or val, and optional site naming the "
    "image's site) and one row per image; paths relative to the manifest's folder or absolute; labels are "
    "class names"
)


@dataclass(frozen=True)
class SkippedFile:
    """A file left out because bad_files='skip', and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class LoadReport:
    """What load_site_dataset read: format, counts per split and class, skipped files and notes."""

    source: str
    format: str  # one of SITE_FORMATS
    label_names: tuple[str, ...]
    image_shape: tuple[int, ...]  # (H, W) grey or (H, W, 3) RGB
    split_counts: Mapping[str, int]  # {"train": n, "test": m}
    class_counts: Mapping[str, Mapping[str, int]]  # {"train": {label name: n}, "test": {...}}
    skipped: tuple[SkippedFile, ...] = ()
    notes: tuple[str, ...] = ()
    classes_from: str = ""  # where label_names came from: declared, derived from the labels, the file...
    pixel_depth: str = ""  # bit depth of the images read and how it was found (shared.images)
    inputs: str = IMAGES  # the kind of raw inputs: images, texts or rows
    details: str = ""  # texts: their lengths; rows: the schema

    def summary(self) -> str:
        """Human-readable text: counts per split and class, skipped files and notes."""
        splits = ", ".join(f"{n} {split}" for split, n in self.split_counts.items())
        lines = [f"source: {self.source} ({self.format})"]
        if self.inputs == IMAGES:
            shape = "x".join(str(d) for d in self.image_shape[1::-1])  # width x height
            colour = "RGB" if len(self.image_shape) == 3 else "grey"
            lines.append(f"images: {splits}; {shape} {colour}")
        else:
            lines.append(f"{self.inputs}: {splits}" + (f"; {self.details}" if self.details else ""))
        if self.pixel_depth:
            lines.append(f"pixels: {self.pixel_depth}")
        from_ = f", {self.classes_from}" if self.classes_from else ""
        lines.append(f"classes ({len(self.label_names)}{from_}):")
        width = max(len(name) for name in self.label_names)
        lines.append(f"  {'':<{width}}  " + "  ".join(f"{split:>6}" for split in self.class_counts))
        for name in self.label_names:
            counts = "  ".join(f"{per_class[name]:>6}" for per_class in self.class_counts.values())
            lines.append(f"  {name:<{width}}  {counts}")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} file(s):")
            lines.extend(f"  {s.path}: {s.reason}" for s in self.skipped)
        if self.notes:
            lines.append("notes:")
            lines.extend(f"  - {note}" for note in self.notes)
        return "\n".join(lines)


@dataclass(frozen=True)
class SiteData:
    """A site's validated train/test splits and the report of how they were read."""

    splits: DataSplits
    report: LoadReport


@dataclass(frozen=True)
class _Entry:
    """One image to read: its file, class name, split ("train"/"test", None = split by seed), origin and site."""

    path: Path
    label: str
    split: str | None
    origin: str  # where it was listed, for messages: "line 4" or the file's path under the root
    site: str | None = None  # the manifest's site column, when it has one
    relative: bool = False  # listed by a relative path (resolved against the manifest's folder)


def load_site_dataset(
    source: str | Path,
    *,
    label_names: Sequence[str] | None = None,
    bad_files: str = "error",
    seed: int = 0,
    test_fraction: float = 0.2,
    require_test: bool = True,
    schema: TableSchema | None = None,
) -> SiteData:
    """Load and validate a site's images from a folder, a CSV manifest or a MedMNIST .npz, or its texts or rows.

    Format, from `source`: a directory is an image folder (root/<class>/<file>, searched recursively, or
    root/train/<class>/... + root/test/<class>/... with an optional root/val/ merged into train); a .csv
    file is a manifest (columns path,label, optional split and site); a .npz is read by shared.npz.
    Files ending in .dcm, or without an image extension but with the DICOM 'DICM' marker, are decoded with
    load_dicom_file; the report's format is "dicom" when every image read was DICOM. Links to files are
    read; a link to a folder (not followed) or to nothing in a class folder is a file that cannot be read:
    refused, or (bad_files="skip") left out and listed in report.skipped.

    Args:
        source: the directory, .csv or .npz path.
        label_names: the federation's classes in any order, which becomes the class order; every label at
            the site must be one of them, and a declared class without examples is allowed (noted in the
            report). None: sorted class-folder names or unique manifest labels (the site's own,
            data-dependent set), refused when fewer than 2 or when they differ only by case, type or
            spelling (shared.labels).
        bad_files: "error" (default) raises on missing or unreadable files; "skip" leaves them out,
            records them in report.skipped and logs a warning.
        seed, test_fraction: the stratified train/test split when the source has no split of its own.
        require_test: refuse an .npz without test images (a site needs a local test split; the lab's
            shared pool may have none).
        schema: the federation's table schema: a .csv or .parquet source is then read as table rows under it
            (shared.tables). Without it a .csv holding a `text` column, or a .jsonl file, is read as texts
            (shared.texts). A named data set (shared.named_data) brings its own.

    Returns:
        SiteData with the splits (train and a non-empty test) and the LoadReport.

    Raises:
        ConfigError: bad `bad_files`, `label_names`, `seed` or `test_fraction`.
        DataError: unknown source; empty folder or manifest; missing columns; bad split value; unknown,
            clashing or too few labels; missing/unreadable files (bad_files="error"); mixed image sizes;
            an empty split.
    """
    if bad_files not in BAD_FILES_MODES:
        raise ConfigError(
            f"`bad_files` must be one of {list(BAD_FILES_MODES)}, got {bad_files!r}; fix: 'error' stops at the "
            "first load with missing or unreadable files, 'skip' leaves them out and lists them in the report"
        )
    check_split_settings(seed=seed, test_fraction=test_fraction)
    declared = None if label_names is None else check_label_names(label_names, source="`label_names`")
    if isinstance(source, str) and source.strip().lower() == DIGITS:
        return _load_array_site(DIGITS, DIGITS, declared, seed=seed, test_fraction=test_fraction, require_test=True)
    if not isinstance(source, (str, Path)):
        raise DataError(f"site data source must be a path, got {source!r}; accepted: {ACCEPTED_SITE_SOURCES}")
    named = named_source(source)
    if named is not None and not Path(source).expanduser().exists():
        return _load_named_site(named, declared, schema, seed=seed, test_fraction=test_fraction)
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if path.is_file() and schema is not None and suffix in TABLE_EXTENSIONS:
        rows = read_table_rows(path, schema)
        parts = [(rows.rows, rows.labels, rows.splits, rows.origins)]
        return _load_records_site(path, ROWS, parts, rows.notes, declared, seed, test_fraction, require_test, schema)
    if path.is_file() and (suffix == JSONL_EXTENSION or (suffix == CSV_EXTENSION and is_text_csv(path))):
        texts = read_text_records(path)
        parts = [(texts.texts, texts.labels, texts.splits, texts.origins)]
        return _load_records_site(path, TEXTS, parts, texts.notes, declared, seed, test_fraction, require_test, None)
    if path.is_file() and suffix in TABLE_EXTENSIONS[1:]:
        raise DataError(
            f"site data source {path} is a table, which is read under the federation's schema; fix: give the schema "
            "(run config `schema`, site policy `site.schema`)"
        )
    if path.is_dir():
        entries, found, notes = _folder_entries(path)
        container = "folder"
    elif path.is_file() and path.suffix.lower() == CSV_EXTENSION:
        entries, found, notes = _manifest_entries(path)
        container = "csv"
    elif path.is_file() and path.suffix.lower() == NPZ_EXTENSION:
        return _load_array_site(
            path, "npz", declared, seed=seed, test_fraction=test_fraction, require_test=require_test
        )
    elif path.is_file() and (path.suffix.lower() == DICOM_EXTENSION or _has_dicom_marker(path)):
        raise DataError(
            f"site data source {path} is a single DICOM file, which carries no class label; fix: list the "
            f"DICOM files in a .csv manifest ({MANIFEST_LAYOUT}) or put them in one sub-folder per class"
        )
    else:
        reason = "is a file of an unsupported type" if path.is_file() else "does not exist"
        raise DataError(f"site data source {str(source)!r} {reason}; accepted: {ACCEPTED_SITE_SOURCES}")
    return _load_entries(path, container, entries, found, notes, declared, bad_files, seed, test_fraction)


def check_site_source(
    source: str | Path, *, label_names: Sequence[str] | None = None, schema: TableSchema | None = None
) -> str:
    """Check a site's data without decoding its images; return one line saying what was found.

    What `fedtl site init` can check at once: the source exists and is a folder, manifest, .npz or
    'digits'; a folder or manifest lists image files; its labels fit `label_names` (or, undeclared, are
    at least 2 and do not clash). Unreadable files, sizes and bit depths show at `fedtl site check`.

    Raises:
        ConfigError: bad `label_names`.
        DataError: as load_site_dataset, for everything above.
    """
    declared = None if label_names is None else check_label_names(label_names, source="`label_names`")
    if isinstance(source, str) and source.strip().lower() == DIGITS:
        return "sklearn digits (10 classes)"
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if named_source(source) is not None or (
        path.is_file()
        and (
            suffix in (JSONL_EXTENSION, *TABLE_EXTENSIONS[1:])
            or (suffix == CSV_EXTENSION and (schema is not None or is_text_csv(path)))
        )
    ):
        data = load_site_dataset(source, label_names=declared, schema=schema)
        found = sum(data.report.split_counts.values())
        return f"{data.report.source}: {data.report.inputs} ({found}), classes {list(data.report.label_names)}"
    if path.is_dir():
        entries, found, _ = _folder_entries(path)
        container = "folder"
    elif path.is_file() and path.suffix.lower() == CSV_EXTENSION:
        entries, found, _ = _manifest_entries(path)
        container = "csv"
    elif path.is_file() and path.suffix.lower() == NPZ_EXTENSION:
        data = _load_array_site(path, "npz", declared, seed=0, test_fraction=0.2, require_test=True)
        images = sum(data.report.split_counts.values())
        return f"{path}: .npz with {images} images, classes {list(data.report.label_names)}"
    else:
        reason = "is a file of an unsupported type" if path.is_file() else "does not exist"
        raise DataError(f"site data source {str(source)!r} {reason}; accepted: {ACCEPTED_SITE_SOURCES}")
    names, _ = _entry_label_names(path, container, entries, found, declared)
    return f"{path}: {container} listing {len(entries)} image(s), classes {list(names)}"


def source_stamp(source: str | Path) -> str | None:
    """Return a cheap fingerprint of what `source` reads: names, sizes, inodes and change times of its files.

    It lets a site find its cached features without decoding every image again at every message; the
    change time (ctime) moves with any write, rename or permission change and
    cannot be set back by copy tools. Returns None when the source cannot be stamped (it is then loaded, and its
    errors reported, in full).
    """
    if isinstance(source, str) and source.strip().lower() == DIGITS:
        return None  # built in, not files
    path = Path(source).expanduser()
    digest = hashlib.sha256(b"fedtl.source-stamp.v1\0")

    def add(file: Path, name: str) -> None:
        st = file.stat()  # ctime changes with any write, rename or chmod and cannot be set back by tools
        digest.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\n".encode())

    try:
        if path.is_dir():
            for file in _files_below(path):
                add(file, str(file.relative_to(path)))
        elif path.is_file():
            add(path, path.name)
            if path.suffix.lower() == CSV_EXTENSION:
                digest.update(path.read_bytes())
                with path.open(newline="", encoding="utf-8") as handle:
                    reader = csv.DictReader(handle)
                    if "path" not in (reader.fieldnames or ()):
                        return digest.hexdigest()  # texts or table rows: the file itself is the data
                    for row in reader:
                        listed = Path(row["path"].strip()).expanduser()
                        listed = listed if listed.is_absolute() else path.parent / listed
                        if listed.is_file():
                            add(listed, str(listed))
        else:
            return None
    except (OSError, KeyError, ValueError, csv.Error, AttributeError):
        return None
    return digest.hexdigest()


def load_dicom_file(path: str | Path, *, window: tuple[float, float] | None = None) -> np.ndarray:
    """Decode one single-frame DICOM image to uint8 (H,W) grey, high = bright, or (H,W,3) RGB.

    Grey images: pydicom's apply_modality_lut (Rescale Slope/Intercept, or a Modality LUT Sequence), then
    the VOI window of DICOM PS3.3 C.11.2.1.2 mapped to 0..255: `window` = (center, width) if given (LINEAR),
    else the file's first WindowCenter/WindowWidth with its VOILUTFunction (LINEAR, LINEAR_EXACT or
    SIGMOID), else (or when the file's window is invalid) min..max of the rescaled values (a constant image
    gives 0). VOI LUT Sequence tables are not applied. MONOCHROME1 is then inverted (255 - v). The window
    maths is our own rather than pydicom's apply_voi_lut, which keeps the stored bit range instead of
    0..255 and has no override or min-max fallback.
    Colour images (RGB; YBR_* which pydicom converts to RGB) are returned as (H,W,3), scaled by
    255 / (2**BitsStored - 1) when BitsStored > 8; windows do not apply to them.

    Raises:
        ConfigError: `window` is not (center, width) with finite values and width >= 1.
        DataError: naming the path, when the file is missing, not DICOM, multi-frame, has no pixel data,
            an unsupported photometric interpretation or VOI LUT function, or cannot be decoded.
    """
    return _read_dicom(Path(path), window)[0]


# --- enumerating the files ----------------------------------------------------------------------------


def _folder_entries(root: Path) -> tuple[list[_Entry], list[str], list[str]]:
    """Entries of an image folder, the class-folder names found (sorted, empty ones too) and notes."""
    subdirs = _visible_subdirs(root)
    loose = _visible_files(root)
    if not subdirs and not loose:
        raise DataError(
            f"image folder {root} is empty; expected {root}/<class name>/<image> (one sub-folder per class) "
            f"or {root}/train/<class name>/... and {root}/test/<class name>/...; fix: copy the site's images there"
        )
    if not subdirs:
        raise DataError(
            f"image folder {root} has no class sub-folders (it holds {len(loose)} file(s) directly, e.g. "
            f"{loose[0].name}); expected {root}/<class name>/<image>, one sub-folder per class; fix: move the "
            "images into one sub-folder per class, or list them with their labels in a .csv manifest"
        )
    by_name = {d.name.lower(): d for d in subdirs}
    if set(by_name) in ({"train", "test"}, {"train", "val", "test"}):
        layout = [(by_name[name], SPLIT_VALUES[name]) for name in ("train", "val", "test") if name in by_name]
    else:
        layout = [(root, None)]
    entries: list[_Entry] = []
    found: set[str] = set()
    ignored: list[Path] = list(loose)
    for split_root, split in layout:
        class_dirs = _visible_subdirs(split_root) if split is not None else subdirs
        if split is not None:
            ignored.extend(_visible_files(split_root))
            if not class_dirs:
                raise DataError(
                    f"split folder {split_root} has no class sub-folders; expected {split_root}/<class name>/"
                    "<image>; fix: move its images into one sub-folder per class"
                )
        for class_dir in class_dirs:
            found.add(class_dir.name)
            for file in _files_below(class_dir, links=True):
                # A folder link (not followed) or a link to nothing becomes an entry that cannot be read, so it
                # is refused or listed as skipped like any missing file, never dropped unseen.
                if _is_image_file(file) or _is_dicom_file(file) or file.is_symlink():
                    entries.append(_Entry(file, class_dir.name, split, str(file.relative_to(root))))
                else:
                    ignored.append(file)
    if not entries:
        raise DataError(
            f"image folder {root} has class folder(s) {sorted(found)} but no image or DICOM files in them "
            f"(accepted: {', '.join(IMAGE_EXTENSIONS)}, {DICOM_EXTENSION} or DICOM files without extension); "
            "fix: copy the site's images into the class folders"
        )
    notes = []
    if ignored:
        notes.append(
            f"{len(ignored)} file(s) ignored (not an image of {', '.join(IMAGE_EXTENSIONS)}, not DICOM, or "
            f"outside the class folders): {listing([str(f.relative_to(root)) for f in ignored])}"
        )
    return entries, sorted(found), notes


def _manifest_entries(path: Path) -> tuple[list[_Entry], list[str], list[str]]:
    """Entries of a CSV manifest, its sorted unique labels and notes."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheet exports often start with a BOM
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(
            f"cannot read CSV manifest {path}: {type(exc).__name__}: {exc}; fix: save it as UTF-8 text"
        ) from exc
    reader = csv.reader(io.StringIO(text))
    header = next((row for row in reader if any(cell.strip() for cell in row)), None)
    if header is None:
        raise DataError(f"CSV manifest {path} is empty; expected {MANIFEST_LAYOUT}; fix: write the header and rows")
    columns = [cell.strip().lower() for cell in header]
    missing = [c for c in MANIFEST_COLUMNS if c not in columns]
    known = (*MANIFEST_COLUMNS, SPLIT_COLUMN, SITE_COLUMN)
    repeated = sorted(c for c, n in Counter(columns).items() if n > 1 and c in known)
    if missing or repeated:
        problem = f"missing column(s) {', '.join(repr(c) for c in missing)}" if missing else ""
        problem += ("; " if missing and repeated else "") + (f"repeated column(s) {repeated}" if repeated else "")
        raise DataError(
            f"CSV manifest {path}: {problem}; found columns {[cell.strip() for cell in header]} in the header row; "
            f"expected {MANIFEST_LAYOUT}; fix: rename the header cells to path,label[,split][,site]"
        )
    i_path, i_label = columns.index("path"), columns.index("label")
    i_split = columns.index(SPLIT_COLUMN) if SPLIT_COLUMN in columns else None
    i_site = columns.index(SITE_COLUMN) if SITE_COLUMN in columns else None
    entries: list[_Entry] = []
    seen: dict[Path, int] = {}
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        line = reader.line_num
        if len(row) != len(header):
            raise DataError(
                f"CSV manifest {path} line {line} has {len(row)} field(s) but the header has {len(header)}: "
                f"{row!r}; fix: quote values that contain commas"
            )
        name, label = row[i_path].strip(), row[i_label].strip()
        if not name or not label:
            empty = "path" if not name else "label"
            raise DataError(f"CSV manifest {path} line {line} has an empty {empty}: {row!r}; fix: fill it in")
        split = None
        if i_split is not None:
            raw = row[i_split].strip()
            if raw.lower() not in SPLIT_VALUES:
                raise DataError(
                    f"CSV manifest {path} line {line}: split {raw!r} is not one of 'train', 'test' or 'val' "
                    "(val rows join train); fix: correct the value, or drop the split column to split by seed"
                )
            split = SPLIT_VALUES[raw.lower()]
        site = None
        if i_site is not None:
            site = row[i_site].strip()
            if not site:
                raise DataError(
                    f"CSV manifest {path} line {line} has an empty site: {row!r}; fix: name the image's site, or "
                    "drop the site column"
                )
        file = Path(name).expanduser()
        relative = not file.is_absolute()
        file = path.parent / file if relative else file
        key = file.resolve()
        if key in seen:
            raise DataError(
                f"CSV manifest {path} lists {name} twice (lines {seen[key]} and {line}); an image listed twice "
                "is counted twice and may leak from train into test; fix: list each image once"
            )
        seen[key] = line
        entries.append(_Entry(file, label, split, f"line {line}", site, relative))
    if not entries:
        raise DataError(
            f"CSV manifest {path} has a header row but no data rows; expected {MANIFEST_LAYOUT}; "
            "fix: add one row per image"
        )
    notes = []
    extra = [cell.strip() for cell, c in zip(header, columns) if c not in known]
    if extra:
        notes.append(f"manifest column(s) {extra} ignored")
    return entries, sorted({e.label for e in entries}), notes


def _visible_subdirs(folder: Path) -> list[Path]:
    """Sub-folders not starting with '.', sorted by name."""
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _visible_files(folder: Path) -> list[Path]:
    """Files (and links to nothing) directly in `folder` not starting with '.', sorted by name."""
    return sorted((p for p in folder.iterdir() if not p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _files_below(folder: Path, *, links: bool = False) -> list[Path]:
    """Files in `folder` and its sub-folders (DICOM exports nest by study/series), hidden ones left out.

    links: also return symbolic links that are not files: links to folders (which rglob does not follow)
    and links to nothing, so the caller can name them.
    """
    files = []
    for file in folder.rglob("*"):
        if any(part.startswith(".") for part in file.relative_to(folder).parts):
            continue
        if file.is_file() or (links and file.is_symlink() and not file.is_file()):
            files.append(file)
    return sorted(files)


def image_files_below(folder: Path) -> list[Path]:
    """Image files in `folder` and its sub-folders, sorted by path, hidden ones left out (as a site's folder reads)."""
    return [file for file in _files_below(folder) if _is_image_file(file)]


def _missing_reason(path: Path) -> str:
    """Why an entry is not a readable file: a link to a folder, a link to nothing, or no file at all."""
    if path.is_symlink():
        target = os.readlink(path)
        if path.is_dir():
            return f"symbolic link to the folder {target}, which is not followed"
        return f"symbolic link to {target}, which does not exist"
    return "file does not exist"


def _is_image_file(path: Path) -> bool:
    """Whether `path` has an image extension load_image_file decodes."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _is_dicom_file(path: Path) -> bool:
    """Whether `path` ends in .dcm or, lacking an image extension, starts with the DICOM 'DICM' marker."""
    if path.suffix.lower() == DICOM_EXTENSION:
        return True
    return not _is_image_file(path) and _has_dicom_marker(path)


def _has_dicom_marker(path: Path) -> bool:
    """Whether the file holds 'DICM' after the 128-byte preamble (DICOM exports often have no extension)."""
    try:
        with path.open("rb") as handle:
            head = handle.read(DICOM_PREAMBLE + 4)
    except OSError:
        return False
    return head[DICOM_PREAMBLE:] == b"DICM"


# --- reading and validating ---------------------------------------------------------------------------


def _load_entries(
    source: Path,
    container: str,
    entries: list[_Entry],
    found: list[str],
    notes: list[str],
    declared: tuple[str, ...] | None,
    bad_files: str,
    seed: int,
    test_fraction: float,
) -> SiteData:
    """Check labels, decode the files (skipping bad ones if asked), check sizes, build and split the datasets."""
    label_names, classes_from = _entry_label_names(source, container, entries, found, declared)
    index = {name: k for k, name in enumerate(label_names)}

    skipped: list[SkippedFile] = []
    missing = [e for e in entries if not e.path.is_file()]
    if missing and bad_files == "error":
        relative = [e for e in missing if e.relative]
        where = f"; relative paths are resolved against the manifest's folder {source.parent}" if relative else ""
        raise DataError(
            f"{source}: {len(missing)} listed file(s) cannot be read: "
            f"{listing([f'{e.path} ({e.origin}: {_missing_reason(e.path)})' for e in missing])}{where}; "
            f"fix: correct the paths or remove those rows/links; {SKIP_HINT}"
        )
    skipped.extend(SkippedFile(str(e.path), _missing_reason(e.path)) for e in missing)
    kept: list[_Entry] = []
    decoded: list[DecodedImage | np.ndarray] = []
    windows: Counter[str] = Counter()
    dicom_bits: Counter[int] = Counter()
    failed: list[tuple[_Entry, str]] = []
    for entry in (e for e in entries if e.path.is_file()):
        try:
            if _is_dicom_file(entry.path):
                array, window, bits = _read_dicom(entry.path, None)
                windows[window] += 1
                dicom_bits[bits] += 1
                decoded.append(array)
            else:
                decoded.append(read_image_file(entry.path))
        except DataError as exc:
            failed.append((entry, str(exc)))
            continue
        kept.append(entry)
    if failed and bad_files == "error":
        # Each reason names its own fix (they differ: convert a 12-bit file, re-export a cut one); add the
        # generic one only where a reason has none, so every file's fix is said once.
        fixed = [r if "; fix: " in r else f"{r}; fix: re-export or remove this file" for _, r in failed]
        raise DataError(f"{source}: {len(failed)} file(s) cannot be read: {listing(fixed, sep=' | ')}; {SKIP_HINT}")
    skipped.extend(SkippedFile(str(e.path), reason) for e, reason in failed)
    if skipped:
        logger.warning(
            '%s: skipped %d missing or unreadable file(s) (bad-files = "skip"): %s',
            source,
            len(skipped),
            listing([s.path for s in skipped]),
        )
    if not decoded:
        raise DataError(
            f"{source}: all {len(skipped)} listed file(s) were skipped as missing or unreadable "
            f"({listing([s.path for s in skipped])}); fix: repair or replace these files"
        )

    # One bit depth for the set's undeclared 16-bit images, so every image is scaled alike (shared.images).
    images = [d for d in decoded if isinstance(d, DecodedImage)]
    bits = choose_bit_depth(images)
    arrays = [scale_to_uint8(d, bits) if isinstance(d, DecodedImage) else d for d in decoded]
    depth = [describe_bit_depths(images, bits)] if images else []
    if dicom_bits:
        depth.append(
            "DICOM "
            + ", ".join(f"Bits Stored {b}: {n}" for b, n in sorted(dicom_bits.items()))
            + " (grey images scaled by their window, else min..max; colour by 255/(2^bits - 1))"
        )

    _check_sizes(source, kept, arrays)
    colour = sum(a.ndim == 3 for a in arrays)
    if 0 < colour < len(arrays):  # one colour image makes the whole set RGB, as shared.data does
        notes.append(f"{len(arrays) - colour} grey image(s) converted to RGB to match {colour} colour image(s)")
        arrays = [a if a.ndim == 3 else np.repeat(a[..., None], 3, axis=-1) for a in arrays]
    if windows:
        parts = {
            "file": "the file's WindowCenter/WindowWidth",
            "min-max": "min..max of the rescaled values (no window in the file)",
            "min-max (invalid file window)": "min..max of the rescaled values (the file's window is invalid)",
            "colour": "none (colour images)",
        }
        notes.append(
            f"{sum(windows.values())} DICOM file(s) decoded; window: "
            + ", ".join(f"{parts[k]} for {n}" for k, n in sorted(windows.items()))
        )

    dataset = ImageDataset(
        images=np.stack(arrays),
        labels=np.array([index[e.label] for e in kept], dtype=np.int64),
        label_names=label_names,
        source=str(source),
        groups=np.array([e.site for e in kept], dtype=str) if kept[0].site is not None else None,
    )
    splits = _split_site(source, dataset, kept, entries, skipped, notes, seed, test_fraction)
    fmt = "dicom" if windows and sum(windows.values()) == len(arrays) else container
    report = _report(
        source, fmt, splits, tuple(skipped), notes, classes_from=classes_from, pixel_depth="; ".join(depth)
    )
    return SiteData(splits, report)


def _entry_label_names(
    source: Path, container: str, entries: list[_Entry], found: list[str], declared: tuple[str, ...] | None
) -> tuple[tuple[str, ...], str]:
    """The classes of listed entries and where they came from: `declared` (all labels known) or derived."""
    carriers = {label: _carriers(entries, label) for label in found}
    if declared is not None:
        check_known_labels(carriers, declared, source=str(source))
        return declared, "declared (label-names)"
    if container == "folder":
        # Without declared classes, a folder name alone would make a class no image shows.
        labelled = {e.label for e in entries}
        empty = [name for name in found if name not in labelled]
        if empty:
            raise DataError(
                f"image folder {source}: class folder(s) {empty} hold no image files; fix: add images, remove "
                "the folder(s), or declare the classes (label-names) to train them with no examples here"
            )
    names = derive_label_names(carriers, source=str(source))
    what = "class-folder names" if container == "folder" else "manifest labels"
    return names, f"derived from the {what} (no label-names declared: the federation's must match)"


def _carriers(entries: list[_Entry], label: str) -> list[str]:
    """Where `label` occurs: manifest lines or files (all of them; messages list the first few)."""
    return [e.origin for e in entries if e.label == label] or ["an empty class folder"]


def _check_sizes(source: Path, entries: list[_Entry], arrays: list[np.ndarray]) -> None:
    """DataError listing up to MAX_LISTED images whose (H, W) differs from the most common size."""
    sizes = [(a.shape[1], a.shape[0]) for a in arrays]  # (width, height) as PIL reports them
    majority = Counter(sizes).most_common(1)[0][0]
    odd = [(e, s) for e, s in zip(entries, sizes) if s != majority]
    if odd:
        raise DataError(
            f"{source}: images must all have the same size; most are {majority[0]}x{majority[1]} (width x height) "
            f"but {len(odd)} differ: {listing([f'{e.path} ({w}x{h})' for e, (w, h) in odd])}; "
            f"fix: resize them to {majority[0]}x{majority[1]} (e.g. PIL Image.resize) or remove them"
        )


def _split_site(
    source: Path,
    dataset: ImageDataset,
    kept: list[_Entry],
    entries: list[_Entry],
    skipped: list[SkippedFile],
    notes: list[str],
    seed: int,
    test_fraction: float,
) -> DataSplits:
    """The source's own train/test split when it has one, else a seeded stratified split; both non-empty."""
    if entries[0].split is None:
        if len(dataset) < 2:
            raise DataError(
                f"{source}: {len(dataset)} readable image(s) (skipped {len(skipped)}) cannot be split into train "
                "and test; fix: add images or repair the skipped ones"
            )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            splits = split_dataset(dataset, seed=seed, test_fraction=test_fraction)
        for warning in caught:  # too few images per class to stratify: keep it in the report and warn the caller
            notes.append(str(warning.message))
            warnings.warn(warning.message, stacklevel=4)
        return splits
    parts = {}
    for split in SPLITS:
        mask = np.array([e.split == split for e in kept], dtype=bool)
        if not mask.any():
            listed = sum(e.split == split for e in entries)
            if listed:
                raise DataError(
                    f"{source}: all {listed} {split} image(s) were skipped as missing or unreadable, leaving the "
                    f"{split} split empty; fix: repair those files (see the report's skipped list)"
                )
            raise DataError(
                f"{source}: no images in the {split} split; a site needs both train and test images; fix: mark "
                f"some rows/folders as {split}, or drop the split column / train-test folders to split by seed"
            )
        part = dataset.subset(np.flatnonzero(mask))
        parts[split] = ImageDataset(part.images, part.labels, part.label_names, f"{source} ({split})", part.groups)
    return DataSplits(train=parts["train"], test=parts["test"])


def _report(
    source: Path,
    fmt: str,
    splits: DataSplits,
    skipped: tuple[SkippedFile, ...],
    notes: list[str],
    *,
    classes_from: str,
    pixel_depth: str,
) -> LoadReport:
    """The LoadReport of `splits`, with a note for declared classes that have no images in some split."""
    datasets = {"train": splits.train, "test": splits.test}
    names = splits.train.label_names
    class_counts = {
        split: dict(zip(names, ds.class_counts() if ds is not None else [0] * len(names)))
        for split, ds in datasets.items()
    }
    notes = list(notes)
    absent = [n for n in names if all(counts[n] == 0 for counts in class_counts.values())]
    if absent:
        notes.append(f"declared class(es) with no images at this site: {absent}")
    for split, counts in class_counts.items():
        missing = [n for n in names if counts[n] == 0 and n not in absent]
        if missing:
            notes.append(f"class(es) with no {split} images at this site: {missing}")
    return LoadReport(
        source=str(source),
        format=fmt,
        label_names=names,
        image_shape=tuple(int(d) for d in splits.train.images.shape[1:]),
        split_counts={split: len(ds) if ds is not None else 0 for split, ds in datasets.items()},
        class_counts=class_counts,
        skipped=skipped,
        notes=tuple(notes),
        classes_from=classes_from,
        pixel_depth=pixel_depth,
    )


# --- .npz ---------------------------------------------------------------------------------------------


def _load_array_site(
    source: str | Path,
    fmt: str,
    declared: tuple[str, ...] | None,
    *,
    seed: int,
    test_fraction: float,
    require_test: bool,
) -> SiteData:
    """A MedMNIST-style .npz or 'digits' as a site, its classes mapped onto the federation's declared ones."""
    if fmt == DIGITS:
        path, data = DIGITS, NpzSplits(load_digits_splits(seed=seed, test_fraction=test_fraction), FILE)
    else:
        path = Path(source)
        data = read_npz(path)
    if data.splits.test is None and require_test:
        raise DataError(f"{path}: 'test_images' is empty; a site needs test images; fix: add a test split")
    if declared is None:
        splits, notes = data.splits, list(data.notes)
        if len(splits.train.label_names) < MIN_CLASSES:
            raise DataError(
                f"{path}: every label is 0 and the file names no classes, so the data has one class; a classifier "
                f"needs at least {MIN_CLASSES} (one class trains to accuracy 1.0 and learns nothing, while charging "
                "epsilon); fix: use data with the other classes, or declare the federation's classes (label-names)"
            )
        classes_from = {
            FILE: "the .npz's label_names" if fmt == "npz" else "digits 0..9",
            MEDMNIST: "MedMNIST's documentation (not in the file)",
            INDICES: "the label indices (the .npz has no names)",
        }[data.names_from]
    else:
        splits, notes = map_onto_label_names(data, declared, source=str(path))
        classes_from = "declared (label-names)"
    images = "uint8 arrays in the .npz" if fmt == "npz" else "sklearn digits 0..16 scaled to 0..255"
    report = _report(Path(path), fmt, splits, (), notes, classes_from=classes_from, pixel_depth=f"8-bit ({images})")
    return SiteData(splits, report)


# --- texts and table rows ------------------------------------------------------------------------------


def _load_named_site(
    named: NamedSource, declared: tuple[str, ...] | None, schema: TableSchema | None, *, seed: int, test_fraction: float
) -> SiteData:
    """A named data set (shared.named_data): its installed, hash-checked files read as texts or table rows."""
    files = named_source_files(named)
    parts, notes = [], []
    if named.kind == ROWS:
        own = load_schema(schema_path(named))
        if schema is not None and schema.key() != own.key():
            raise DataError(
                f"data {named.name!r} is read under its own schema {own.name!r}, but the federation declares another "
                f"schema {schema.name!r}; fix: leave `schema` empty for {named.name!r} or point `data` at a file"
            )
        for path, split in files:
            rows = read_table_rows(path, own)
            parts.append(
                (rows.rows, rows.labels, rows.splits or ([split] * len(rows.labels) if split else None), rows.origins)
            )
            notes.extend(rows.notes)
        schema = own
    else:
        for path, split in files:
            texts = read_text_records(path, text_column=named.text_column, label_column=named.label_column)
            parts.append((texts.texts, texts.labels, [split] * len(texts.labels) if split else None, texts.origins))
            notes.extend(texts.notes)
    notes.append(f"named data set {named.name!r}: {named.licence}")
    return _load_records_site(
        Path(named.name), named.kind, parts, tuple(notes), declared, seed, test_fraction, True, schema, fmt=named.name
    )


def _load_records_site(
    source: Path,
    kind: str,
    parts: list[tuple[object, list[str], list[str] | None, list[str]]],
    notes: tuple[str, ...],
    declared: tuple[str, ...] | None,
    seed: int,
    test_fraction: float,
    require_test: bool,
    schema: TableSchema | None,
    *,
    fmt: str = "",
) -> SiteData:
    """Texts or rows (with their label texts, split values and origins) as checked train/test splits and a report."""
    if kind == TEXTS:
        inputs = np.empty(sum(len(p[1]) for p in parts), dtype=object)
        inputs[:] = [text for part in parts for text in part[0]]  # (N,) str; filled so numpy keeps them as objects
    else:
        inputs = np.concatenate([np.asarray(p[0], dtype=np.float64) for p in parts])  # (N, C)
    labels = [label for p in parts for label in p[1]]
    origins = [o if len(parts) == 1 else f"{o} of file {i + 1}" for i, p in enumerate(parts) for o in p[3]]
    has_split = [p[2] is not None for p in parts]
    if any(has_split) and not all(has_split):
        raise DataError(f"{source}: some files have a split column and some do not; fix: give every file one")
    splits = [v for p in parts for v in p[2]] if all(has_split) else None
    carriers: dict[str, list[str]] = {}
    for label, origin in zip(labels, origins):
        carriers.setdefault(label, []).append(origin)
    if declared is not None:
        check_known_labels(carriers, declared, source=str(source))
        names, classes_from = declared, "declared (label-names)"
    else:
        names = derive_label_names(carriers, source=str(source))
        classes_from = "derived from the labels (no label-names declared: the federation's must match)"
    index = {name: i for i, name in enumerate(names)}
    coded = np.array([index[label] for label in labels], dtype=np.int64)
    dataset = ImageDataset(inputs, coded, names, str(source))
    notes = list(notes)
    if splits is None:
        if len(dataset) < 2:
            raise DataError(f"{source}: {len(dataset)} example(s) cannot be split into train and test; fix: add more")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            data = split_dataset(dataset, seed=seed, test_fraction=test_fraction)
        for warning in caught:
            notes.append(str(warning.message))
            warnings.warn(warning.message, stacklevel=3)
    else:
        mask = np.array([v == "test" for v in splits], dtype=bool)
        if not (~mask).any():
            raise DataError(
                f"{source}: no rows in the train split; fix: mark some rows train (or drop the split column)"
            )
        if not mask.any() and require_test:
            raise DataError(
                f"{source}: no rows in the test split; a site needs both; fix: mark some rows test, or drop the "
                "split column to split by seed"
            )
        train, test = dataset.subset(np.flatnonzero(~mask)), dataset.subset(np.flatnonzero(mask))
        data = DataSplits(
            train=ImageDataset(train.images, train.labels, names, f"{source} (train)"),
            test=ImageDataset(test.images, test.labels, names, f"{source} (test)") if mask.any() else None,
        )
    if kind == TEXTS:
        lengths = [len(t) for t in inputs]
        details = f"{int(np.median(lengths))} characters median, {max(lengths)} longest"
        container = "text"
    else:
        details = f"{inputs.shape[1]} columns of schema {schema.name!r} ({schema.width} encoded features)"
        container = "table"
    report = _report(source, fmt or container, data, (), notes, classes_from=classes_from, pixel_depth="")
    return SiteData(data, dataclasses.replace(report, inputs=kind, details=details))


# --- DICOM --------------------------------------------------------------------------------------------


def _read_dicom(path: Path, window: tuple[float, float] | None) -> tuple[np.ndarray, str, int]:
    """load_dicom_file's image, its window's origin ('file', 'override', 'min-max', 'colour') and Bits Stored."""
    override = _check_window(window) if window is not None else None
    if not path.is_file():
        raise DataError(f"DICOM file {path} does not exist or is not a file; fix: check the path")
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # InvalidDicomError, EOFError, struct/ValueErrors of a truncated file, OSError
        raise DataError(
            f"cannot read DICOM file {path}: {type(exc).__name__}: {exc}; fix: re-export it as DICOM Part 10 "
            "or remove it"
        ) from exc
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DataError(
            f"DICOM file {path} has no pixel data (SOP class {ds.get('SOPClassUID', 'unknown')}, e.g. a report "
            "or structured document); fix: remove it or export the image instead"
        )
    frames = ds.get("NumberOfFrames", 1) or 1
    if int(frames) > 1:
        raise DataError(
            f"DICOM file {path} is multi-frame ({int(frames)} frames); one image per file is supported; "
            "fix: export single frames (e.g. one file per slice) or remove it"
        )
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric not in GREY_PHOTOMETRICS and photometric != "RGB" and not photometric.startswith("YBR"):
        raise DataError(
            f"DICOM file {path} has photometric interpretation {photometric!r}; supported: MONOCHROME1, "
            "MONOCHROME2, RGB, YBR_*; fix: convert it to RGB or greyscale"
        )
    try:
        pixels = ds.pixel_array  # YBR_* comes back as RGB (pydicom 3 as_rgb default)
    except Exception as exc:  # compressed syntax without a decoder plugin, truncated pixel data...
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        fix = (
            "re-export it uncompressed (e.g. gdcmconv --raw) or install a pydicom decoder plugin"
            if syntax is not None and syntax.is_compressed
            else "re-export or remove it (it may be truncated)"
        )
        raise DataError(
            f"cannot decode the pixels of DICOM file {path} (transfer syntax {syntax or 'unknown'}): "
            f"{type(exc).__name__}: {exc}; fix: {fix}"
        ) from exc
    if photometric not in GREY_PHOTOMETRICS:
        if pixels.ndim != 3 or pixels.shape[-1] != 3:
            raise DataError(f"DICOM file {path} is {photometric} but its pixels have shape {pixels.shape}")
        bits = int(ds.get("BitsStored", 8))
        return _colour_to_uint8(pixels, bits), "colour", bits
    if pixels.ndim != 2:
        raise DataError(
            f"DICOM file {path} is {photometric} but its pixels have shape {pixels.shape}, expected (rows, columns); "
            "fix: export single-frame greyscale images"
        )
    values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)  # (H, W) modality values, e.g. HU
    if override is not None:
        scaled, origin = _apply_window(values, *override, "LINEAR"), "override"
    else:
        scaled, origin = _file_window(values, ds, path)
    image = np.round(scaled * 255.0).astype(np.uint8)
    if photometric == "MONOCHROME1":  # MONOCHROME1: minimum value is white; flip so high = bright
        image = 255 - image
    return image, origin, int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))


def _check_window(window: tuple[float, float]) -> tuple[float, float]:
    """`window` as (center, width) floats, or ConfigError."""
    ok = isinstance(window, (tuple, list)) and len(window) == 2
    ok = ok and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in window)
    if not ok or window[1] < 1:
        raise ConfigError(
            f"`window` must be (center, width) with finite numbers and width >= 1 (DICOM PS3.3 C.11.2.1.2), "
            f"got {window!r}; fix: e.g. (40, 400) for a CT soft-tissue window"
        )
    return float(window[0]), float(window[1])


def _file_window(values: np.ndarray, ds: Dataset, path: Path) -> tuple[np.ndarray, str]:
    """`values` scaled to 0..1 by the file's first window, or by min..max when it has none or an invalid one."""
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function not in VOI_FUNCTIONS:
        raise DataError(
            f"DICOM file {path} has VOILUTFunction {function!r}; supported: {', '.join(VOI_FUNCTIONS)}; "
            "fix: pass an explicit window or re-export the image"
        )
    center, width = _first_value(ds.get("WindowCenter")), _first_value(ds.get("WindowWidth"))
    if center is None or width is None:
        return _min_max(values), "min-max"
    valid_width = width >= 1 if function == "LINEAR" else width > 0  # PS3.3 C.11.2.1.2.1 / C.11.2.1.3
    if not (math.isfinite(center) and math.isfinite(width) and valid_width):
        return _min_max(values), "min-max (invalid file window)"
    return _apply_window(values, center, width, function), "file"


def _first_value(element: object) -> float | None:
    """The first number of a (possibly multi-valued, possibly empty) DICOM element, or None."""
    if element is None or element == "":
        return None
    if isinstance(element, (list, tuple, MultiValue)):
        if not element:
            return None
        element = element[0]
    try:
        return float(element)
    except (TypeError, ValueError):
        return None


def _apply_window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """VOI windowing of DICOM PS3.3 C.11.2.1.2 / C.11.2.1.3.1 onto 0..1 (before scaling to 0..255)."""
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if width == 1:  # the LINEAR window of width 1 is a threshold at center - 0.5
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _min_max(values: np.ndarray) -> np.ndarray:
    """`values` scaled linearly so min -> 0 and max -> 1 (all zeros for a constant image)."""
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros_like(values)
    return (values - low) / (high - low)


def _colour_to_uint8(pixels: np.ndarray, bits_stored: int) -> np.ndarray:
    """(H,W,3) colour pixels as uint8, scaled from `bits_stored` bits when they have more than 8."""
    if bits_stored <= 8:
        return pixels.astype(np.uint8)
    return np.round(pixels.astype(np.float64) * (255.0 / (2**bits_stored - 1))).astype(np.uint8)
