"""Table rows under a schema the federation declares: the schema, reading rows from CSV/Parquet, and their encoding.

The schema is public (the federation publishes it, every site's policy may pin it): column names, their
types, the categories of each categorical column and the value bounds of each numeric one. Rows are
read into a coding that reads nothing from the data (numbers as read, categories as their index in the
schema's list), and the encoding a head trains on (`encode_rows`) uses the declared bounds only: a
numeric value becomes its position between the schema's min and max, clipped, mapped to [-1, 1]; a
category becomes a one-hot vector. No mean, deviation, quantile or category list of a site's data is
ever read, so normalisation releases nothing and costs no epsilon (the DP literature's "public
bounds" assumption; computing them from the data would need its own noised, charged release).
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedtl.shared.errors import ConfigError, DataError
from fedtl.shared.rows import SPLIT_COLUMN, csv_rows, listing, read_utf8, row_label, row_split

__all__ = [
    "CATEGORY",
    "NUMBER",
    "ColumnSpec",
    "TableRows",
    "TableSchema",
    "encode_rows",
    "load_schema",
    "read_table_rows",
]

NUMBER, CATEGORY = "number", "category"
COLUMN_TYPES = (NUMBER, CATEGORY)
SCALES = ("linear", "log")  # log: log1p(x) between log1p(min) and log1p(max), for amounts spanning decades
TABLE_EXTENSIONS = (".csv", ".parquet", ".pq")
SCHEMA_LAYOUT = (
    'a JSON object {"name": ..., "label": <label column>, "columns": [{"name": ..., "type": "number", "min": ..., '
    '"max": ..., "scale": "linear"|"log"} or {"name": ..., "type": "category", "categories": [...]}, ...]}'
)


@dataclass(frozen=True)
class ColumnSpec:
    """One declared column: a number with public bounds, or a category from a public list."""

    name: str
    type: str
    min: float = 0.0
    max: float = 0.0
    scale: str = "linear"
    categories: tuple[str, ...] = ()

    @property
    def width(self) -> int:
        """Return how many encoded features this column becomes (1 for a number, one per category)."""
        return 1 if self.type == NUMBER else len(self.categories)

    def to_dict(self) -> dict:
        """Return the column as canonical JSON-able fields (only those of its type)."""
        if self.type == NUMBER:
            return {"name": self.name, "type": NUMBER, "min": self.min, "max": self.max, "scale": self.scale}
        return {"name": self.name, "type": CATEGORY, "categories": list(self.categories)}


@dataclass(frozen=True)
class TableSchema:
    """The federation's declared table: its columns in order and the label column, validated at construction."""

    name: str
    label: str
    columns: tuple[ColumnSpec, ...]

    def __post_init__(self) -> None:
        where = f"table schema {self.name!r}"
        if not self.columns:
            raise ConfigError(f"{where} declares no columns; fix: list at least one column ({SCHEMA_LAYOUT})")
        names = [c.name for c in self.columns]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"{where} declares the column(s) {duplicates} twice; fix: give each column one entry")
        if not self.label or self.label in names or self.label == SPLIT_COLUMN:
            raise ConfigError(
                f"{where}: `label` must name the label column, which is not a feature column nor {SPLIT_COLUMN!r}; "
                f"got {self.label!r}"
            )
        if SPLIT_COLUMN in names:
            raise ConfigError(f"{where}: {SPLIT_COLUMN!r} is reserved for the train/test split; rename that column")
        for c in self.columns:
            if c.type not in COLUMN_TYPES:
                raise ConfigError(f"{where}: column {c.name!r} has type {c.type!r}; allowed: {list(COLUMN_TYPES)}")
            if c.type == NUMBER:
                if not (math.isfinite(c.min) and math.isfinite(c.max) and c.min < c.max):
                    raise ConfigError(
                        f"{where}: column {c.name!r} needs finite bounds with min < max, got min={c.min}, "
                        f"max={c.max}; fix: declare the public range of the value (not one read from a site's data)"
                    )
                if c.scale not in SCALES:
                    raise ConfigError(f"{where}: column {c.name!r} has scale {c.scale!r}; allowed: {list(SCALES)}")
                if c.scale == "log" and c.min < 0:
                    raise ConfigError(f"{where}: column {c.name!r} has scale 'log' but min {c.min} < 0")
            else:
                cats = list(c.categories)
                if len(cats) < 1 or len(set(cats)) != len(cats) or not all(isinstance(v, str) and v for v in cats):
                    raise ConfigError(
                        f"{where}: column {c.name!r} must list its categories as distinct non-empty strings, got "
                        f"{cats!r}"
                    )

    @classmethod
    def from_dict(cls, d: Mapping, *, source: str = "schema") -> TableSchema:
        """Build from the JSON layout; unknown or missing keys are errors naming the key."""
        if not isinstance(d, Mapping) or set(d) - {"name", "label", "columns"} or "columns" not in d:
            raise ConfigError(
                f"{source} must be {SCHEMA_LAYOUT}; got keys {sorted(d) if isinstance(d, Mapping) else d}"
            )
        columns = []
        for i, col in enumerate(d["columns"]):
            if not isinstance(col, Mapping) or "name" not in col or "type" not in col:
                raise ConfigError(
                    f"{source}: column {i} must be an object with at least `name` and `type`, got {col!r}"
                )
            allowed = (
                {"name", "type", "min", "max", "scale"} if col["type"] == NUMBER else {"name", "type", "categories"}
            )
            unknown = set(col) - allowed
            if unknown:
                raise ConfigError(
                    f"{source}: column {col['name']!r} ({col['type']}) has unknown key(s) {sorted(unknown)}; "
                    f"allowed: {sorted(allowed)}"
                )
            if col["type"] == NUMBER:
                missing = {"min", "max"} - set(col)
                if missing:
                    raise ConfigError(
                        f"{source}: numeric column {col['name']!r} lacks {sorted(missing)}: normalisation uses the "
                        "declared public bounds, never a site's own statistics; fix: declare them"
                    )
                bounds = [col["min"], col["max"]]
                if not all(isinstance(b, numbers.Real) and not isinstance(b, bool) for b in bounds):
                    raise ConfigError(f"{source}: column {col['name']!r} bounds must be numbers, got {bounds}")
                columns.append(
                    ColumnSpec(
                        str(col["name"]), NUMBER, float(col["min"]), float(col["max"]), col.get("scale", "linear")
                    )
                )
            else:
                columns.append(
                    ColumnSpec(str(col["name"]), str(col["type"]), categories=tuple(col.get("categories", ())))
                )
        return cls(name=str(d.get("name", "table")), label=str(d.get("label", "")), columns=tuple(columns))

    def to_dict(self) -> dict:
        """Return the JSON layout that from_dict reads back into an equal schema."""
        return {"name": self.name, "label": self.label, "columns": [c.to_dict() for c in self.columns]}

    def key(self) -> str:
        """Return canonical JSON (sorted keys, no spaces): what is hashed, sent and compared."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def sha256(self) -> str:
        """Return the SHA-256 hex of the canonical JSON."""
        return hashlib.sha256(self.key().encode()).hexdigest()

    @property
    def column_names(self) -> tuple[str, ...]:
        """Return the feature columns' names in order."""
        return tuple(c.name for c in self.columns)

    @property
    def width(self) -> int:
        """Return the width D of the encoded rows (the head's input)."""
        return sum(c.width for c in self.columns)


