"""Text and table federations end to end: in process and on Flower's engine, then `fedtl predict` on texts and rows."""

import importlib.metadata
import json

import numpy as np
import pytest

from fedtl.server.model_file import load_model
from fedtl.shared import encoders
from fedtl.shared.backbones import fingerprint_state_dict
from fedtl.shared.config import RunConfig
from fedtl.shared.encoders import SchemaIdentity
from fedtl.shared.errors import ConfigError
from fedtl.shared.public_basis import SYNTHETIC_TEXT_COUNT
from fedtl.shared.tables import encode_rows, load_schema
from fedtl.simulations.inprocess import run_inprocess

SCHEMA = {
    "name": "accounts",
    "label": "status",
    "columns": [
        {"name": "balance", "type": "number", "min": -5000, "max": 50000},
        {"name": "overdrafts", "type": "number", "min": 0, "max": 12},
        {"name": "channel", "type": "category", "categories": ["branch", "online", "phone"]},
    ],
}
CARD = [
    "my card was charged twice",
    "unknown card payment on my statement",
    "card declined at the shop",
    "the card fee is too high",
    "refund the duplicate card charge",
    "my credit card was stolen",
    "card limit lowered without notice",
    "chargeback on my card ignored",
    "card payment not recognised",
    "they blocked my card abroad",
    "interest on my card balance is wrong",
    "card arrived damaged",
]
LOAN = [
    "my mortgage payment was lost",
    "the loan servicer added fees",
    "mortgage escrow is miscalculated",
    "student loan forbearance denied",
    "loan payoff amount is wrong",
    "they sold my mortgage without notice",
    "loan application delayed for months",
    "refinance of my mortgage stalled",
    "late fee on my car loan",
    "mortgage modification was refused",
    "the lender misreported my loan",
    "payday loan rolled over",
]


def _table(tmp_path, n=120, seed=0):
    """Rows whose status follows the overdraft count (a rule a linear head can learn), and the schema file."""
    rng = np.random.default_rng(seed)
    lines = ["balance,overdrafts,channel,status"]
    for _ in range(n):
        overdrafts = int(rng.integers(0, 13))
        lines.append(
            f"{rng.uniform(-4000, 40000):.2f},{overdrafts},{rng.choice(['branch', 'online', 'phone'])},"
            f"{'late' if overdrafts > 6 else 'current'}"
        )
    data = tmp_path / "accounts.csv"
    data.write_text("\n".join(lines) + "\n")
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    return data, schema


def _config(tmp_path, **values):
    return RunConfig.from_mapping({"num-rounds": 2, "target-epsilon": 3.0, "out": str(tmp_path / "runs"), **values})


def test_table_federation_in_process_then_predict_rows(tmp_path, capsys):
    from fedtl.cli.main import main

    data, schema = _table(tmp_path)
    summary = run_inprocess(_config(tmp_path, backbone="tabular", data=str(data), schema=str(schema)), num_sites=3)
    assert max(summary["epsilon-per-site"].values()) <= 3.0 + 1e-9
    # The backbone that was sent is the schema: its fingerprint is the schema's own hash.
    table = load_schema(schema)
    assert summary["backbone-fingerprint"] == fingerprint_state_dict(SchemaIdentity(table).state_dict())
    assert summary["final"]["central-accuracy"] > summary["majority-rate"]
    model = load_model(summary["model"])
    assert model.preprocessing.schema == table and model.feature_dim == table.width == 5
    assert "rows of schema 'accounts'" in (tmp_path / "runs" / summary["run-id"] / "model.md").read_text()
    rows = tmp_path / "new.csv"
    rows.write_text("balance,overdrafts,channel\n1200,0,online\n-300,12,branch\n")
    assert main(["predict", summary["model"], str(rows)]) == 0
    printed = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert [p for p, _, _ in printed] == [f"{rows}:line 2", f"{rows}:line 3"]
    # Oracle: the head applied by hand to the schema's encoding of the two rows.
    from fedtl.shared.heads import predict_proba

    coded = np.array([[1200.0, 0.0, 1.0], [-300.0, 12.0, 0.0]])
    probs = predict_proba(model.build_head(), encode_rows(table, coded))
    assert [lab for _, lab, _ in printed] == [model.label_names[i] for i in probs.argmax(1)]
    np.testing.assert_allclose([float(p) for _, _, p in printed], probs.max(1), atol=1e-4)


