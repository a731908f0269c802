"""What every row-per-example site file shares (image manifests, texts, tables): the split column and its checks."""

from __future__ import annotations

import csv
import gzip
import io
import zlib
from collections.abc import Mapping
from pathlib import Path

from fedtl.shared.errors import DataError

SPLIT_COLUMN = "split"
# A site's validation rows join its training pool, as MedMNIST's val split does.
SPLIT_VALUES = {"train": "train", "val": "train", "test": "test"}
MAX_LISTED = 5  # places listed in one message


def listing(items: list[str], *, limit: int = MAX_LISTED, sep: str = ", ") -> str:
    """Return the first `limit` items joined, with 'and N more' when there are more."""
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return sep.join(items[:limit]) + more


def row_split(record: Mapping, where: str) -> str:
    """Return the row's split ("train" or "test"); DataError naming `where` when its split value is not one we know."""
    raw = str(record.get(SPLIT_COLUMN) or "").strip().lower()
    if raw not in SPLIT_VALUES:
        raise DataError(
            f"{where}: column {SPLIT_COLUMN!r} must be one of {sorted(SPLIT_VALUES)} (val rows join train), got "
            f"{record.get(SPLIT_COLUMN)!r}; fix: correct the value, or drop the column to split by seed"
        )
    return SPLIT_VALUES[raw]


def row_label(record: Mapping, column: str, where: str, *, require: bool) -> str:
    """Return the row's label, stripped ("" where none is required); DataError naming `where` when one is missing."""
    label = record.get(column)
    if require and (label is None or not str(label).strip()):
        raise DataError(f"{where}: the label column {column!r} is empty; fix: label the row")
    return str(label or "").strip()


def read_utf8(path: Path, what: str) -> str:
    """Return the file's text (a `.gz` file decompressed); DataError naming the line and offset of non-UTF-8 bytes.

    A BOM is dropped.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{what} {path} cannot be read ({exc})") from exc
    if path.suffix.lower() == ".gz":  # named data sets ship gzip-compressed CSV (river's phishing.csv.gz)
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{what} {path} is not a readable gzip file ({exc}); fix: gunzip it or re-save it") from exc
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{what} {path}: byte(s) {raw[exc.start : exc.end]!r} at offset {exc.start} (line {line}) are not "
            "UTF-8; fix: save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8), or remove the line"
        ) from None


def csv_rows(
    path: Path, text: str, what: str, *, layout: str, quoting: str
) -> tuple[list[str], list[tuple[int, list]]]:
    """Return the stripped header and every non-blank row with its line number.

    Raises:
        DataError: text that is not CSV, no header (`layout` says what is expected), or a row whose field count
            differs from the header's (`quoting` says how to fix it).
    """
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        rows = list(reader)
    except csv.Error as exc:
        raise DataError(f"{what} {path} is not valid CSV at line {reader.line_num}: {exc}") from exc
    if not rows:
        raise DataError(f"{what} {path} is empty; expected {layout}")
    header = [h.strip() for h in rows[0]]
    kept = []
    for number, row in enumerate(rows[1:], start=2):
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # a blank line (a row of empty fields is a row, and its checks say what it lacks)
        if len(row) != len(header):
            raise DataError(
                f"{what} {path} line {number}: {len(row)} field(s) but the header has {len(header)}; fix: {quoting}"
            )
        kept.append((number, row))
    return header, kept
