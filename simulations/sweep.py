"""`fedtl sweep`: a grid of federations (epsilon x sites x partition x seed x method x backbone) and its baselines.

A small TOML spec names the grid; every cell is one federation run through the SAME ServerApp and
ClientApp as `fedtl simulate` (in-process by default, Flower's engine on request). Simulated sites
keep their feature caches across the sweep, so a site partition's features are extracted once and
reused by every run on it. The sweep ends in four tables (results, rounds, site_rounds, sites), the
plots and a Markdown report (simulations/sweep_report.py).

Spec (TOML):

    name = "digits-epsilon"
    data = "digits"                     # or a MedMNIST .npz, an image folder, a CSV manifest
    backbones = ["efficientnet_lite0"]
    epsilons = [1.0, 4.0, 8.0]
    sites = [5]
    partitions = ["iid"]                # iid, dirichlet:A, quantity:A, classes:K, natural
    alphas = [0.1, 1.0]                 # shorthand: adds dirichlet:A for each
    seeds = [0, 1, 2]
    methods = ["fedavg"]                # fedavg, fedprox, fedadam, fedper, finetune, closed-form, secagg, secagg-tT
    baselines = ["majority", "central", "central-dp", "local", "federated-nonprivate"]  # default: all
    executor = "inprocess"              # or "flower" (Flower's simulation engine, Ray)
    [config]                            # any run-config key, for every run
    num-rounds = 5
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import re
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtl.server.model_file import load_model
from fedtl.shared import constants as k
from fedtl.shared.config import RunConfig
from fedtl.shared.errors import ConfigError
from fedtl.shared.metrics import majority_rate
from fedtl.shared.partitioners import parse_partition
from fedtl.simulations import baselines as bl
from fedtl.simulations.engine import simulate
from fedtl.simulations.inprocess import run_inprocess
from fedtl.simulations.sweep_report import negative_transfer_lines, write_report
from fedtl.simulations.sweep_tables import (
    RESULTS_COLUMNS,
    ROUNDS_COLUMNS,
    SITE_ROUNDS_COLUMNS,
    SITES_COLUMNS,
    read_table,
    write_table,
)

log = logging.getLogger(__name__)
progress = logging.getLogger("fedtl.progress")

# method -> the run-config keys it sets
METHODS: dict[str, dict[str, Any]] = {
    "fedavg": {"strategy": "fedavg"},
    "fedprox": {"strategy": "fedprox"},
    "fedadam": {"strategy": "fedadam"},
    "fedper": {"strategy": "fedavg", "personalization": k.FEDPER},
    "finetune": {"strategy": "fedavg", "personalization": k.FINETUNE},
    "closed-form": {"strategy": "fedavg", "head-solver": "closed-form"},
    # Secure aggregation with distributed noise, every site assuming all summed sites honest; `secagg-tT` assumes
    # T honest sites instead: sweeping T shows the price of distrust (each site adds 1/T of the noise).
    "secagg": {"strategy": "fedavg", "head-solver": "closed-form", "secure-aggregation": True},
}
SECAGG_METHOD = re.compile(r"secagg-t([1-9][0-9]*)")


def method_keys(method: str) -> dict[str, Any]:
    """Return the run-config keys of `method`: a METHODS entry, or `secagg-tT` (secure aggregation assuming T honest).

    Raises:
        ConfigError: an unknown method.
    """
    if method in METHODS:
        return METHODS[method]
    match = SECAGG_METHOD.fullmatch(method)
    if match:
        return {**METHODS["secagg"], "secagg-honest-sites": int(match.group(1))}
    raise ConfigError(f"unknown method {method!r}; methods: {', '.join(METHODS)}, secagg-tT (T honest sites)")


EXECUTORS = ("inprocess", "flower")
# Keys the grid sets per run; in [config] they would be silently overridden.
GRID_KEYS = ("backbone", "partition", "seed", "target-epsilon", "data", "non-private", "strategy", "personalization")


@dataclass(frozen=True)
class SweepSpec:
    """A sweep: the grid's axes, the baselines, the executor and the run config shared by every run."""

    name: str
    data: str
    backbones: tuple[str, ...]
    epsilons: tuple[float, ...]
    sites: tuple[int, ...]
    partitions: tuple[str, ...]
    seeds: tuple[int, ...]
    methods: tuple[str, ...]
    baselines: tuple[str, ...] = bl.BASELINES
    executor: str = "inprocess"
    config: dict[str, Any] = field(default_factory=dict)

    def run_config(self, **values: Any) -> RunConfig:
        """Return the run config of one cell (kebab-case `values` over `config`)."""
        return RunConfig.from_mapping({**self.config, "data": self.data, **values})

    @property
    def num_runs(self) -> int:
        cells = len(self.backbones) * len(self.sites) * len(self.partitions) * len(self.seeds)
        nonprivate = int(bl.FEDERATED_NONPRIVATE in self.baselines)
        return cells * (len(self.epsilons) * len(self.methods) + nonprivate)


