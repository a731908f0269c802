"""Labelled texts from CSV or JSON-lines files: read strictly as UTF-8, checked, over-long texts cut and counted."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from fedtl.shared.errors import DataError
from fedtl.shared.rows import SPLIT_COLUMN, csv_rows, listing, read_utf8, row_label, row_split

__all__ = ["TEXT_EXTENSIONS", "MAX_TEXT_CHARS", "TextRecords", "is_text_csv", "read_text_records"]

TEXT_EXTENSIONS = (".csv", ".jsonl")
TEXT_COLUMN, LABEL_COLUMN = "text", "label"
# Texts longer than this are cut (and counted in the report): an encoder reads a few hundred tokens at most
# (all-MiniLM-L6-v2: 128 word pieces, ~600 characters of English), so the rest only costs memory and time.
MAX_TEXT_CHARS = 5000
TEXT_LAYOUT = (
    "a CSV with a header row text,label (optional split: train, test or val) and one row per text, or a .jsonl "
    'file with one object {"text": ..., "label": ...[, "split": ...]} per line; UTF-8'
)


@dataclass(frozen=True)
class TextRecords:
    """Texts read from one file: the texts, their label texts, split values and where each came from."""

    texts: list[str]
    labels: list[str]
    splits: list[str] | None
    origins: list[str]  # "line 4", for messages
    notes: tuple[str, ...]


def is_text_csv(path: Path) -> bool:
    """Return True when a CSV's header names a `text` column (and no image `path` column)."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            header = next(csv.reader(handle), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    names = [h.strip().lower() for h in header]
    return TEXT_COLUMN in names and "path" not in names


def read_text_records(
    path: Path,
    *,
    text_column: str = TEXT_COLUMN,
    label_column: str = LABEL_COLUMN,
    max_chars: int = MAX_TEXT_CHARS,
    require_label: bool = True,
) -> TextRecords:
    """Read labelled texts from a .csv or .jsonl file (`require_label=False`: texts to predict, labels "").

    Raises:
        DataError: bytes that are not UTF-8 (line and offset named), a missing column, bad JSON, an empty
            or whitespace-only text, an empty label, a bad split value, or no texts at all.
    """
    text = read_utf8(path, "text file")
    if path.suffix.lower() == ".jsonl":
        records = _jsonl_records(path, text)
    else:
        records = _csv_records(path, text, text_column, label_column if require_label else "")
    if not records:
        raise DataError(f"text file {path} holds no texts; expected {TEXT_LAYOUT}")
    texts, labels, splits, origins = [], [], [], []
    empty, cut = [], 0
    has_split = any(SPLIT_COLUMN in r for _, r in records)
    for where, record in records:
        value = record.get(text_column)
        if not isinstance(value, str):
            raise DataError(f"text file {path} {where}: `{text_column}` must be a string, got {value!r}")
        if not value.strip():
            empty.append(where)
            continue
        if len(value) > max_chars:
            value, cut = value[:max_chars], cut + 1
        label = row_label(record, label_column, f"text file {path} {where}", require=require_label)
        if has_split:
            splits.append(row_split(record, f"text file {path} {where}"))
        texts.append(value)
        labels.append(label)
        origins.append(where)
    if empty:
        raise DataError(
            f"text file {path}: {len(empty)} empty or whitespace-only text(s) at {listing(empty)}; "
            "an empty text carries nothing to learn from; fix: remove those rows or fill them in"
        )
    notes = ()
    if cut:
        notes = (f"{cut} text(s) longer than {max_chars} characters were cut to their first {max_chars}",)
    return TextRecords(texts, labels, splits if has_split else None, origins, notes)


def _csv_records(path: Path, text: str, text_column: str, label_column: str) -> list[tuple[str, dict]]:
    """(origin, row) of every non-blank CSV row; the header must name the text and label columns."""
    header, rows = csv_rows(
        path,
        text,
        "text file",
        layout=TEXT_LAYOUT,
        quoting='quote texts that hold commas or newlines ("...")',
    )
    # Header names are matched case-insensitively ("Text", "LABEL"); rows keep their own column names.
    lower = {h.lower(): h for h in header}
    missing = [c for c in (text_column, label_column) if c and c.lower() not in lower]
    if missing:
        raise DataError(
            f"text file {path} has no column(s) {missing} (header: {header}); expected {TEXT_LAYOUT}; fix: rename "
            "the columns"
        )
    rename = {lower[c.lower()]: c for c in (text_column, label_column, SPLIT_COLUMN) if c and c.lower() in lower}
    return [(f"line {number}", {rename.get(h, h): v for h, v in zip(header, row)}) for number, row in rows]


def _jsonl_records(path: Path, text: str) -> list[tuple[str, dict]]:
    """(origin, object) of every non-blank JSON line."""
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"text file {path} line {number} is not JSON ({exc.msg}); expected {TEXT_LAYOUT}") from None
        if not isinstance(record, dict):
            raise DataError(f"text file {path} line {number} must be a JSON object, got {type(record).__name__}")
        out.append((f"line {number}", record))
    return out
