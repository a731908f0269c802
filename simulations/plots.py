"""Sweep figures for papers: accuracy vs epsilon, accuracy vs round, per-site epsilon, per-site transfer gain.

Every function takes rows as `sweep_tables.read_table` returns them, writes one PNG and returns its path.
Figures are drawn on matplotlib's Agg canvas without pyplot (no global state, no display needed) and saved
without a software/date stamp, so the same tables give byte-identical files.
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter, PercentFormatter

from fedtl.shared.errors import DataError
from fedtl.shared.files import atomic_write_bytes
from fedtl.simulations import sweep_tables as tables

Row = Mapping[str, Any]

MAX_PANELS = 24  # beyond this a figure stops being readable; the title says how many were left out
MAX_SITE_LINES = 10  # per-site epsilon lines drawn per panel; the rest are summarised by a min-max band
MAX_LABELLED_SITES = 30  # above this the transfer-gain bars are sorted by gain and lose their tick labels
DPI = 150

# Okabe & Ito's colour-blind-safe palette (https://jfly.uni-koeln.de/color/), one fixed colour and marker
# per method so a method looks the same in every figure of every report.
_METHOD_STYLE = {
    "fedavg": ("#0072B2", "o"),
    "fedprox": ("#009E73", "s"),
    "fedadam": ("#CC79A7", "^"),
    "fedper": ("#56B4E9", "D"),
    "finetune": ("#A08800", "v"),
    tables.CENTRAL_DP: ("#D55E00", "P"),
    tables.LOCAL: ("#E69F00", "X"),
}
# Epsilon-free baselines are horizontal lines: colour and dash pattern.
_BASELINE_STYLE = {
    tables.CENTRAL: ("#000000", "--"),
    tables.FEDERATED_NONPRIVATE: ("#0072B2", (0, (6, 2, 1, 2))),
    tables.MAJORITY: ("#7F7F7F", ":"),
}
_BASELINE_LABEL = {
    tables.CENTRAL: "central (non-private)",
    tables.FEDERATED_NONPRIVATE: "federated (non-private)",
    tables.MAJORITY: "majority class",
}
_FALLBACK_COLOURS = ("#332288", "#117733", "#882255", "#44AA99", "#999933", "#AA4499")
_POSITIVE = "#0072B2"
_NEGATIVE = "#D55E00"

_STYLE = {
    "font.family": "DejaVu Sans",
    "font.size": 10,
    "axes.titlesize": 10,
    "axes.labelsize": 10,
    "figure.titlesize": 12,
    "figure.labelsize": 10,
    "legend.fontsize": 9,
    "legend.title_fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "legend.frameon": False,
    "lines.linewidth": 1.6,
    "lines.markersize": 5,
}


def plot_accuracy_vs_epsilon(results: Sequence[Row], out_png: str | Path) -> Path:
    """Plot site accuracy against target epsilon (log x), one line per method, one panel per configuration.

    Lines are means over seeds with a min-max band; epsilon-free baselines (majority, central,
    federated non-private) are horizontal dashed lines.

    Raises:
        DataError: no row of `results` has a site_accuracy.
    """
    rows = _rows_with(results, "site_accuracy", tables.RESULTS_CSV, hint="did every run fail?")
    facets = tables.group_facets(rows, ("backbone", "data", "sites", "partition", "alpha"))
    show_data = len({row.get("data") for row in rows}) > 1
    seeds_per_point = set()
    with matplotlib.rc_context(_STYLE):
        fig, axes, note = _panel_grid(len(facets), sharey=True)
        legend: dict[str, Any] = {}
        for ax, (facet, facet_rows) in zip(axes, facets):
            backbone, data, sites, partition, alpha = facet
            ax.set_title(
                tables.describe_config(
                    backbone=backbone, data=data if show_data else None, sites=sites, partition=partition, alpha=alpha
                )
            )
            curves: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
            flat: dict[str, list[float]] = defaultdict(list)
            for row in facet_rows:
                if tables.is_epsilon_free(row):
                    flat[row["method"]].append(row["site_accuracy"])
                else:
                    curves[row["method"]][row["target_epsilon"]].append(row["site_accuracy"])
            epsilons = sorted({eps for by_eps in curves.values() for eps in by_eps})
            for method in sorted(curves, key=tables.method_sort_key):
                colour, marker = _method_style(method)
                xs = sorted(curves[method])
                values = [curves[method][x] for x in xs]
                seeds_per_point.update(len(v) for v in values)
                mean, low, high = (np.array([f(v) for v in values]) for f in (np.mean, np.min, np.max))
                (line,) = ax.plot(xs, mean, color=colour, marker=marker, label=_method_label(method))
                if len(xs) > 1:
                    ax.fill_between(xs, low, high, color=colour, alpha=0.18, linewidth=0)
                else:  # a band over one x is invisible: draw the same min-max as an error bar
                    ax.errorbar(xs, mean, yerr=[mean - low, high - mean], color=colour, capsize=3, linewidth=1)
                legend.setdefault(line.get_label(), line)
            for method in sorted(flat, key=tables.method_sort_key):
                colour, dashes = _BASELINE_STYLE.get(method, (_method_style(method)[0], "--"))
                seeds_per_point.add(len(flat[method]))
                line = ax.axhline(
                    float(np.mean(flat[method])),
                    color=colour,
                    linestyle=dashes,
                    linewidth=1.3,
                    label=_flat_label(method),
                )
                legend.setdefault(line.get_label(), line)
            ax.set_xscale("log")
            if epsilons:
                ax.set_xlim(min(epsilons) / 1.5, max(epsilons) * 1.5)
                ax.set_xticks(epsilons)
            else:
                ax.set_xlim(0.1, 10.0)
                ax.text(0.5, 0.5, "no DP runs", transform=ax.transAxes, ha="center", color="#7F7F7F")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
        _label_bottom_axes(axes, "target ε per site (sample-level, log scale)")
        fig.supylabel("accuracy on the sites' test splits\n(test-size-weighted mean over sites)")
        fig.suptitle(f"Accuracy vs privacy budget ({_seed_count(seeds_per_point)}){note}")
        _figure_legend(fig, legend, title="line: mean over seeds; band (or bar at a single ε): min–max over seeds")
        return _save(fig, out_png)


def plot_accuracy_vs_round(rounds: Sequence[Row], out_png: str | Path) -> Path:
    """Plot server held-out accuracy against round, one panel per (configuration, method), one line per epsilon.

    Raises:
        DataError: no row of `rounds` has an accuracy.
    """
    rows = _rows_with(rounds, "accuracy", tables.ROUNDS_CSV, hint="was central evaluation off?")
    panels = []
    for facet, facet_rows in tables.group_facets(rows, ("backbone", "sites", "partition")):
        for method in sorted({row["method"] for row in facet_rows}, key=tables.method_sort_key):
            panels.append((facet, method, [row for row in facet_rows if row["method"] == method]))
    epsilon_colour = _epsilon_colours(rows)
    seeds_per_point = set()
    with matplotlib.rc_context(_STYLE):
        fig, axes, note = _panel_grid(len(panels), sharey=True)
        legend: dict[str, Any] = {}
        for ax, (facet, method, panel_rows) in zip(axes, panels):
            backbone, sites, partition = facet
            config = tables.describe_config(backbone=backbone, sites=sites, partition=partition)
            ax.set_title(f"{_method_label(method)}\n{config}")
            by_epsilon: dict[float, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
            for row in panel_rows:
                by_epsilon[_epsilon_key(row)][row["round"]].append(row["accuracy"])
            for epsilon in sorted(by_epsilon):
                xs = sorted(by_epsilon[epsilon])
                values = [by_epsilon[epsilon][x] for x in xs]
                seeds_per_point.update(len(v) for v in values)
                mean, low, high = (np.array([f(v) for v in values]) for f in (np.mean, np.min, np.max))
                colour = epsilon_colour[epsilon]
                dashes = "--" if math.isinf(epsilon) else "-"
                (line,) = ax.plot(
                    xs, mean, color=colour, linestyle=dashes, marker="o", markersize=3, label=_eps_label(epsilon)
                )
                if len(xs) > 1:
                    ax.fill_between(xs, low, high, color=colour, alpha=0.15, linewidth=0)
                else:
                    ax.errorbar(xs, mean, yerr=[mean - low, high - mean], color=colour, capsize=3, linewidth=1)
                legend.setdefault(line.get_label(), line)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
        _label_bottom_axes(axes, "round (0 = initial model)")
        fig.supylabel("server held-out accuracy")
        fig.suptitle(f"Accuracy over rounds ({_seed_count(seeds_per_point)}){note}")
        ordered = dict(sorted(legend.items(), key=lambda item: _legend_epsilon(item[0])))
        _figure_legend(fig, ordered, title="target ε (line: mean over seeds; band: min–max over seeds)")
        return _save(fig, out_png)


def plot_site_epsilon(site_rounds: Sequence[Row], out_png: str | Path) -> Path:
    """Plot each site's cumulative sample-level epsilon against round, one panel per target epsilon.

    Each panel shows one representative run (the first federated method, lowest seed) with its target
    as a dashed line; with more than MAX_SITE_LINES sites, sites spread over the range of final epsilon
    are drawn and a grey band shows all sites' min-max (the title says so).

    Raises:
        DataError: no row has a finite target epsilon and an epsilon.
    """
    rows = [
        row for row in site_rounds if not tables.is_epsilon_free(row) and tables.is_finite_number(row.get("epsilon"))
    ]
    if not rows:
        raise DataError("site_rounds.csv: no row of a DP run (finite target_epsilon) has an `epsilon`; nothing to plot")
    by_epsilon: dict[float, list[Row]] = defaultdict(list)
    for row in rows:
        by_epsilon[row["target_epsilon"]].append(row)
    panels = []
    for target in sorted(by_epsilon):
        run = min(
            {_run_identity(row) for row in by_epsilon[target]},
            key=lambda ident: (
                (tables.method_sort_key(ident[1]),) + tuple(tables.natural_key(v) for v in ident[2:]) + (ident[0],)
            ),
        )
        panels.append((target, run, [row for row in by_epsilon[target] if _run_identity(row) == run]))
    with matplotlib.rc_context(_STYLE):
        fig, axes, note = _panel_grid(len(panels), sharey=False)
        for ax, (target, run, run_rows) in zip(axes, panels):
            _, method, backbone, sites, partition, seed = run
            curves: dict[str, dict[int, float]] = defaultdict(dict)
            for row in run_rows:
                curves[row["site"]][row["round"]] = row["epsilon"]
            names = sorted(curves, key=tables.natural_key)
            final = {name: curves[name][max(curves[name])] for name in names}
            drawn = names
            config = tables.describe_config(backbone=backbone, sites=sites, partition=partition)
            subtitle = f"{_method_label(method)} · {config} · seed {seed}"
            if len(names) > MAX_SITE_LINES:
                # Spread the drawn sites over the ranking of final epsilon (lowest and highest included).
                ranked = sorted(names, key=lambda name: (final[name], tables.natural_key(name)))
                picks = np.unique(np.linspace(0, len(ranked) - 1, MAX_SITE_LINES).round().astype(int))
                drawn = sorted((ranked[i] for i in picks), key=tables.natural_key)
                all_rounds = sorted({r for name in names for r in curves[name]})
                low = [min(curves[n][r] for n in names if r in curves[n]) for r in all_rounds]
                high = [max(curves[n][r] for n in names if r in curves[n]) for r in all_rounds]
                ax.fill_between(
                    all_rounds, low, high, color="#7F7F7F", alpha=0.2, linewidth=0, label="all sites: min–max"
                )
                subtitle += f"\n{len(drawn)} of {len(names)} sites drawn; grey band: all sites"
            palette = matplotlib.colormaps["tab10"]
            for index, name in enumerate(drawn):
                xs = sorted(curves[name])
                ax.plot(
                    xs,
                    [curves[name][x] for x in xs],
                    color=palette(index % 10),
                    marker="o",
                    markersize=3,
                    label=str(name),
                )
            ax.axhline(target, color="black", linestyle="--", linewidth=1.2, label="target ε")
            top = max(target, max(final.values()), max(max(c.values()) for c in curves.values()))
            ax.set_ylim(0, top * 1.1)
            ax.set_title(f"target ε = {tables.format_epsilon(target)}\n{subtitle}")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend(loc="lower right", fontsize=8, ncols=2 if len(drawn) > 5 else 1)
        _label_bottom_axes(axes, "round")
        fig.supylabel("cumulative sample-level ε of each site")
        fig.suptitle(f"Privacy spent per site (one representative run per target ε){note}")
        return _save(fig, out_png)


def plot_transfer_gain(sites: Sequence[Row], out_png: str | Path) -> Path:
    """Plot each site's transfer gain (federated minus local-only accuracy), mean over seeds, negatives highlighted.

    One panel per (method, configuration, target epsilon); whiskers are +-2 binomial standard errors of the
    mean over seeds, dots the individual seeds, '*' marks a mean more than 2 standard errors below zero.

    Raises:
        DataError: no row of `sites` has a transfer_gain.
    """
    rows = _rows_with(sites, "transfer_gain", tables.SITES_CSV, hint="was the local-only baseline run?")
    panels = []
    for facet, facet_rows in tables.group_facets(rows, ("method", "backbone", "sites", "partition", "target_epsilon")):
        panels.append((facet, facet_rows))
    panels.sort(
        key=lambda panel: (tables.method_sort_key(panel[0][0]),) + tuple(tables.natural_key(v) for v in panel[0][1:])
    )
    with matplotlib.rc_context(_STYLE):
        fig, axes, note = _panel_grid(len(panels), sharey=True, width=5.0)
        for ax, ((method, backbone, n_sites, partition, target), panel_rows) in zip(axes, panels):
            gains: dict[str, list[float]] = defaultdict(list)
            stderrs: dict[str, list[float | None]] = defaultdict(list)
            for row in panel_rows:
                gains[row["site"]].append(row["transfer_gain"])
                stderrs[row["site"]].append(row.get("gain_stderr"))
            names = sorted(gains, key=tables.natural_key)
            mean = {name: float(np.mean(gains[name])) for name in names}
            if len(names) > MAX_LABELLED_SITES:
                names = sorted(names, key=lambda name: (mean[name], tables.natural_key(name)))
            xs = np.arange(len(names))
            heights = np.array([mean[name] for name in names])
            errors = np.array([_mean_stderr(stderrs[name]) for name in names])  # nan where a stderr is missing
            negative = heights < 0
            ax.bar(
                xs,
                heights,
                color=[_NEGATIVE if neg else _POSITIVE for neg in negative],
                hatch=["///" if neg else "" for neg in negative],
                edgecolor="white",
                linewidth=0.5,
                width=0.7,
            )
            has_error = np.isfinite(errors)
            if has_error.any():
                ax.errorbar(
                    xs[has_error],
                    heights[has_error],
                    yerr=2 * errors[has_error],
                    fmt="none",
                    color="black",
                    capsize=3 if len(names) <= MAX_LABELLED_SITES else 0,
                    linewidth=1 if len(names) <= MAX_LABELLED_SITES else 0.6,
                )
            for x, name in zip(xs, names):
                ax.plot(np.full(len(gains[name]), x), gains[name], "o", color="black", markersize=2.5, alpha=0.6)
            significant = negative & has_error & (heights + 2 * np.nan_to_num(errors) < 0)
            for x, name in zip(xs[significant], np.array(names, dtype=object)[significant]):
                lowest = min(mean[name] - 2 * _mean_stderr(stderrs[name]), min(gains[name]))
                ax.annotate(
                    "*",
                    (x, lowest),
                    xytext=(0, -4),
                    textcoords="offset points",
                    ha="center",
                    va="top",
                    fontsize=12,
                )
            ax.axhline(0, color="black", linewidth=0.8)
            ax.grid(axis="x", visible=False)
            if len(names) > MAX_LABELLED_SITES:
                ax.set_xticks([])
                ax.set_xlabel(f"{len(names)} sites, sorted by gain")  # every panel: its own site count
            else:
                ax.set_xticks(
                    xs,
                    [str(name) for name in names],
                    rotation=45 if len(names) > 6 else 0,
                    ha="right" if len(names) > 6 else "center",
                )
            ax.yaxis.set_major_formatter(FuncFormatter(_format_points))
            title = f"{_method_label(method)} · ε = {tables.format_epsilon(target)}\n"
            title += tables.describe_config(backbone=backbone, sites=n_sites, partition=partition)
            ax.set_title(title + f" · {int(negative.sum())} negative")
        fig.supylabel("transfer gain: federated − local-only\naccuracy (percentage points)")
        fig.suptitle(f"Per-site transfer gain{note}")
        handles = {
            "positive transfer": Patch(facecolor=_POSITIVE),
            "negative transfer": Patch(facecolor=_NEGATIVE, hatch="///", edgecolor="white"),
            "one seed": Line2D([], [], marker="o", linestyle="none", color="black", markersize=3, alpha=0.6),
            "±2 SE (binomial)": Line2D([], [], marker="|", linestyle="none", color="black", markersize=10),
            "mean gain < −2 SE": Line2D([], [], marker="$*$", linestyle="none", color="black", markersize=8),
        }
        _figure_legend(fig, handles, title="bar: mean over seeds")
        return _save(fig, out_png)


def _panel_grid(count: int, *, sharey: bool, width: float = 4.2, height: float = 3.4) -> tuple[Figure, list, str]:
    """Return a constrained-layout figure with a grid of `count` panels (capped at MAX_PANELS) and a title note."""
    note = ""
    if count > MAX_PANELS:
        note = f"\n(first {MAX_PANELS} of {count} panels shown; all data are in the CSV)"
        count = MAX_PANELS
    ncols = min(count, 3)
    nrows = math.ceil(count / ncols)
    fig = Figure(figsize=(width * ncols + 0.8, height * nrows + 1.8), dpi=DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, sharey=sharey, squeeze=False).ravel().tolist()
    for ax in axes[count:]:
        ax.set_visible(False)
    if sharey:
        for ax in axes[:count]:
            ax.yaxis.set_tick_params(labelleft=True)
    return fig, axes[:count], note


def _label_bottom_axes(axes: Sequence[Any], label: str) -> None:
    """Label the x axis of the lowest visible panel of each column (a figure-wide label collides with the legend)."""
    for index, ax in enumerate(axes):
        if index + ax.get_subplotspec().get_gridspec().ncols >= len(axes):
            ax.set_xlabel(label)


def _figure_legend(fig: Figure, handles: Mapping[str, Any], *, title: str) -> None:
    """Put one legend for the whole figure below the panels (clear of the titles), as many columns as fit."""
    if handles:
        ncols = max(1, min(len(handles), int(fig.get_figwidth() / 2.4)))  # about 2.4 inches per entry
        fig.legend(list(handles.values()), list(handles.keys()), loc="outside lower center", ncols=ncols, title=title)


def _save(fig: Figure, out_png: str | Path) -> Path:
    """Write the figure as a PNG without software/date metadata (so identical tables give identical bytes)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None}, facecolor="white")
    return atomic_write_bytes(out_png, buffer.getvalue())