SPEC_KEYS = {
    "name", "data", "backbones", "backbone", "epsilons", "sites", "partitions", "alphas", "seeds", "methods",
    "baselines", "executor", "config",
}  # fmt: skip


def parse_spec(text: str, *, source: str = "sweep spec") -> SweepSpec:
    """Parse and validate a sweep spec (TOML text).

    Raises:
        ConfigError: unknown keys (the nearest known key is suggested), empty or ill-typed axes, unknown
            methods/baselines/executor, a run-config key in [config] that the grid sets, or a bad run config.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source} is not valid TOML: {exc}") from None
    for key in raw:
        if key not in SPEC_KEYS:
            close = difflib.get_close_matches(key, SPEC_KEYS, n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            raise ConfigError(f"{source}: unknown key `{key}`{hint or '.'} Known keys: {', '.join(sorted(SPEC_KEYS))}")
    backbones = raw.get("backbones", [raw["backbone"]] if "backbone" in raw else ["efficientnet_lite0"])
    partitions = list(_axis(raw, "partitions", str, source, default=[] if "alphas" in raw else ["iid"]))
    partitions += [f"dirichlet:{a:g}" for a in _axis(raw, "alphas", (int, float), source, default=[])]
    config = raw.get("config", {})
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: [config] must be a table of run-config keys, got {config!r}")
    for key in config:
        if key in GRID_KEYS:
            raise ConfigError(
                f"{source}: [config] sets `{key}`, which the sweep grid sets per run; use the spec's own keys "
                "(backbones, partitions/alphas, seeds, epsilons, data, methods)"
            )
    spec = SweepSpec(
        name=str(raw.get("name", "sweep")),
        data=str(raw.get("data", "digits")),
        backbones=tuple(_axis({"backbones": backbones}, "backbones", str, source)),
        epsilons=tuple(float(e) for e in _axis(raw, "epsilons", (int, float), source)),
        sites=tuple(_axis(raw, "sites", int, source, default=[5])),
        partitions=tuple(partitions),
        seeds=tuple(_axis(raw, "seeds", int, source, default=[0])),
        methods=tuple(_axis(raw, "methods", str, source, default=["fedavg"])),
        baselines=tuple(_axis(raw, "baselines", str, source, default=list(bl.BASELINES), allow_empty=True)),
        executor=str(raw.get("executor", "inprocess")),
        config=dict(config),
    )
    _check_spec(spec, source)
    return spec


def _axis(raw: dict, key: str, kind: Any, source: str, *, default: list | None = None, allow_empty: bool = False):
    values = raw.get(key, default)
    if values is None:
        raise ConfigError(f"{source}: `{key}` is required, e.g. {key} = [1.0, 4.0, 8.0]")
    if not isinstance(values, list) or (not values and not allow_empty and default != []):
        raise ConfigError(f"{source}: `{key}` must be a non-empty list, got {values!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, kind):
            raise ConfigError(
                f"{source}: every value of `{key}` must be {getattr(kind, '__name__', 'a number')}, got {v!r}"
            )
    if len(set(values)) != len(values):
        raise ConfigError(f"{source}: `{key}` lists a value twice: {values!r}")
    return values


def _check_spec(spec: SweepSpec, source: str) -> None:
    for name in spec.methods:
        try:
            method_keys(name)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    for name in spec.baselines:
        if name not in bl.BASELINES:
            raise ConfigError(f"{source}: unknown baseline {name!r}; baselines: {', '.join(bl.BASELINES)}")
    if spec.executor not in EXECUTORS:
        raise ConfigError(f"{source}: `executor` must be one of {', '.join(EXECUTORS)}, got {spec.executor!r}")
    if not spec.partitions:
        raise ConfigError(f"{source}: give `partitions` and/or `alphas`")
    for eps in spec.epsilons:
        if not (math.isfinite(eps) and eps > 0):
            raise ConfigError(f"{source}: every epsilon must be a finite number > 0, got {eps}")
    for n in spec.sites:
        if n < 1:
            raise ConfigError(f"{source}: every `sites` value must be >= 1, got {n}")
    for partition in spec.partitions:
        parse_partition(partition)
    # Every run config of the grid must be valid before the first run starts.
    for method in spec.methods:
        for backbone in spec.backbones:
            spec.run_config(backbone=backbone, **method_keys(method))


@dataclass
class SweepTables:
    """The rows of the four output tables."""

    results: list[dict[str, Any]] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    site_rounds: list[dict[str, Any]] = field(default_factory=list)
    sites: list[dict[str, Any]] = field(default_factory=list)


def run_sweep(spec: SweepSpec, out_dir: Path, *, spec_text: str = "") -> Path:
    """Run every cell of the sweep and its baselines; write the tables, plots and report; return report.md.

    The folder holds runs/ (one folder per federation), the four CSV tables, the plots and report.md.
    Tables are rewritten after every cell, so a stopped sweep keeps what it finished.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "spec.toml").write_text(spec_text or "")
    tables = SweepTables()
    started = time.time()
    done = 0
    for backbone in spec.backbones:
        for num_sites in spec.sites:
            for partition in spec.partitions:
                for seed in spec.seeds:
                    done += _run_cell(spec, out_dir, tables, backbone, num_sites, partition, seed)
                    _write_tables(out_dir, tables)
                    log.info(
                        "sweep %s: %d of %d runs done in %.0f s", spec.name, done, spec.num_runs, time.time() - started
                    )
    return write_report(out_dir, spec_text=spec_text, title=f"fedtl sweep: {spec.name}")


