"""Table rows under a declared schema: the schema's checks, the loader's bad inputs, bounds-only encoding."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from fedtl.client.site import BackboneStore
from fedtl.shared.backbones import backbone_state_dict, build_backbone, fingerprint_state_dict, resolve_preprocessing
from fedtl.shared.errors import ConfigError, DataError, FingerprintMismatchError
from fedtl.shared.loaders import load_site_dataset
from fedtl.shared.tables import encode_rows, load_schema, read_table_rows

SCHEMA = {
    "name": "loans",
    "label": "risk",
    "columns": [
        {"name": "amount", "type": "number", "min": 0, "max": 10000, "scale": "log"},
        {"name": "months", "type": "number", "min": 6, "max": 60},
        {"name": "housing", "type": "category", "categories": ["rent", "own", "free"]},
    ],
}
HEADER = "amount,months,housing,risk\n"


def _schema(**changes):
    return load_schema({**SCHEMA, **changes})


def _write(tmp_path, text, name="rows.csv"):
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def test_schema_refuses_missing_bounds_duplicates_and_a_label_that_is_a_feature():
    no_bounds = {**SCHEMA, "columns": [{"name": "amount", "type": "number"}]}
    with pytest.raises(ConfigError, match=r"lacks \['max', 'min'\].*never a site's own statistics"):
        load_schema(no_bounds)
    twice = {**SCHEMA, "columns": SCHEMA["columns"] + [SCHEMA["columns"][1]]}
    with pytest.raises(ConfigError, match=r"declares the column\(s\) \['months'\] twice"):
        load_schema(twice)
    with pytest.raises(ConfigError, match="`label` must name the label column"):
        _schema(label="months")
    bad = {**SCHEMA, "columns": [{"name": "m", "type": "number", "min": 5, "max": 5}]}
    with pytest.raises(ConfigError, match="min < max"):
        load_schema(bad)


def test_schema_round_trips_through_its_canonical_json():
    schema = _schema()
    assert load_schema(schema.key()) == schema
    assert schema.width == 1 + 1 + 3
    assert len(schema.sha256()) == 64


def test_encoding_uses_the_declared_bounds_only():
    schema = _schema()
    rows = np.array([[0.0, 6.0, 0.0], [10000.0, 60.0, 2.0], [99.0, 33.0, 1.0], [50000.0, 1.0, 1.0]])
    got = encode_rows(schema, rows)
    # Oracle, by hand from the schema: log1p between log1p(0) and log1p(10000); months linear in [6, 60]; one-hot.
    amount = lambda x: 2 * math.log1p(min(max(x, 0), 10000)) / math.log1p(10000) - 1  # noqa: E731
    months = lambda m: 2 * (min(max(m, 6), 60) - 6) / 54 - 1  # noqa: E731
    expected = [
        [amount(0), months(6), 1, 0, 0],
        [amount(10000), months(60), 0, 0, 1],
        [amount(99), months(33), 0, 1, 0],
        [amount(50000), months(1), 0, 1, 0],  # out of bounds: clipped to the declared bounds
    ]
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_encoding_of_a_row_reads_no_statistic_of_the_other_rows():
    """Shift and rescale every other row (another site's data): the fixed row's encoding does not move."""
    schema = _schema()
    fixed = np.array([[1234.0, 24.0, 1.0]])
    rng = np.random.default_rng(0)
    others = np.column_stack([rng.uniform(0, 10000, 50), rng.uniform(6, 60, 50), rng.integers(0, 3, 50)])
    shifted = others.copy()
    shifted[:, 0] = shifted[:, 0] * 7 + 5000  # a site of much richer applicants
    shifted[:, 1] = 60.0  # all long loans
    alone = encode_rows(schema, fixed)
    with_a = encode_rows(schema, np.concatenate([fixed, others]))[:1]
    with_b = encode_rows(schema, np.concatenate([others[:10], fixed, shifted]))[10:11]
    assert np.array_equal(alone, with_a) and np.array_equal(alone, with_b)


def test_loader_names_missing_and_undeclared_columns(tmp_path):
    schema = _schema()
    missing = _write(tmp_path, "amount,housing,risk\n100,rent,good\n")
    with pytest.raises(DataError, match=r"lacks the column\(s\) \['months'\]"):
        read_table_rows(missing, schema)
    extra = _write(tmp_path, "amount,months,housing,income,risk\n100,12,rent,5,good\n")
    with pytest.raises(DataError, match=r"has column\(s\) \['income'\] that the schema does not declare"):
        read_table_rows(extra, schema)


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ("100,12,castle,good", r"line 2: column 'housing' has 'castle', which is not one of its declared categories"),
        ("lots,12,rent,good", r"line 2: column 'amount' must be a number, got 'lots'"),
        ("100,,rent,good", r"line 2: column 'months' is empty"),
        ("100,12,rent,", r"line 2: the label column 'risk' is empty"),
        ("100,12,rent", r"line 2: 3 field\(s\) but the header has 4"),
        (",,,", r"line 2: column 'amount' is empty"),  # a row of empty fields is a row, not a blank line
    ],
)
def test_loader_names_the_line_column_and_value_of_a_bad_cell(tmp_path, row, match):
    with pytest.raises(DataError, match=match):
        read_table_rows(_write(tmp_path, HEADER + row + "\n"), _schema())


def test_loader_refuses_bytes_that_are_not_utf8(tmp_path):
    path = _write(tmp_path, HEADER.encode() + b"100,12,r\xe9nt,good\n")
    with pytest.raises(DataError, match=r"offset 35 \(line 2\) are not UTF-8"):
        read_table_rows(path, _schema())


def test_values_outside_the_bounds_are_counted_not_refused(tmp_path):
    path = _write(tmp_path, HEADER + "100,3,rent,good\n20000,12,own,bad\n100,70,own,bad\n")
    rows = read_table_rows(path, _schema())
    assert rows.rows.shape == (3, 3) and rows.labels == ["good", "bad", "bad"]
    assert any("'amount': 0 value(s) below the declared min and 1 above" in n for n in rows.notes)
    assert any("'months': 1 value(s) below the declared min and 1 above" in n for n in rows.notes)


def test_parquet_reads_as_the_same_rows_as_csv(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    csv_path = _write(tmp_path, HEADER + "100,12,rent,good\n2500.5,48,free,bad\n")
    table = pa.table(
        {"amount": [100, 2500.5], "months": [12, 48], "housing": ["rent", "free"], "risk": ["good", "bad"]}
    )
    pq.write_table(table, tmp_path / "rows.parquet")
    a, b = read_table_rows(csv_path, _schema()), read_table_rows(tmp_path / "rows.parquet", _schema())
    assert np.array_equal(a.rows, b.rows) and a.labels == b.labels


def test_site_loader_reads_a_table_only_under_a_schema(tmp_path):
    lines = [f"{100 * i},{6 + i},{['rent', 'own', 'free'][i % 3]},{'good' if i % 2 else 'bad'}" for i in range(20)]
    path = _write(tmp_path, HEADER + "\n".join(lines) + "\n")
    data = load_site_dataset(path, schema=_schema(), label_names=["good", "bad"])
    assert data.report.inputs == "rows" and data.splits.train.kind == "rows"
    assert data.splits.train.label_names == ("good", "bad")
    assert sum(data.report.split_counts.values()) == 20
    assert "3 columns of schema 'loans' (5 encoded features)" in data.report.summary()
    with pytest.raises(DataError, match=r"label\(s\)|not one of|unknown"):
        load_site_dataset(path, schema=_schema(), label_names=["low", "high"])
    pq_path = tmp_path / "t.parquet"
    pq_path.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="read under the federation's schema"):
        load_site_dataset(pq_path)


def test_tabular_backbone_fingerprint_is_the_schema_and_a_tampered_schema_is_refused(tmp_path):
    schema = _schema()
    module = build_backbone("tabular", schema=schema)
    state = backbone_state_dict(module)
    assert list(state) == ["schema"] and bytes(state["schema"].tolist()).decode() == schema.key()
    fingerprint = fingerprint_state_dict(state)
    assert fingerprint_state_dict(backbone_state_dict(build_backbone("tabular", state))) == fingerprint
    wider = json.loads(schema.key())
    wider["columns"][1]["max"] = 61
    assert (
        fingerprint_state_dict(backbone_state_dict(build_backbone("tabular", schema=load_schema(wider)))) != fingerprint
    )
    store = BackboneStore(tmp_path / "backbones")
    tampered = {"schema": state["schema"].clone()}
    tampered["schema"][-3] += 1  # one byte of the schema changed in transit
    with pytest.raises(FingerprintMismatchError, match="refusing them"):
        store.install("tabular", fingerprint, tampered)
    assert not store.has(fingerprint)
    store.install("tabular", fingerprint, state)
    x = torch.randn(4, schema.width)
    assert torch.equal(store.load("tabular", fingerprint)(x), x)  # the identity on encoded rows
    with pytest.raises(ConfigError, match="backbone `tabular` encodes rows by the federation's declared table schema"):
        resolve_preprocessing("tabular")


def test_a_site_policy_pins_the_schema_and_site_init_allows_its_fingerprint(tmp_path):
    from builders import round_settings

    from fedtl.client.admin import check_data, init_policy
    from fedtl.client.policy import PolicyRefusal, load_policy

    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    rows = ["100,12,rent,good", "2500,48,own,bad", "40,6,free,good", "9000,60,own,bad", "700,24,rent,good"]
    data = _write(tmp_path, HEADER + "\n".join(rows * 4) + "\n")
    path = init_policy(
        tmp_path / "site.toml",
        site_name="bank-a",
        data=str(data),
        backbones=["tabular"],
        label_names=["good", "bad"],
        schema=str(schema_file),
    )
    policy = load_policy(path)
    fingerprint = fingerprint_state_dict(backbone_state_dict(build_backbone("tabular", schema=_schema())))
    assert policy.allowed_backbones == (fingerprint,) and policy.table_schema() == _schema()
    assert "rows: " in check_data(policy) and "3 columns of schema 'loans'" in check_data(policy)
    settings = round_settings(fingerprint, backbone_name="tabular", label_names='["good", "bad"]', num_classes=2)
    policy.check_settings(dataclasses.replace(settings, schema=_schema().key()), action="training")
    other = _schema(name="loans-v2")
    with pytest.raises(PolicyRefusal, match=r"the run sends schema 'loans-v2', which differs from the schema 'loans'"):
        policy.check_settings(dataclasses.replace(settings, schema=other.key()), action="training")
    with pytest.raises(PolicyRefusal, match=r"the run sends no table schema"):
        policy.check_settings(settings, action="training")
