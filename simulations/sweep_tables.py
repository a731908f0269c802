"""The sweep's CSV tables: their columns, the type of every column, and one writer and one reader for all four."""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedtl.shared.errors import DataError
from fedtl.shared.files import atomic_write_bytes

RESULTS_CSV = "results.csv"
ROUNDS_CSV = "rounds.csv"
SITE_ROUNDS_CSV = "site_rounds.csv"
SITES_CSV = "sites.csv"

# One row per run or baseline. `accuracy` is the server's held-out accuracy; `site_accuracy` the
# test-size-weighted mean over the sites' own test splits of the model each site ends with.
RESULTS_COLUMNS = (
    "run",
    "method",
    "backbone",
    "data",
    "sites",
    "partition",
    "alpha",
    "target_epsilon",
    "seed",
    "accuracy",
    "balanced_accuracy",
    "site_accuracy",
    "majority_rate",
    "epsilon_spent",
    "client_epsilon",
    "seconds",
)
# The columns that name a run in the per-round and per-site tables.
RUN_COLUMNS = ("run", "method", "backbone", "sites", "partition", "target_epsilon", "seed")
# One row per run and round (round 0 = the initial model), server held-out accuracy.
ROUNDS_COLUMNS = (*RUN_COLUMNS, "round", "accuracy")
# One row per run, round and site: that site's cumulative sample-level epsilon after the round.
SITE_ROUNDS_COLUMNS = (*RUN_COLUMNS, "round", "site", "epsilon")
# One row per run and site: federated vs local-only accuracy on the site's own test split.
SITES_COLUMNS = (
    *RUN_COLUMNS,
    "site",
    "n_train",
    "n_test",
    "class_counts",
    "federated_accuracy",
    "local_accuracy",
    "transfer_gain",
    "gain_stderr",
    "personalized_accuracy",
    "negative_transfer",
)
TABLE_COLUMNS = {
    RESULTS_CSV: RESULTS_COLUMNS,
    ROUNDS_CSV: ROUNDS_COLUMNS,
    SITE_ROUNDS_CSV: SITE_ROUNDS_COLUMNS,
    SITES_CSV: SITES_COLUMNS,
}

# Federated methods and the baselines every report carries (values of the `method` column).
FEDERATED_METHODS = ("fedavg", "fedprox", "fedadam", "fedper", "finetune", "closed-form", "secagg")  # then secagg-tT
MAJORITY = "majority"  # always predict the most frequent training class
CENTRAL = "central"  # non-private, pooled training data
CENTRAL_DP = "central-dp"  # pooled training data, DP-SGD at the same target epsilon
LOCAL = "local"  # each site alone, DP-SGD at the same target epsilon
FEDERATED_NONPRIVATE = "federated-nonprivate"
BASELINE_METHODS = (MAJORITY, CENTRAL, CENTRAL_DP, LOCAL, FEDERATED_NONPRIVATE)
EPSILON_FREE_METHODS = (MAJORITY, CENTRAL, FEDERATED_NONPRIVATE)  # target_epsilon = inf
METHOD_ORDER = FEDERATED_METHODS + (CENTRAL_DP, LOCAL, FEDERATED_NONPRIVATE, CENTRAL, MAJORITY)

_INT_COLUMNS = frozenset({"sites", "seed", "round", "n_train", "n_test"})
_TEXT_COLUMNS = frozenset({"run", "method", "backbone", "data", "partition", "site"})
_BOOL_COLUMNS = frozenset({"negative_transfer"})
_INT_LIST_COLUMNS = frozenset({"class_counts"})
# Every column of a table not named above holds a number.
_FLOAT_COLUMNS = frozenset(
    set(RESULTS_COLUMNS + ROUNDS_COLUMNS + SITE_ROUNDS_COLUMNS + SITES_COLUMNS)
    - _TEXT_COLUMNS
    - _INT_COLUMNS
    - _BOOL_COLUMNS
    - _INT_LIST_COLUMNS
)

_EXPECTED = {
    "int": "an integer or None",
    "float": "a number (inf/nan allowed) or None",
    "bool": "True, False or None",
    "int-list": "a list of integers or None",
}
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