def _run_cell(
    spec: SweepSpec, out_dir: Path, tables: SweepTables, backbone: str, num_sites: int, partition: str, seed: int
) -> int:
    """Run one (backbone, sites, partition, seed) cell: every epsilon x method, and the baselines."""
    cell = {"backbone": backbone, "sites": num_sites, "partition": partition, "seed": seed}
    base = spec.run_config(backbone=backbone, partition=partition, seed=seed, out=str(out_dir / "runs"))
    runs = []
    for eps in spec.epsilons:
        for method in spec.methods:
            cfg = base.replace(target_epsilon=eps, **_snake(method_keys(method)))
            runs.append((method, eps, cfg))
    if bl.FEDERATED_NONPRIVATE in spec.baselines:
        runs.append((bl.FEDERATED_NONPRIVATE, math.inf, base.replace(non_private=True)))
    summaries = []
    for method, eps, cfg in runs:
        name = _run_name(method, eps, cell)
        cfg = cfg.replace(run_name=name)
        progress.info("sweep %s: run %s (%d sites)", spec.name, name, num_sites)
        summaries.append((method, eps, cfg, execute(cfg, num_sites=num_sites, executor=spec.executor)))
    # The runs cached every site's features; the baselines read the same caches.
    progress.info("sweep %s: baselines %s", spec.name, ", ".join(spec.baselines) or "none")
    lab = bl.load_lab_federation(base, num_sites)
    scores = bl.run_baselines(lab, epsilons=list(spec.epsilons), seed=seed, methods=spec.baselines)
    local = {s.target_epsilon: s for s in scores if s.method == bl.LOCAL}
    for score in scores:
        tables.results.append(_baseline_row(spec, cell, score, lab))
    for method, eps, cfg, summary in summaries:
        per_site, personalized = _site_scores(lab, method, summary)
        tables.results.append(_run_row(spec, cell, method, eps, summary, bl.pooled_accuracy(lab, per_site)))
        _round_rows(tables, cell, method, eps, summary)
        if eps in local:
            _site_rows(tables, cell, method, eps, summary, lab, per_site, personalized, local[eps])
    return len(runs)


