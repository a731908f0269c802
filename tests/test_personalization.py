"""Personalised heads: FedPer keeps the last layer at each site; finetune adapts the final head locally."""

import json
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from fedtl.client.ledger import PrivacyLedger
from fedtl.server import report
from fedtl.shared import constants as k
from fedtl.shared import mechanisms
from fedtl.shared.config import RunConfig
from fedtl.shared.errors import ConfigError
from fedtl.shared.heads import personal_array_names
from fedtl.simulations import baselines as bl
from fedtl.simulations.inprocess import run_inprocess

pytestmark = pytest.mark.slow  # whole federations with personalised heads

DP_SGD = mechanisms.DP_SGD.kind

ROUNDS = 2


def _cfg(tmp_path, **changes) -> RunConfig:
    values = dict(
        backbone="tiny",
        num_rounds=ROUNDS,
        out=str(tmp_path / "runs"),
        partition="dirichlet:0.3",
        target_epsilon=6.0,
        seed=1,
        learning_rate=4.0,
    )
    values.update(changes)
    return RunConfig(**values)


def _ledger_epsilon(summary, site: str) -> float:
    ledger = PrivacyLedger(Path(summary["run-dir"]) / "sites" / site / "privacy" / "ledger.jsonl")
    accountant = RDPAccountant()
    for charge in ledger.charges():
        accountant.history.append((charge.noise_multiplier, charge.sample_rate, charge.steps))
    return accountant.get_epsilon(delta=1e-5)


def test_fedper_keeps_the_last_layer_at_each_site(tmp_path, monkeypatch):
    sent: list[set[str]] = []
    original = report.RunRecorder.screen_train

    def spy(self, server_round, msgs):
        sent.extend(set(m.content.array_records[k.ARRAYS].keys()) for m in msgs if not m.has_error())
        return original(self, server_round, msgs)

    monkeypatch.setattr(report.RunRecorder, "screen_train", spy)
    cfg = _cfg(tmp_path, head="mlp", head_hidden=16, personalization="fedper")
    summary = run_inprocess(cfg, num_sites=3)

    personal = set(personal_array_names("mlp"))
    assert sent and all(names.isdisjoint(personal) and "layers.0.weight" in names for names in sent)
    assert summary["model"] == ""  # no single model: the last layers never left the sites
    per_site = summary["personalization"]["sites"]
    assert set(per_site) == {"site-0", "site-1", "site-2"}
    # Each site's own model (shared layers + its last layer), scored independently from its kept layer.
    lab = bl.load_lab_federation(cfg, 3)
    kept = {}
    for site in lab.sites:
        files = list((Path(summary["run-dir"]) / "sites" / site.name / "personal").glob("*.npz"))
        assert len(files) == 1
        with np.load(files[0]) as data:
            kept[site.name] = {name: data[name] for name in data.files}
        assert set(kept[site.name]) == personal
    a, b = kept["site-0"]["layers.2.weight"], kept["site-1"]["layers.2.weight"]
    assert not np.array_equal(a, b)
    for site in ("site-0", "site-1", "site-2"):
        assert summary["epsilon-per-site"][site] <= cfg.target_epsilon
        assert summary["epsilon-per-site"][site] == pytest.approx(_ledger_epsilon(summary, site), rel=1e-9)


def test_finetune_scores_both_heads_and_stays_within_the_budget(tmp_path):
    cfg = _cfg(tmp_path, personalization="finetune", finetune_epochs=3)
    summary = run_inprocess(cfg, num_sites=2)
    personal = summary["personalization"]
    assert personal["method"] == "finetune"
    lab = bl.load_lab_federation(cfg, 2)
    from fedtl.server.model_file import load_model

    shared = bl.site_accuracies(lab, load_model(summary["model"]).arrays)
    for site in ("site-0", "site-1"):
        scores = personal["sites"][site]
        # The shared head's accuracy reported by the site equals the lab's independent evaluation.
        assert scores[k.SHARED_ACCURACY] == pytest.approx(shared[site], abs=1e-12)
        assert 0.0 <= scores[k.PERSONALIZED_ACCURACY] <= 1.0
        ledger = PrivacyLedger(Path(summary["run-dir"]) / "sites" / site / "privacy" / "ledger.jsonl")
        charges = [c for c in ledger.charges() if c.kind == DP_SGD]
        assert [c.server_round for c in charges] == [1, 2, ROUNDS + 1]
        assert charges[-1].steps == charges[0].steps // cfg.local_epochs * cfg.finetune_epochs
        # The finetune steps were planned into the noise: the whole run stays within target epsilon.
        eps = summary["epsilon-per-site"][site]
        assert eps == pytest.approx(_ledger_epsilon(summary, site), rel=1e-9)
        assert cfg.target_epsilon * 0.9 < eps <= cfg.target_epsilon
    lines = [json.loads(x) for x in (Path(summary["run-dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == list(range(ROUNDS + 1))


def test_fedper_needs_an_mlp_head():
    with pytest.raises(ConfigError, match=r'`personalization = "fedper"` .* needs head = "mlp"'):
        RunConfig(personalization="fedper", head="linear")