def load_schema(source: str | Path | Mapping) -> TableSchema:
    """Return the schema in a JSON file (or an already parsed mapping, or canonical JSON text).

    Raises:
        ConfigError: the file is missing or not JSON, or the schema is invalid (the message names the key).
    """
    if isinstance(source, Mapping):
        return TableSchema.from_dict(source)
    text = str(source)
    if text.lstrip().startswith("{"):
        try:
            return TableSchema.from_dict(json.loads(text), source="the schema sent")
        except json.JSONDecodeError as exc:
            raise ConfigError(f"the schema sent is not JSON ({exc})") from exc
    path = Path(text).expanduser()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"table schema {path} does not exist; fix: give the path of the federation's schema"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"table schema {path} cannot be read as JSON ({exc}); expected {SCHEMA_LAYOUT}") from exc
    return TableSchema.from_dict(raw, source=f"table schema {path}")


def encode_rows(schema: TableSchema, rows: np.ndarray) -> np.ndarray:
    """Return the float32 (N, D) encoding of coded rows (N, C): declared bounds and categories only.

    Numbers: t(x) = x (scale 'linear') or log1p(x) (scale 'log'), then 2 (t(clip(x)) - t(min)) / (t(max) - t(min)) - 1,
    in [-1, 1]; categories: one-hot over the schema's list. Each output row is a function of its own input
    row and the schema alone, so no statistic of the other rows, or of any site, enters it.
    """
    rows = np.asarray(rows, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[1] != len(schema.columns):
        raise DataError(
            f"rows must have shape (N, {len(schema.columns)}) for schema {schema.name!r}, got {rows.shape}; "
            "fix: read them with read_table_rows under the same schema"
        )
    out = np.zeros((rows.shape[0], schema.width), dtype=np.float32)
    at = 0
    for j, col in enumerate(schema.columns):
        x = rows[:, j]
        if col.type == NUMBER:
            lo, hi = col.min, col.max
            x = np.clip(x, lo, hi)
            if col.scale == "log":
                x, lo, hi = np.log1p(x), math.log1p(lo), math.log1p(hi)
            out[:, at] = 2.0 * (x - lo) / (hi - lo) - 1.0
        else:
            index = x.astype(np.int64)
            if index.size and (index.min() < 0 or index.max() >= len(col.categories)):
                raise DataError(f"column {col.name!r}: category index out of range; rows were not coded by its schema")
            out[np.arange(len(index)), at + index] = 1.0
        at += col.width
    return out


@dataclass(frozen=True)
class TableRows:
    """Rows read under a schema: coded values (N, C), label texts, split values and where each came from."""

    rows: np.ndarray  # (N, C) float64: numbers as read, categories as indices into the schema's lists
    labels: list[str]
    splits: list[str] | None  # "train"/"test" per row when the file has a split column
    origins: list[str]  # "line 4" / "row 3", for messages
    notes: tuple[str, ...]


def read_table_rows(path: Path, schema: TableSchema, *, require_label: bool = True) -> TableRows:
    """Read a CSV (or .csv.gz) or Parquet file whose columns are exactly the schema's (plus label and optional split).

    `require_label=False` (rows to predict): the label column may be absent; labels are then "".

    Raises:
        DataError: a column missing or not in the schema (named), an empty file, a value that is missing,
            not a number, or not one of its column's declared categories (line, column and value named).
    """
    suffix = path.suffix.lower()
    if suffix == ".csv" or path.name.lower().endswith(".csv.gz"):
        header, records, origin = _csv_records(path)
    elif suffix in (".parquet", ".pq"):
        header, records, origin = _parquet_records(path)
    else:
        raise DataError(f"table {path}: unsupported file type {suffix!r}; fix: use one of {list(TABLE_EXTENSIONS)}")
    _check_columns(path, header, schema, require_label=require_label)
    if not records:
        raise DataError(f"table {path} has a header but no rows; fix: add rows or point the site at another file")
    index = {c.name: {v: i for i, v in enumerate(c.categories)} for c in schema.columns if c.type == CATEGORY}
    coded = np.zeros((len(records), len(schema.columns)), dtype=np.float64)
    labels, splits, origins = [], [], []
    outside = {c.name: [0, 0] for c in schema.columns if c.type == NUMBER}
    for r, record in enumerate(records):
        where = origin(r)
        for j, col in enumerate(schema.columns):
            value = record.get(col.name)
            if value is None or (isinstance(value, str) and not value.strip()):
                raise DataError(
                    f"table {path} {where}: column {col.name!r} is empty; the schema declares no missing values; "
                    "fix: fill it in or remove the row"
                )
            if col.type == NUMBER:
                number = _number(value)
                if number is None:
                    raise DataError(
                        f"table {path} {where}: column {col.name!r} must be a number, got {value!r}; fix the value"
                    )
                if number < col.min:
                    outside[col.name][0] += 1
                elif number > col.max:
                    outside[col.name][1] += 1
                coded[r, j] = number
            else:
                text = str(value).strip()
                if text not in index[col.name]:
                    raise DataError(
                        f"table {path} {where}: column {col.name!r} has {text!r}, which is not one of its declared "
                        f"categories ({listing([repr(c) for c in col.categories])}); fix: recode the value, or ask "
                        "the federation to add the category to its schema"
                    )
                coded[r, j] = index[col.name][text]
        labels.append(row_label(record, schema.label, f"table {path} {where}", require=require_label))
        if SPLIT_COLUMN in header:
            splits.append(row_split(record, f"table {path} {where}"))
        origins.append(where)
    notes = tuple(
        f"column {name!r}: {low} value(s) below the declared min and {high} above the declared max are clipped to "
        "the bounds by the encoding"
        for name, (low, high) in outside.items()
        if low or high
    )
    return TableRows(coded, labels, splits if SPLIT_COLUMN in header else None, origins, notes)


def _check_columns(path: Path, header: Sequence[str], schema: TableSchema, *, require_label: bool = True) -> None:
    """DataError naming the columns the file lacks or has beyond the schema (its label and split aside)."""
    expected = set(schema.column_names) | {schema.label}
    needed = (*schema.column_names, schema.label) if require_label else schema.column_names
    missing = [c for c in needed if c not in header]
    extra = [c for c in header if c not in expected and c != SPLIT_COLUMN]
    duplicated = sorted({c for c in header if list(header).count(c) > 1})
    problems = [
        text
        for items, text in (
            (missing, f"lacks the column(s) {missing}"),
            (extra, f"has column(s) {extra} that the schema does not declare"),
            (duplicated, f"repeats the column(s) {duplicated}"),
        )
        if items
    ]
    if problems:
        raise DataError(
            f"table {path} does not match the federation's schema {schema.name!r}: {'; '.join(problems)}; fix: give "
            f"the file exactly the columns {list(schema.column_names)} plus the label {schema.label!r} (and optionally "
            f"{SPLIT_COLUMN!r}), named as the schema names them"
        )


def _number(value: object) -> float | None:
    """`value` as a finite float (numbers or numeric text), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        number = float(value)
    else:
        try:
            number = float(str(value).strip())
        except ValueError:
            return None
    return number if math.isfinite(number) else None


def _csv_records(path: Path):
    """(header, rows as dicts, origin of row i) of a UTF-8 CSV file."""
    header, rows = csv_rows(
        path,
        read_utf8(path, "table"),
        "table",
        layout="a header row with the schema's columns, then one row per record",
        quoting="quote values that hold commas",
    )
    return header, [dict(zip(header, row)) for _, row in rows], lambda i: f"line {rows[i][0]}"


def _parquet_records(path: Path):
    """(header, rows as dicts, origin of row i) of a Parquet file."""
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - pyarrow comes with flwr-datasets
        raise DataError(
            f"reading {path} needs pyarrow ({exc}); fix: pip install pyarrow, or convert it to CSV"
        ) from exc
    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same fix
        raise DataError(f"table {path} is not a readable Parquet file ({type(exc).__name__}: {exc})") from exc
    return list(table.column_names), table.to_pylist(), lambda i: f"row {i + 1}"