def execute(cfg: RunConfig, *, num_sites: int, executor: str) -> dict[str, Any]:
    """Run one federation with the chosen executor and return its summary."""
    if executor == "inprocess":
        return run_inprocess(cfg, num_sites=num_sites)
    return simulate(cfg, num_sites=num_sites)


def _snake(values: dict[str, Any]) -> dict[str, Any]:
    return {key.replace("-", "_"): v for key, v in values.items()}


def _run_name(method: str, eps: float, cell: dict[str, Any]) -> str:
    eps_text = "inf" if math.isinf(eps) else f"{eps:g}"
    text = f"{method}-eps{eps_text}-{cell['sites']}sites-{cell['partition']}-seed{cell['seed']}-{cell['backbone']}"
    return re.sub(r"[^A-Za-z0-9._-]", "", text.replace(":", ""))


def _site_scores(
    lab: bl.LabFederation, method: str, summary: dict[str, Any]
) -> tuple[dict[str, float], dict[str, float]]:
    """Return each site's accuracy of the model it ends with, and its personalised accuracy (if any)."""
    personal = summary.get("personalization", {}).get("sites", {})
    personalized = {name: float(s[k.PERSONALIZED_ACCURACY]) for name, s in personal.items()}
    if method == "fedper":  # the site's model IS its personalised head
        return {s.name: personalized.get(s.name, math.nan) for s in lab.sites}, personalized
    model = load_model(summary["model"])  # its own head: an auto run's is the planned projected one
    return bl.site_accuracies(lab, model.arrays, model.build_head()), personalized


def _baseline_row(spec: SweepSpec, cell: dict, score: bl.BaselineScore, lab: bl.LabFederation) -> dict[str, Any]:
    return {
        "run": "",
        "method": score.method,
        "data": spec.data,
        **_cell_columns(cell),
        "target_epsilon": score.target_epsilon,
        "accuracy": score.accuracy,
        "balanced_accuracy": score.balanced_accuracy,
        "site_accuracy": score.site_accuracy,
        "majority_rate": majority_rate(lab.central.labels) if lab.central is not None else "",
        "epsilon_spent": score.epsilon_spent,
        "client_epsilon": "",
        "seconds": "",
    }


def _cell_columns(cell: dict[str, Any]) -> dict[str, Any]:
    kind = parse_partition(cell["partition"])
    return {
        "backbone": cell["backbone"],
        "sites": cell["sites"],
        "partition": cell["partition"],
        "alpha": kind.parameter if kind.parameter is not None else "",
        "seed": cell["seed"],
    }


def _run_row(
    spec: SweepSpec, cell: dict, method: str, eps: float, summary: dict[str, Any], site_accuracy: float
) -> dict[str, Any]:
    final = summary.get("final", {})
    return {
        "run": summary["run-id"],
        "method": method,
        "data": spec.data,
        **_cell_columns(cell),
        "target_epsilon": eps,
        "accuracy": final.get(f"central-{k.ACCURACY}", ""),
        "balanced_accuracy": final.get(f"central-{k.BALANCED_ACCURACY}", ""),
        "site_accuracy": site_accuracy,
        "majority_rate": summary.get("majority-rate", ""),
        "epsilon_spent": summary.get("epsilon-max", ""),
        "client_epsilon": client_epsilon(summary),
        "seconds": summary.get("seconds", ""),
    }