def _method_style(method: str) -> tuple[str, str]:
    """Return the (colour, marker) of a method: fixed for known methods, a stable fallback for others."""
    if method in _METHOD_STYLE:
        return _METHOD_STYLE[method]
    return _FALLBACK_COLOURS[sum(map(ord, method)) % len(_FALLBACK_COLOURS)], "o"


def _rows_with(rows: Sequence[Row], column: str, table: str, *, hint: str) -> list[Row]:
    """Return the rows whose `column` is a finite number; DataError naming the table and a likely cause if none is."""
    kept = [row for row in rows if tables.is_finite_number(row.get(column))]
    if not kept:
        raise DataError(f"{table}: no row has a value in `{column}`; nothing to plot ({hint})")
    return kept


def _method_label(method: str) -> str:
    """Return the legend label of a method of the DP runs."""
    return {tables.CENTRAL_DP: "central DP-SGD (pooled)", tables.LOCAL: "local only (each site alone)"}.get(
        method, method
    )


def _flat_label(method: str) -> str:
    """Return the legend label of an epsilon-free line."""
    return _BASELINE_LABEL.get(method, f"{method} (non-private)")


def _epsilon_key(row: Row) -> float:
    """Return a row's target epsilon with empty/nan read as inf (non-private)."""
    return math.inf if tables.is_epsilon_free(row) else float(row["target_epsilon"])


