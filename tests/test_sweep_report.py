"""Sweep tables, figures and report: tables round-trip, every figure is a real PNG, negative transfer is flagged."""

from __future__ import annotations

import csv
import io
import math
import re

import numpy as np
import pytest
from PIL import Image

from fedtl.shared.errors import DataError
from fedtl.simulations import plots
from fedtl.simulations.sweep_report import negative_transfer_lines, write_report
from fedtl.simulations.sweep_tables import (
    BASELINE_METHODS,
    RESULTS_COLUMNS,
    RESULTS_CSV,
    ROUNDS_COLUMNS,
    ROUNDS_CSV,
    SITE_ROUNDS_COLUMNS,
    SITE_ROUNDS_CSV,
    SITES_COLUMNS,
    SITES_CSV,
    read_table,
    write_table,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SPEC = 'name = "tiny"\nepsilons = [1.0, 8.0]\nseeds = [0, 1]\nmethods = ["fedavg"]\n'
SITES = ("site-0", "site-1", "site-2")
# (gain, stderr) per site and seed: site-2 loses in both seeds, once beyond 2 SE and once within.
GAINS = {
    ("site-0", 0): (0.05, 0.02),
    ("site-1", 0): (0.03, 0.02),
    ("site-2", 0): (-0.08, 0.02),
    ("site-0", 1): (0.04, 0.02),
    ("site-1", 1): (0.02, 0.02),
    ("site-2", 1): (-0.01, 0.02),
}


def build_tables(*, epsilons=(1.0, 8.0), seeds=(0, 1), sites=SITES, rounds=3) -> dict[str, list[dict]]:
    """Return the four sweep tables of a small sweep: fedavg and every baseline over tiny/3 sites/dirichlet."""
    common = {"backbone": "tiny", "sites": len(sites), "partition": "dirichlet:0.5"}
    results, round_rows, site_rounds, site_rows = [], [], [], []
    for seed in seeds:
        for method, accuracy in (("majority", 0.11), ("central", 0.95), ("federated-nonprivate", 0.93)):
            run = "" if method != "federated-nonprivate" else f"fnp-s{seed}"
            results.append(_result(run, method, common, math.inf, seed, accuracy + 0.01 * seed, spent=None))
            if method == "federated-nonprivate":
                for r in range(rounds + 1):
                    round_rows.append(_round(run, method, common, math.inf, seed, r, 0.1 + 0.83 * r / rounds))
        for eps in epsilons:
            base = 0.6 + 0.05 * math.log2(eps) + 0.01 * seed
            run = f"fedavg-eps{eps:g}-s{seed}"
            results.append(_result(run, "fedavg", common, eps, seed, base, spent=0.98 * eps))
            results.append(_result("", "central-dp", common, eps, seed, base + 0.1, spent=eps))
            results.append(_result("", "local", common, eps, seed, base - 0.05, spent=eps))
            for r in range(rounds + 1):
                round_rows.append(_round(run, "fedavg", common, eps, seed, r, 0.1 + (base - 0.1) * r / rounds))
            for i, site in enumerate(sites):
                for r in range(1, rounds + 1):
                    epsilon = 0.98 * eps * (r / rounds) * (1 - 0.01 * i)
                    site_rounds.append(
                        {**_key(run, "fedavg", common, eps, seed), "round": r, "site": site, "epsilon": epsilon}
                    )
                gain, stderr = GAINS.get((site, seed), (0.01 * (i % 5) + 0.01, 0.02))
                local = 0.7 - 0.01 * i
                site_rows.append(
                    {
                        **_key(run, "fedavg", common, eps, seed),
                        "site": site,
                        "n_train": 100 + 10 * i,
                        "n_test": 30,
                        "class_counts": [40 + i, 30, 30 + 9 * i],
                        "federated_accuracy": local + gain,
                        "local_accuracy": local,
                        "transfer_gain": gain,
                        "gain_stderr": stderr,
                        "personalized_accuracy": None,
                        "negative_transfer": gain < 0,
                    }
                )
    return {RESULTS_CSV: results, ROUNDS_CSV: round_rows, SITE_ROUNDS_CSV: site_rounds, SITES_CSV: site_rows}


def _key(run, method, common, eps, seed) -> dict:
    return {"run": run, "method": method, **common, "target_epsilon": eps, "seed": seed}


def _round(run, method, common, eps, seed, server_round, accuracy) -> dict:
    return {**_key(run, method, common, eps, seed), "round": server_round, "accuracy": accuracy}


def _result(run, method, common, eps, seed, site_accuracy, *, spent) -> dict:
    has_server_model = method not in ("local", "majority")
    return {
        **_key(run, method, common, eps, seed),
        "data": "digits",
        "alpha": 0.5,
        "accuracy": site_accuracy + 0.01 if has_server_model else None,
        "balanced_accuracy": site_accuracy if has_server_model else None,
        "site_accuracy": site_accuracy,
        "majority_rate": 0.11,
        "epsilon_spent": spent,
        "client_epsilon": None,
        "seconds": 2.5,
    }


COLUMNS = {
    RESULTS_CSV: RESULTS_COLUMNS,
    ROUNDS_CSV: ROUNDS_COLUMNS,
    SITE_ROUNDS_CSV: SITE_ROUNDS_COLUMNS,
    SITES_CSV: SITES_COLUMNS,
}


def write_tables(out_dir, tables) -> None:
    """Write the four tables into `out_dir` as the sweep runner does."""
    for name, rows in tables.items():
        write_table(out_dir / name, rows, COLUMNS[name])


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A report over the small sweep: its folder, its text and the tables it was made from."""
    out = tmp_path_factory.mktemp("sweep")
    tables = build_tables()
    write_tables(out, tables)
    path = write_report(out, spec_text=SPEC, title="tiny sweep")
    return {"out": out, "path": path, "text": path.read_text(encoding="utf-8"), "tables": tables}


def assert_valid_png(path) -> None:
    """The file is a PNG that PIL decodes, larger than 200 x 200 px and 10 kB."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 10_000, (path, len(data))
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert min(image.size) > 200, image.size
        image.load()


def test_report_links_every_figure_and_every_figure_is_a_valid_png(report):
    out, text = report["out"], report["text"]
    assert report["path"] == out / "report.md"
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert len(pngs) == 4
    assert sorted(linked) == pngs  # relative links, one per figure, no dangling one
    for name in pngs:
        assert_valid_png(out / name)


def test_report_holds_spec_baselines_and_privacy_notes(report):
    text = report["text"]
    assert f"```toml\n{SPEC}```" in text
    table_rows = [line for line in text.splitlines() if line.startswith("| ")]
    for method in BASELINE_METHODS:
        rows = [line for line in table_rows if line.startswith(f"| {method} |")]
        assert rows and all("baseline" in line for line in rows), method
    for line in table_rows:
        if line.startswith(("| majority |", "| central |", "| federated-nonprivate |")):
            assert "non-private" in line
    # One results table per target epsilon of the one configuration.
    assert len(re.findall(r"^### .*target ε = 1$", text, flags=re.M)) == 2  # results + transfer gain
    assert len(re.findall(r"^### .*target ε = 8$", text, flags=re.M)) == 2
    assert "Sample-level ε" in text and "Client-level ε" in text


def test_results_table_mean_and_std_match_numpy(report):
    fedavg = [
        r["site_accuracy"]
        for r in report["tables"][RESULTS_CSV]
        if r["method"] == "fedavg" and r["target_epsilon"] == 8.0
    ]
    expected = f"{np.mean(fedavg) * 100:.1f} ± {np.std(fedavg, ddof=1) * 100:.1f} (n={len(fedavg)})"
    section = report["text"].split("target ε = 8\n", 1)[1]
    row = next(line for line in section.splitlines() if line.startswith("| **fedavg** |"))
    assert expected in row


def test_negative_transfer_is_flagged_for_exactly_the_losing_site(report):
    site_rows = report["tables"][SITES_CSV]
    # Oracle: the sign of federated - local per row, and 2 standard errors from the row's own numbers.
    losing = {
        (r["site"], r["seed"], r["target_epsilon"]) for r in site_rows if r["federated_accuracy"] < r["local_accuracy"]
    }
    beyond = {
        (r["site"], r["seed"], r["target_epsilon"]) for r in site_rows if r["transfer_gain"] < -2 * r["gain_stderr"]
    }
    assert {site for site, _, _ in losing} == {"site-2"} and beyond and beyond < losing

    flagged, flagged_beyond = set(), set()
    epsilon = None
    for line in report["text"].split("## Per-site transfer gain", 1)[1].splitlines():
        if line.startswith("### "):
            epsilon = float(line.rsplit("= ", 1)[1])
        elif line.startswith("| site-"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            key = (cells[0], int(cells[1]), epsilon)
            if "NEGATIVE TRANSFER" in line:
                flagged.add(key)
                if "beyond 2 SE" in line:
                    flagged_beyond.add(key)
            else:
                assert cells[-1] == "positive"
    assert flagged == losing and flagged_beyond == beyond

    lines = negative_transfer_lines(read_table(report["out"] / SITES_CSV))
    assert len(lines) == len(losing)
    assert all(line.startswith("NEGATIVE TRANSFER at site-2 ") for line in lines)
    assert sum("beyond 2 SE" in line for line in lines) == len(beyond)
    assert all(line in report["text"] for line in lines)  # the report lists them at the top too


def test_tables_round_trip_through_csv(tmp_path):
    tables = build_tables()
    write_tables(tmp_path, tables)
    for name, rows in tables.items():
        back = read_table(tmp_path / name)
        expected = [{k: (None if v == "" else v) for k, v in row.items()} for row in rows]
        assert back == expected, name
    # inf, nan and JSON text of class counts survive too; empty strings are empty cells.
    odd = dict(tables[SITES_CSV][0], target_epsilon=math.inf, transfer_gain=math.nan, class_counts="[1, 2]", run="")
    write_table(tmp_path / "odd.csv", [odd], SITES_COLUMNS)
    (back,) = read_table(tmp_path / "odd.csv", SITES_COLUMNS)
    assert back["target_epsilon"] == math.inf and math.isnan(back["transfer_gain"])
    assert back["class_counts"] == [1, 2] and back["run"] is None and back["negative_transfer"] is False


@pytest.mark.parametrize(
    ("column", "cell", "message"),
    [
        ("target_epsilon", "eight", r"sites\.csv row 2 \(line 3\) column `target_epsilon`: 'eight' is not a number"),
        ("seed", "1.5", r"row 2 \(line 3\) column `seed`: '1\.5' is not an integer"),
        ("negative_transfer", "maybe", r"column `negative_transfer`: 'maybe' is not true or false"),
        ("class_counts", "[1, x]", r"column `class_counts`: '\[1, x\]' is not a JSON list of integers"),
    ],
)
def test_bad_cell_names_file_row_and_column(tmp_path, column, cell, message):
    path = tmp_path / SITES_CSV
    write_table(path, build_tables()[SITES_CSV][:2], SITES_COLUMNS)
    with path.open(newline="") as fh:
        header, first, second = list(csv.reader(fh))
    second[SITES_COLUMNS.index(column)] = cell
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([header, first, second])
    path.write_text(buffer.getvalue())
    with pytest.raises(DataError, match=message):
        read_table(path)


def test_bad_tables_are_refused_with_the_fix(tmp_path):
    row = build_tables()[RESULTS_CSV][0]
    with pytest.raises(DataError, match=r"rows\[0\] does not have the table's columns \(missing \['seconds'\]"):
        write_table(tmp_path / RESULTS_CSV, [{k: v for k, v in row.items() if k != "seconds"}], RESULTS_COLUMNS)
    with pytest.raises(
        DataError, match=r"rows\[0\] column `seed` must be an integer or None \(or its text\), got 'zero'"
    ):
        write_table(tmp_path / RESULTS_CSV, [dict(row, seed="zero")], RESULTS_COLUMNS)
    (tmp_path / RESULTS_CSV).write_text("run,method\nx,fedavg\n")
    with pytest.raises(DataError, match=r"has columns \['run', 'method'\], expected \['run', 'method', 'backbone'"):
        read_table(tmp_path / RESULTS_CSV)
    (tmp_path / "t.csv").write_text("run,seed\nx,1,2\n")
    with pytest.raises(DataError, match=r"t\.csv row 1 \(line 2\) has 3 cells for 2 columns"):
        read_table(tmp_path / "t.csv")
    with pytest.raises(DataError, match=r"missing\.csv does not exist; run the sweep that writes it first"):
        read_table(tmp_path / "missing.csv")
    empty = tmp_path / "empty"
    write_tables(empty, {name: [] for name in COLUMNS})
    with pytest.raises(DataError, match=r"results\.csv has no rows; the sweep produced no run to report"):
        write_report(empty, spec_text=SPEC)


def test_single_point_sweep_and_large_federation_draw_deterministic_pngs(tmp_path):
    single = build_tables(epsilons=(2.0,), seeds=(0,))
    many = build_tables(epsilons=(2.0,), seeds=(0,), sites=tuple(f"site-{i}" for i in range(40)), rounds=2)
    cases = [
        (plots.plot_accuracy_vs_epsilon, RESULTS_CSV),
        (plots.plot_accuracy_vs_round, ROUNDS_CSV),
        (plots.plot_site_epsilon, SITE_ROUNDS_CSV),
        (plots.plot_transfer_gain, SITES_CSV),
    ]
    for plot, table in cases:
        first = plot(single[table], tmp_path / f"a-{table}.png")
        again = plot(single[table], tmp_path / f"b-{table}.png")
        assert_valid_png(first)
        assert first.read_bytes() == again.read_bytes(), table  # no timestamps: same tables, same bytes
    assert_valid_png(plots.plot_site_epsilon(many[SITE_ROUNDS_CSV], tmp_path / "many-eps.png"))
    assert_valid_png(plots.plot_transfer_gain(many[SITES_CSV], tmp_path / "many-gain.png"))
    with pytest.raises(DataError, match=r"site_rounds\.csv: no row of a DP run"):
        plots.plot_site_epsilon([], tmp_path / "none.png")