def client_epsilon(summary: dict[str, Any]) -> float | str:
    """Return the run's client-level epsilon, or "" when client-level DP was off."""
    if summary.get(k.CLIENT_DP, "off") == "off":
        return ""
    return float(summary[k.CLIENT_EPSILON])


def _metric_lines(summary: dict[str, Any]) -> list[dict[str, Any]]:
    path = Path(summary["run-dir"]) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _run_columns(cell: dict, method: str, eps: float, summary: dict[str, Any]) -> dict[str, Any]:
    """The columns that name a run in rounds.csv, site_rounds.csv and sites.csv."""
    return {
        "run": summary["run-id"],
        "method": method,
        "backbone": cell["backbone"],
        "sites": cell["sites"],
        "partition": cell["partition"],
        "target_epsilon": eps,
        "seed": cell["seed"],
    }


def _round_rows(tables: SweepTables, cell: dict, method: str, eps: float, summary: dict[str, Any]) -> None:
    common = _run_columns(cell, method, eps, summary)
    for line in _metric_lines(summary):
        central = line.get("central", {})
        tables.rounds.append({**common, "round": line["round"], "accuracy": central.get(k.ACCURACY, "")})
        for site, epsilon in sorted(line.get("epsilon-per-site", {}).items()):
            # metrics.jsonl writes an infinite epsilon (non-private) as the string "inf"
            tables.site_rounds.append({**common, "round": line["round"], "site": site, "epsilon": float(epsilon)})


def _site_rows(
    tables: SweepTables,
    cell: dict,
    method: str,
    eps: float,
    summary: dict[str, Any],
    lab: bl.LabFederation,
    per_site: dict[str, float],
    personalized: dict[str, float],
    local: bl.BaselineScore,
) -> None:
    for s in lab.sites:
        fed, alone, n = per_site.get(s.name, math.nan), local.per_site[s.name], len(s.test_labels)
        gain = fed - alone
        stderr = math.sqrt(max(fed * (1 - fed), 0.0) / n + max(alone * (1 - alone), 0.0) / n) if n else math.nan
        tables.sites.append(
            {
                **_run_columns(cell, method, eps, summary),
                "site": s.name,
                "n_train": len(s.train_labels),
                "n_test": n,
                "class_counts": json.dumps(s.class_counts(lab.num_classes)),
                "federated_accuracy": fed,
                "local_accuracy": alone,
                "transfer_gain": gain,
                "gain_stderr": stderr,
                "personalized_accuracy": personalized.get(s.name, ""),
                "negative_transfer": bool(gain < 0),
            }
        )


def _write_tables(out_dir: Path, tables: SweepTables) -> None:
    write_table(out_dir / "results.csv", tables.results, RESULTS_COLUMNS)
    write_table(out_dir / "rounds.csv", tables.rounds, ROUNDS_COLUMNS)
    write_table(out_dir / "site_rounds.csv", tables.site_rounds, SITE_ROUNDS_COLUMNS)
    write_table(out_dir / "sites.csv", tables.sites, SITES_COLUMNS)


def sweep_negative_transfer(out_dir: Path) -> list[str]:
    """Return the CLI's lines naming every site with negative transfer in a finished sweep."""
    return negative_transfer_lines(read_table(out_dir / "sites.csv"))


def transfer_assessed(out_dir: Path) -> bool:
    """Return True when a finished sweep compared some site's federated model with its local-only one."""
    rows = read_table(out_dir / "sites.csv")
    return any(isinstance(r.get("local_accuracy"), (int, float)) and math.isfinite(r["local_accuracy"]) for r in rows)