def column_kind(column: str) -> str:
    """Return how a column is stored: 'int', 'float', 'bool', 'int-list' or 'text'."""
    if column in _INT_COLUMNS:
        return "int"
    if column in _FLOAT_COLUMNS:
        return "float"
    if column in _BOOL_COLUMNS:
        return "bool"
    if column in _INT_LIST_COLUMNS:
        return "int-list"
    return "text"


def write_table(path: str | Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    """Write `rows` as a CSV with a header of `columns` (atomically); None or "" is an empty cell, inf is `inf`.

    Raises:
        DataError: a row's keys differ from `columns`, or a value does not fit its column's type.
    """
    path = Path(path)
    columns = tuple(columns)
    if len(set(columns)) != len(columns):
        raise DataError(f"{path.name}: duplicate column names in {list(columns)}; give each column once")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for index, row in enumerate(rows):
        keys = set(row)
        if keys != set(columns):
            missing = sorted(set(columns) - keys)
            extra = sorted(keys - set(columns))
            raise DataError(
                f"{path.name}: rows[{index}] does not have the table's columns (missing {missing}, unexpected "
                f"{extra}); give every row exactly the keys {list(columns)}"
            )
        writer.writerow([_format_cell(row[column], column, path=path, index=index) for column in columns])
    return atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))


def read_table(path: str | Path, columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Read a CSV written by `write_table`, parsing each column back to its type (empty cell -> None).

    Args:
        path: the CSV file.
        columns: the header the file must have; default: the known header of its file name
            (`results.csv` ...), or whatever header it has for other names.

    Raises:
        DataError: the file is missing or empty, its header is not `columns`, a row has too many or
            too few cells, or a cell does not parse as its column's type (the error names the file,
            the row and the column).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"table {path} does not exist; run the sweep that writes it first")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise DataError(f"table {path} is empty: it has no header row; rewrite it with write_table")
        expected = tuple(columns) if columns is not None else TABLE_COLUMNS.get(path.name)
        if expected is not None and tuple(header) != expected:
            raise DataError(
                f"table {path} has columns {header}, expected {list(expected)}; rewrite it with this version's sweep"
            )
        rows = []
        for row, cells in enumerate(reader, start=1):
            line = reader.line_num
            if len(cells) != len(header):
                raise DataError(
                    f"table {path} row {row} (line {line}) has {len(cells)} cells for {len(header)} columns; "
                    "fix or rewrite the file"
                )
            rows.append(
                {
                    column: _parse_cell(cell, column, path=path, row=row, line=line)
                    for column, cell in zip(header, cells)
                }
            )
    return rows


def _format_cell(value: Any, column: str, *, path: Path, index: int) -> str:
    """Return the CSV text of one value of `column`."""
    if value is None or isinstance(value, str) and value == "":
        return ""
    kind = column_kind(column)

    def bad(expected: str) -> DataError:
        return DataError(f"{path.name}: rows[{index}] column `{column}` must be {expected}, got {value!r}")

    if isinstance(value, str) and kind != "text":
        # Text of a value (JSON class counts, 'inf' from a JSON metrics line): checked as the CSV reader would.
        try:
            value = _parse_cell(value, column, path=path, row=index + 1, line=0)
        except DataError:
            raise bad(f"{_EXPECTED[kind]} (or its text)") from None
        if value is None:
            return ""

    if kind == "int":
        if not _is_int(value):
            raise bad(_EXPECTED[kind])
        return str(int(value))
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise bad(_EXPECTED[kind])
        value = float(value)
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # the shortest text that reads back to the same float
    if kind == "bool":
        if not isinstance(value, bool | np.bool_):
            raise bad(_EXPECTED[kind])
        return "true" if value else "false"
    if kind == "int-list":
        if isinstance(value, str) or not isinstance(value, Sequence) or not all(_is_int(v) for v in value):
            raise bad(_EXPECTED[kind])
        return json.dumps([int(v) for v in value])
    return str(value)