def test_a_site_refuses_a_table_whose_columns_differ(tmp_path):
    data, schema = _table(tmp_path)
    data.write_text(data.read_text().replace("channel", "segment", 1))
    with pytest.raises(Exception, match=r"has column\(s\) \['segment'\] that the schema does not declare"):
        run_inprocess(_config(tmp_path, backbone="tabular", data=str(data), schema=str(schema)), num_sites=2)


def test_the_data_kind_must_fit_the_backbone(tmp_path):
    data, schema = _table(tmp_path)
    with pytest.raises(ConfigError, match=r"holds rows but backbone 'tiny' reads images; fix: backbone = 'tabular'"):
        run_inprocess(_config(tmp_path, backbone="tiny", data=str(data), schema=str(schema)), num_sites=2)


@pytest.fixture
def complaints(tmp_path):
    try:
        importlib.metadata.distribution(encoders.MINILM_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"the PyPI package {encoders.MINILM_PACKAGE} is not installed ({encoders.INSTALL_MINILM})")
    path = tmp_path / "complaints.jsonl"
    records = [{"text": t, "label": "card"} for t in CARD] + [{"text": t, "label": "loan"} for t in LOAN]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_text_federation_in_process_then_predict_texts(tmp_path, complaints, capsys):
    from fedtl.cli.main import main
    from fedtl.server.predict import load_model_backbone
    from fedtl.shared.features import extract_features
    from fedtl.shared.heads import predict_proba

    cfg = _config(tmp_path, backbone="minilm_l6", data=str(complaints), **{"batch-size": 8, "test-fraction": 0.25})
    summary = run_inprocess(cfg, num_sites=2)
    assert max(summary["epsilon-per-site"].values()) <= 3.0 + 1e-9
    # head-solver auto plans texts too: a projected head on the synthetic texts' basis led by the class names.
    assert summary["head-plan"]["method"] == "dp-gd" and summary["head-plan"]["public-basis"]["class-names-leading"]
    assert summary["head-plan"]["public-basis"]["synthetic-texts"] == SYNTHETIC_TEXT_COUNT  # texts keep their own count
    model = load_model(summary["model"])
    assert model.preprocessing.kind == "texts" and model.feature_dim == 384
    texts = ["a second charge appeared on my card", "my mortgage servicer lost the payment"]
    assert main(["predict", summary["model"], *texts]) == 0
    printed = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    raw = np.empty(2, dtype=object)
    raw[:] = texts
    feats = extract_features(load_model_backbone(model), raw, model.preprocessing, progress=False)
    probs = predict_proba(model.build_head(), feats)
    assert [lab for _, lab, _ in printed] == [model.label_names[i] for i in probs.argmax(1)]
    np.testing.assert_allclose([float(p) for _, _, p in printed], probs.max(1), atol=1e-4)


@pytest.mark.slow
def test_table_federation_on_flowers_engine_matches_in_process(tmp_path):
    """Flower's simulation engine runs the same ServerApp and ClientApp: same model, same epsilon."""
    from fedtl.simulations.engine import simulate

    data, schema = _table(tmp_path)
    cfg = _config(tmp_path, backbone="tabular", data=str(data), schema=str(schema))
    engine = simulate(cfg, num_sites=2)
    inprocess = run_inprocess(cfg, num_sites=2)
    assert engine["epsilon-per-site"] == inprocess["epsilon-per-site"]
    a, b = load_model(engine["model"]), load_model(inprocess["model"])
    for name in a.arrays:
        np.testing.assert_array_equal(a.arrays[name], b.arrays[name])
