"""What every row-per-example site file shares (image manifests, texts, tables): the split column and its checks."""

from __future__ import annotations

from collections.abc import Mapping

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