def _parse_cell(cell: str, column: str, *, path: Path, row: int, line: int) -> Any:
    """Return the typed value of one CSV cell of `column` (`row` counts data rows from 1)."""
    text = cell.strip()
    if text == "":
        return None
    kind = column_kind(column)

    def bad(expected: str) -> DataError:
        return DataError(
            f"table {path} row {row} (line {line}) column `{column}`: {cell!r} is not {expected}; "
            "fix the cell or rewrite the table"
        )

    if kind == "int":
        if not re.fullmatch(r"[+-]?\d+", text):
            raise bad("an integer")
        return int(text)
    if kind == "float":
        try:
            return float(text)  # accepts inf, -inf, nan
        except ValueError:
            raise bad("a number (inf and nan allowed)") from None
    if kind == "bool":
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise bad("true or false")
    if kind == "int-list":
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise bad("a JSON list of integers") from None
        if not isinstance(value, list) or not all(_is_int(v) for v in value):
            raise bad("a JSON list of integers")
        return [int(v) for v in value]
    return cell


def _is_int(value: Any) -> bool:
    """Return whether `value` is a whole number: an integer (numpy's too, not a bool) or an integral float."""
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Integral):
        return True
    return isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer()


def natural_key(value: Any) -> tuple:
    """Return a sort key: None, then numbers, then text with its digits read as numbers ('site-10' > 'site-9')."""
    if value is None:
        return (0, 0.0, ())
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return (1, float(value), ())
    parts = re.split(r"(\d+)", str(value))
    return (2, 0.0, tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts))


def method_sort_key(method: str) -> tuple:
    """Return a sort key putting federated methods first, then the baselines, in METHOD_ORDER."""
    family = "secagg" if re.fullmatch(r"secagg-t\d+", method) else method  # secagg-t1, -t2, ... after secagg
    rank = METHOD_ORDER.index(family) if family in METHOD_ORDER else len(METHOD_ORDER)
    return (rank, natural_key(method))


def is_epsilon_free(row: Mapping[str, Any]) -> bool:
    """Return whether a row is non-private: its target_epsilon is empty, inf or nan."""
    epsilon = row.get("target_epsilon")
    return epsilon is None or not math.isfinite(epsilon)


def format_epsilon(epsilon: float | None) -> str:
    """Return a target epsilon as text: '8', '0.5', or '∞' for non-private."""
    if epsilon is None or not math.isfinite(epsilon):
        return "∞"
    return f"{epsilon:g}"


def group_facets(
    rows: Sequence[Mapping[str, Any]], fields: Sequence[str]
) -> list[tuple[tuple, list[Mapping[str, Any]]]]:
    """Group rows by the values of `fields`, sorted; an empty (None) field matches every value of that field.

    A baseline whose `sites` or `partition` does not apply (empty) joins every facet that agrees with it on
    the other fields, so e.g. one pooled central baseline is shown beside every partition of its backbone.
    """
    fields = tuple(fields)

    def key_of(row: Mapping[str, Any]) -> tuple:
        return tuple(row.get(field) for field in fields)

    def covers(general: tuple, specific: tuple) -> bool:
        return all(g is None or g == s for g, s in zip(general, specific))

    keys = sorted({key_of(row) for row in rows}, key=lambda key: tuple(natural_key(v) for v in key))
    facets = [key for key in keys if not any(other != key and covers(key, other) for other in keys)]
    return [(facet, [row for row in rows if covers(key_of(row), facet)]) for facet in facets]


def is_finite_number(value: Any) -> bool:
    """Return whether a cell holds a finite number (not None, not a bool, not inf or nan)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def describe_config(*, backbone: Any, sites: Any, partition: Any, alpha: Any = None, data: Any = None) -> str:
    """Return 'digits · tiny · 3 sites · dirichlet:0.5' from the fields that are known (None ones are left out)."""
    parts = [str(data)] if data is not None else []
    if backbone is not None:
        parts.append(str(backbone))
    if sites is not None:
        parts.append(f"{sites} sites")
    if partition is not None:
        label = str(partition)
        if is_finite_number(alpha) and ":" not in label:
            label += f" α={alpha:g}"
        parts.append(label)
    return " · ".join(parts) if parts else "all runs"
