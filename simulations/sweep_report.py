"""The sweep's Markdown report: figures, results per configuration and budget, per-site transfer gain, privacy notes."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedtl.shared.errors import DataError
from fedtl.shared.files import atomic_write_bytes
from fedtl.simulations import plots
from fedtl.simulations.sweep_tables import (
    CENTRAL,
    CENTRAL_DP,
    FEDERATED_NONPRIVATE,
    LOCAL,
    MAJORITY,
    RESULTS_CSV,
    ROUNDS_CSV,
    SITE_ROUNDS_CSV,
    SITES_CSV,
    describe_config,
    format_epsilon,
    group_facets,
    is_epsilon_free,
    is_finite_number,
    method_sort_key,
    natural_key,
    read_table,
)

Row = Mapping[str, Any]

REPORT_MD = "report.md"
PLOTS_DIR = "plots"
MAX_SITE_TABLE_ROWS = 60  # per table; rows flagged as negative transfer are always listed
EPSILON_SLACK = 1e-6  # relative: epsilon spent above target * (1 + slack) is flagged as over the target

_KIND = {
    MAJORITY: "baseline, non-private: always the majority training class",
    CENTRAL: "baseline, non-private: pooled data",
    CENTRAL_DP: "baseline: pooled data, DP-SGD at the same ε",
    LOCAL: "baseline: each site alone, DP-SGD at the same ε",
    FEDERATED_NONPRIVATE: "baseline, non-private: federated",
}

# (table, plot function, file name, caption) of every figure, in report order.
_FIGURES = (
    (
        RESULTS_CSV,
        plots.plot_accuracy_vs_epsilon,
        "accuracy_vs_epsilon.png",
        "Accuracy on the sites' own test splits (test-size-weighted mean over sites) against each site's target "
        "sample-level ε, log scale. Lines: mean over seeds; shaded band (or error bar at a single ε): min–max "
        "over seeds. Dashed horizontal lines: non-private references (ε = ∞).",
    ),
    (
        ROUNDS_CSV,
        plots.plot_accuracy_vs_round,
        "accuracy_vs_round.png",
        "Server held-out accuracy of the global model after each round (round 0: the initial model), one colour "
        "per target ε; mean over seeds with a min–max band.",
    ),
    (
        SITE_ROUNDS_CSV,
        plots.plot_site_epsilon,
        "site_epsilon.png",
        "Each site's cumulative sample-level ε after each round in one representative run per target ε "
        "(dashed: the target). With many sites a subset spread over the range of final ε is drawn and a grey "
        "band covers all sites.",
    ),
    (
        SITES_CSV,
        plots.plot_transfer_gain,
        "transfer_gain.png",
        "Per-site transfer gain = federated minus local-only accuracy on the site's test split, in percentage "
        "points; bars: mean over seeds (hatched vermillion: negative transfer); whiskers: ±2 binomial standard "
        "errors of that mean; dots: individual seeds; *: more than 2 standard errors below zero.",
    ),
)

_PRIVACY = """\
**Sample-level ε.** `target ε` is each site's DP-SGD budget (Abadi et al., 2016) for the whole run and
`ε spent` is the largest cumulative ε any site reached (at the run's δ), as each site's own accountant
recorded it. It bounds what the released model reveals about any one *record* of a site.

**Client-level ε** (DP-FedAvg, McMahan et al., 2018), listed only where client-level DP was on, bounds what
the aggregate reveals about a whole *site's* participation. It is a different guarantee over a different
unit of privacy: it is neither comparable with the sample-level ε nor added to it.

**Non-private rows** (target ε = ∞: majority class, central, federated non-private) carry no formal
guarantee and are references only. Central DP-SGD trains on pooled data, so it assumes a trusted curator who
sees every site's records: its ε bounds what the model reveals, not what the curator sees. The local-only
baseline spends the same ε at each site on that site's data alone. Both train as a one-site run of the same
config would: with head-solver "auto", the plan for that one site's example count (public projection, centre
release, full-batch DP-GD with one curator's noise); otherwise DP-SGD on the configured head and schedule.

**Not covered by any ε here:** the accuracies in this report are computed on held-out test data and released
without noise, and picking the best configuration of a sweep is itself a data-dependent choice whose privacy
cost is not accounted (Papernot & Steinke, 2022, "Hyperparameter tuning with Rényi differential privacy")."""


def write_report(out_dir: str | Path, *, spec_text: str, title: str = "fedtl sweep report") -> Path:
    """Read the sweep's four CSVs in `out_dir`, draw the figures into `out_dir/plots/` and write `report.md`.

    Args:
        out_dir: the sweep's output folder, holding results.csv, rounds.csv, site_rounds.csv and sites.csv.
        spec_text: the sweep specification (TOML) as given, quoted in the report.
        title: the report's heading.

    Returns:
        The path of `report.md`.

    Raises:
        DataError: a table is missing or unreadable, or results.csv has no rows.
    """
    out_dir = Path(out_dir)
    tables = {name: read_table(out_dir / name) for name in (RESULTS_CSV, ROUNDS_CSV, SITE_ROUNDS_CSV, SITES_CSV)}
    results = tables[RESULTS_CSV]
    if not results:
        raise DataError(f"{out_dir / RESULTS_CSV} has no rows; the sweep produced no run to report")
    lines = [f"# {title}", "", _summary(results), ""]
    negatives = negative_transfer_lines(tables[SITES_CSV])
    if negatives:
        lines += [f"**Negative transfer** in {len(negatives)} site run(s) (details in the per-site tables):", ""]
        lines += [f"- {line}" for line in negatives] + [""]
    lines += ["## Figures", ""]
    for number, (table, plot, name, caption) in enumerate(_FIGURES, start=1):
        try:
            plot(tables[table], out_dir / PLOTS_DIR / name)
        except DataError as error:  # a table without anything to draw (e.g. no DP run): say so in its place
            lines += [f"*Figure {number} not drawn:* {error}", ""]
            continue
        lines += [f"![Figure {number}]({PLOTS_DIR}/{name})", "", f"*Figure {number}.* {caption}", ""]
    lines += ["## Results", "", *_results_tables(results)]
    lines += ["## Per-site transfer gain", "", *_transfer_tables(tables[SITES_CSV])]
    lines += ["## Privacy", "", _PRIVACY, ""]
    fence = "```"
    while fence in spec_text:
        fence += "`"
    lines += ["## Sweep specification", "", f"{fence}toml", spec_text.rstrip("\n"), fence, ""]
    return atomic_write_bytes(out_dir / REPORT_MD, "\n".join(lines).encode("utf-8"))


def negative_transfer_lines(sites_rows: Sequence[Row]) -> list[str]:
    """Return one line per site run with negative transfer (federated below local-only), for the CLI and report.

    A row is negative when its `negative_transfer` cell says so (or, if that cell is empty, when its
    transfer_gain < 0); the line says whether the gap exceeds 2 binomial standard errors.
    """
    lines = []
    for row in sorted(sites_rows, key=_site_row_key):
        if not _is_negative(row):
            continue
        config = _config_label(row) + f" · ε = {format_epsilon(row.get('target_epsilon'))} · seed {row.get('seed')}"
        lines.append(
            f"NEGATIVE TRANSFER at {row['site']} ({config}): federated {_percent(row.get('federated_accuracy'))} vs "
            f"local-only {_percent(row.get('local_accuracy'))}, gain {_gain(row)} ({_significance(row)})"
        )
    return lines


def _summary(results: Sequence[Row]) -> str:
    """Return the report's opening sentence: what the sweep covered."""
    methods = sorted({row["method"] for row in results}, key=method_sort_key)
    epsilons = sorted({row["target_epsilon"] for row in results if not is_epsilon_free(row)})
    seeds = sorted({row["seed"] for row in results if row.get("seed") is not None})
    configs = group_facets(results, ("backbone", "data", "sites", "partition", "alpha"))
    return (
        f"{len(results)} rows (runs and baselines) over {len(configs)} configuration(s): "
        f"methods {', '.join(methods)}; target ε "
        f"{', '.join(format_epsilon(e) for e in epsilons) or 'none (non-private only)'}; "
        f"{len(seeds)} seed(s). Tables: `{RESULTS_CSV}`, `{ROUNDS_CSV}`, `{SITE_ROUNDS_CSV}`, `{SITES_CSV}` in "
        "this folder."
    )


def _results_tables(results: Sequence[Row]) -> list[str]:
    """Return one Markdown table per (configuration, target epsilon): methods and baselines side by side."""
    lines = [
        "Site accuracy: test-size-weighted mean accuracy on the sites' own test splits of the model each site "
        "ends with (%, mean ± sample standard deviation over seeds, n seeds). Server accuracy: the global "
        "model on the server's held-out split (mean over seeds; — where the method has no global model). "
        "ε spent: the largest cumulative sample-level ε of any site, largest over seeds.",
        "",
    ]
    for facet, rows in group_facets(results, ("backbone", "data", "sites", "partition", "alpha")):
        backbone, data, sites, partition, alpha = facet
        epsilons = sorted({row["target_epsilon"] for row in rows if not is_epsilon_free(row)}) or [math.inf]
        for epsilon in epsilons:
            chosen = [row for row in rows if is_epsilon_free(row) or row["target_epsilon"] == epsilon]
            heading = describe_config(backbone=backbone, data=data, sites=sites, partition=partition, alpha=alpha)
            lines += [f"### {heading} — target ε = {format_epsilon(epsilon)}", ""]
            lines += [
                "| method | kind | site accuracy % | server accuracy % | balanced accuracy % | ε spent | "
                "client-level ε | seconds |",
                "|---|---|---|---|---|---|---|---|",
            ]
            by_method: dict[str, list[Row]] = defaultdict(list)
            for row in chosen:
                by_method[row["method"]].append(row)
            for method in sorted(by_method, key=method_sort_key):
                group = by_method[method]
                cells = [
                    f"**{method}**" if method not in _KIND else method,
                    _KIND.get(method, "non-private" if is_epsilon_free(group[0]) else "federated, DP"),
                    _mean_std_percent([row.get("site_accuracy") for row in group]),
                    _mean_percent([row.get("accuracy") for row in group]),
                    _mean_percent([row.get("balanced_accuracy") for row in group]),
                    _epsilon_spent(group),
                    _largest([row.get("client_epsilon") for row in group]),
                    _mean_number([row.get("seconds") for row in group], digits=1),
                ]
                lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
            lines.append("")
    return lines


def _transfer_tables(sites_rows: Sequence[Row]) -> list[str]:
    """Return one Markdown table per (method, configuration, target epsilon) of per-site gains, negatives flagged."""
    rows = [row for row in sites_rows if is_finite_number(row.get("transfer_gain"))]
    if not rows:
        return ["No per-site transfer gain was recorded (no local-only baseline beside a federated run).", ""]
    lines = [
        "Gain = federated − local-only accuracy on the site's own test split, in percentage points ± one "
        "binomial standard error. Class counts are the site's training labels per class.",
        "",
    ]
    facets = group_facets(rows, ("method", "backbone", "sites", "partition", "target_epsilon"))
    facets.sort(key=lambda item: (method_sort_key(item[0][0]),) + tuple(natural_key(v) for v in item[0][1:]))
    for (method, backbone, sites, partition, epsilon), group in facets:
        heading = describe_config(backbone=backbone, sites=sites, partition=partition)
        lines += [f"### {method} · {heading} — target ε = {format_epsilon(epsilon)}", ""]
        personalized = any(is_finite_number(row.get("personalized_accuracy")) for row in group)
        header = ["site", "seed", "n train", "n test", "class counts (train)", "federated %", "local only %"]
        header += ["personalized %"] if personalized else []
        header += ["gain (pp) ± SE", "transfer"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        ordered = sorted(group, key=_site_row_key)
        flagged = [row for row in ordered if _is_negative(row)]
        shown = {id(row) for row in flagged}
        for row in ordered:
            if len(shown) >= MAX_SITE_TABLE_ROWS:
                break
            shown.add(id(row))
        for row in ordered:
            if id(row) not in shown:
                continue
            cells = [
                row["site"],
                row.get("seed"),
                row.get("n_train"),
                row.get("n_test"),
                _class_counts(row.get("class_counts")),
                _percent(row.get("federated_accuracy"), unit=""),
                _percent(row.get("local_accuracy"), unit=""),
            ]
            cells += [_percent(row.get("personalized_accuracy"), unit="")] if personalized else []
            flag = f"**NEGATIVE TRANSFER** ({_significance(row)})" if _is_negative(row) else "positive"
            cells += [_gain(row, unit=""), flag]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        if len(shown) < len(ordered):
            lines.append("")
            lines.append(f"{len(ordered) - len(shown)} more site runs with positive gain are in `{SITES_CSV}`.")
        lines.append("")
    return lines


def _is_negative(row: Row) -> bool:
    """Return whether a sites row shows negative transfer (its flag, or its gain when the flag is empty)."""
    flag = row.get("negative_transfer")
    if flag is not None:
        return bool(flag)
    return is_finite_number(row.get("transfer_gain")) and row["transfer_gain"] < 0


def _significance(row: Row) -> str:
    """Return whether a gain lies more than 2 standard errors below zero, in words."""
    gain, stderr = row.get("transfer_gain"), row.get("gain_stderr")
    if not is_finite_number(gain) or not is_finite_number(stderr):
        return "no standard error recorded"
    if stderr > 0 and gain < -2 * stderr:
        return f"beyond 2 SE: {abs(gain) / stderr:.1f} SE"
    return "within 2 SE" if stderr > 0 else "standard error 0"


def _gain(row: Row, unit: str = " pp") -> str:
    """Return a gain as '-7.0 ± 2.0 pp'."""
    gain, stderr = row.get("transfer_gain"), row.get("gain_stderr")
    if not is_finite_number(gain):
        return "—"
    text = f"{gain * 100:+.1f}"
    return text + (f" ± {stderr * 100:.1f}" if is_finite_number(stderr) else "") + unit


def _config_label(row: Row) -> str:
    """Return 'fedavg · tiny · 3 sites · iid' for a row."""
    facet = describe_config(backbone=row.get("backbone"), sites=row.get("sites"), partition=row.get("partition"))
    return f"{row['method']} · {facet}"


def _site_row_key(row: Row) -> tuple:
    """Return the sort key of a sites row: method, configuration, epsilon, site, seed."""
    return (
        method_sort_key(row["method"]),
        natural_key(row.get("backbone")),
        natural_key(row.get("sites")),
        natural_key(row.get("partition")),
        natural_key(row.get("target_epsilon")),
        natural_key(row.get("site")),
        natural_key(row.get("seed")),
    )


def _epsilon_spent(group: Sequence[Row]) -> str:
    """Return the largest epsilon spent over seeds, flagged when it exceeds the target."""
    if is_epsilon_free(group[0]):  # whatever a non-private baseline recorded (0 for majority), it has no guarantee
        return "— (non-private)"
    spent = [row["epsilon_spent"] for row in group if is_finite_number(row.get("epsilon_spent"))]
    if not spent:
        return "—"
    largest = max(spent)
    target = group[0].get("target_epsilon")
    text = f"{largest:.3g}"
    if is_finite_number(target) and largest > target * (1 + EPSILON_SLACK):
        text += " **OVER TARGET**"
    return text


def _mean_std_percent(values: Sequence[Any]) -> str:
    """Return '91.2 ± 0.4 (n=2)' for accuracies (fractions) over seeds; '—' when none is known."""
    finite = [v for v in values if is_finite_number(v)]
    if not finite:
        return "—"
    mean = float(np.mean(finite)) * 100
    if len(finite) == 1:
        return f"{mean:.1f} (n=1)"
    return f"{mean:.1f} ± {float(np.std(finite, ddof=1)) * 100:.1f} (n={len(finite)})"


def _mean_percent(values: Sequence[Any]) -> str:
    """Return the mean of accuracies (fractions) as a percentage; '—' when none is known."""
    finite = [v for v in values if is_finite_number(v)]
    return f"{float(np.mean(finite)) * 100:.1f}" if finite else "—"


def _mean_number(values: Sequence[Any], *, digits: int) -> str:
    """Return the mean of numbers with `digits` decimals; '—' when none is known."""
    finite = [v for v in values if is_finite_number(v)]
    return f"{float(np.mean(finite)):.{digits}f}" if finite else "—"


def _largest(values: Sequence[Any]) -> str:
    """Return the largest known number to 3 significant digits; '—' when none is known."""
    finite = [v for v in values if is_finite_number(v)]
    return f"{max(finite):.3g}" if finite else "—"


def _percent(value: Any, unit: str = "%") -> str:
    """Return an accuracy (fraction) as a percentage with one decimal."""
    return f"{value * 100:.1f}{unit}" if is_finite_number(value) else "—"


def _class_counts(counts: Any) -> str:
    """Return class counts as '[12, 30, 5]', shortened past 12 classes."""
    if not counts:
        return "—"
    shown = ", ".join(str(c) for c in counts[:12])
    return f"[{shown}{', …' if len(counts) > 12 else ''}] ({sum(counts)} total)" if len(counts) > 12 else f"[{shown}]"


def _cell(value: Any) -> str:
    """Return a Markdown table cell: pipes escaped, None as '—'."""
    return "—" if value is None else str(value).replace("|", "\\|").replace("\n", " ")