def _epsilon_colours(rows: Sequence[Row]) -> dict[float, Any]:
    """Map each target epsilon to a colour: a sequential scale from small (dark) to large, black for non-private."""
    finite = sorted({_epsilon_key(row) for row in rows} - {math.inf})
    colours: dict[float, Any] = {math.inf: "#000000"}
    scale = matplotlib.colormaps["viridis"]
    for index, epsilon in enumerate(finite):
        colours[epsilon] = scale(0.85 * index / max(len(finite) - 1, 1))  # the top of viridis is too pale on white
    return colours


def _eps_label(epsilon: float) -> str:
    """Return the legend label of a target epsilon."""
    return "∞ (non-private)" if math.isinf(epsilon) else f"{epsilon:g}"


def _legend_epsilon(label: str) -> float:
    """Return the epsilon of a legend label made by _eps_label (for ordering)."""
    return math.inf if label.startswith("∞") else float(label)


def _run_identity(row: Row) -> tuple:
    """Return the fields that identify one run of a site_rounds row."""
    return (row["run"], row["method"], row.get("backbone"), row.get("sites"), row.get("partition"), row.get("seed"))


def _mean_stderr(stderrs: Sequence[float | None]) -> float:
    """Return the standard error of a mean of independent estimates, sqrt(sum se^2) / n (nan if any is missing)."""
    if not stderrs or any(not tables.is_finite_number(se) for se in stderrs):
        return math.nan
    return math.sqrt(sum(se * se for se in stderrs)) / len(stderrs)


def _format_points(value: float, _: Any) -> str:
    """Return an accuracy difference as signed percentage points ('+5', '-2.5', '0')."""
    points = value * 100
    return "0" if abs(points) < 1e-9 else f"{points:+g}".replace("-", "\N{MINUS SIGN}")


def _seed_count(counts: set[int]) -> str:
    """Return 'n = 3 seeds per point' or 'n = 1–3 seeds per point'."""
    low, high = min(counts, default=0), max(counts, default=0)
    span = str(low) if low == high else f"{low}–{high}"
    return f"n = {span} seed{'s' if high != 1 else ''} per point"
