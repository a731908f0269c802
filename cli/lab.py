"""`fedtl simulate`, `sweep`, `rank-backbones` and `audit`: the lab's commands (and the run-config flags)."""

from __future__ import annotations

import argparse
import json
import math
import time
import tomllib
from pathlib import Path
from typing import Any

from fedtl.cli import EXIT_OK, EXIT_SITES_LEFT_OUT
from fedtl.server.run_folder import RESUME_OVERRIDABLE
from fedtl.shared.config import RunConfig
from fedtl.shared.errors import ConfigError, FedtlError
from fedtl.simulations.federation import SIMULATED_SITES

DEFAULT_SITES = 5

_FLAG_KEYS = {
    "rounds": "num-rounds",
    "epsilon": "target-epsilon",
    "delta": "target-delta",
    "backbone": "backbone",
    "head": "head",
    "data": "data",
    "partition": "partition",
    "seed": "seed",
    "out": "out",
    "strategy": "strategy",
    "noise_multiplier": "noise-multiplier",
}


def add_federation_flags(parser: argparse.ArgumentParser, *, out: str) -> None:
    """Add the flags of a simulated federation: sites, data, partition, seed, output folder, any run-config key."""
    parser.add_argument("--sites", type=int, help=f"number of simulated sites (default {DEFAULT_SITES})")
    parser.add_argument(
        "--data", help="'digits', a MedMNIST .npz, an image folder (class sub-folders) or a CSV manifest"
    )
    parser.add_argument(
        "--partition", help="iid, dirichlet:ALPHA (label skew), quantity:ALPHA, classes:K, natural (site column)"
    )
    parser.add_argument("--seed", type=int)
    parser.add_argument("--out", help=out)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help='any run-config key, TOML value syntax (e.g. --set local-epochs=2 --set head="mlp")',
    )


def add_lab_commands(sub: argparse._SubParsersAction) -> None:
    """Add `fedtl simulate`, `sweep`, `audit` and `rank-backbones`."""
    sim = sub.add_parser(
        "simulate",
        help="run a whole federation on one machine (Flower simulation engine)",
        description="Run a federation of simulated sites. With no options: EfficientNet-Lite0 "
        "features of scikit-learn's digits over 5 sites, 10 rounds, each site at epsilon 8 (delta 1e-5); "
        'the head planned by head-solver "auto" (full-batch DP-GD on a public projection of the features), '
        "which prints what it chose and why.",
    )
    add_federation_flags(sim, out="folder for runs (default runs/)")
    sim.add_argument("--rounds", type=int, help="federated rounds")
    sim.add_argument("--epsilon", type=float, help="per-site target epsilon (cumulative over the run)")
    sim.add_argument("--delta", type=float, help="per-site target delta")
    sim.add_argument("--noise-multiplier", type=float, help="fixed DP-SGD noise instead of deriving it from --epsilon")
    sim.add_argument("--backbone", help="backbone name (efficientnet_lite0, resnet18, ..., tiny)")
    sim.add_argument("--head", choices=("linear", "mlp"))
    sim.add_argument("--strategy", choices=("fedavg", "fedprox", "fedadam"))
    sim.add_argument("--non-private", action="store_true", help="baseline without DP (labelled NON-PRIVATE everywhere)")
    sim.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its last checkpoint")
    sim.add_argument(
        "--executor",
        choices=("flower", "inprocess"),
        default="flower",
        help="flower: Flower's simulation engine (default); inprocess: the same apps in this process, no Ray",
    )

    sweep = sub.add_parser(
        "sweep",
        help="run a grid of federations (epsilon x sites x partition x seed x method) with baselines, plots, report",
        description="Run every cell of a TOML sweep spec plus the baselines, and write results.csv, rounds.csv, "
        "site_rounds.csv, sites.csv, plots and report.md. See fedtl.simulations.sweep for the spec format.",
    )
    sweep.add_argument("spec", help="the sweep spec (TOML)")
    sweep.add_argument("--out", help="output folder (default sweeps/<name>-<time>)")
    sweep.add_argument("--executor", choices=("flower", "inprocess"), help="override the spec's executor")
    add_audit_command(sub)
    add_rank_command(sub)


def add_audit_command(sub: argparse._SubParsersAction) -> None:
    """Add `fedtl audit MODEL...`: membership-inference attacks and empirical epsilon lower bounds."""
    audit = sub.add_parser(
        "audit",
        help="attack an adapted model (loss threshold, LiRA, canaries); compare its empirical epsilon to the accounted",
        description="Audit model.safetensors of a run (its run folder gives members and non-members) or, with "
        "--members/--non-members, of a deployment. Writes audit.json and audit.md beside each model; with several "
        "models also audit-compare.md (e.g. a DP and a non-private run side by side).",
    )
    audit.add_argument("models", nargs="+", metavar="MODEL", help="model.safetensors files or run folders")
    audit.add_argument("--members", help="data the model was trained on (folder, CSV manifest or .npz)")
    audit.add_argument("--non-members", help="data of the same distribution the model never saw")
    audit.add_argument("--shadows", type=int, default=8, help="shadow heads for LiRA (even, >= 2; 0 = no LiRA)")
    audit.add_argument("--lira", choices=("online", "offline"), default="online", help="LiRA variant (default online)")
    audit.add_argument("--canaries", action="store_true", help="require the one-run canary audit (run with canaries)")
    audit.add_argument("--confidence", type=float, default=0.95, help="of the epsilon lower bounds (default 0.95)")
    audit.add_argument("--seed", type=int, default=0, help="the audit's own randomness (shadow halves, splits)")
    audit.add_argument("--out", help="folder of audit-compare.md with several models (default: the runs' folder)")
    audit.add_argument("--backbone-weights", help="backbone weights file for --members/--non-members")
    audit.add_argument("--device", default="auto")


def add_rank_command(sub: argparse._SubParsersAction) -> None:
    """Add `fedtl rank-backbones`: transferability scores of candidate backbones at simulated sites, before training."""
    rank = sub.add_parser(
        "rank-backbones",
        help="score candidate backbones at the sites (LogME, H-score; not DP) and recommend one, before training",
        description="Each simulated site scores every candidate on its cached features and sends back scalars; "
        "the server ranks the site-size-weighted means and writes ranking.json and ranking.md.",
    )
    rank.add_argument("--backbones", required=True, help="comma-separated candidates, e.g. efficientnet_lite0,...")
    add_federation_flags(rank, out="folder for the ranking (default runs/)")
    rank.add_argument("--executor", choices=("inprocess", "flower"), default="inprocess")
    rank.set_defaults(non_private=False, resume=None)


def run_simulate_command(args: argparse.Namespace) -> int:
    """Run `fedtl simulate` on the chosen executor and print the final table and the partition."""
    from fedtl.simulations.engine import simulate

    cfg = config_from_args(args)
    sites = resumed_sites(args) if args.resume else (DEFAULT_SITES if args.sites is None else args.sites)
    t0 = time.time()
    if args.executor == "inprocess":
        from fedtl.simulations.inprocess import run_inprocess

        summary = run_inprocess(cfg, num_sites=sites)
    else:
        summary = simulate(cfg, num_sites=sites, verbose=args.verbose)
    summary["seconds"] = time.time() - t0
    print_summary(summary)
    if cfg.data and not cfg.resume:
        from fedtl.simulations.partition_report import write_partition_report

        print(f"\nexamples per class at each site (partition {cfg.partition}, seed {cfg.seed}):")
        print(write_partition_report(cfg, sites, summary))
    return EXIT_OK if summary.get("all-sites-completed", True) else EXIT_SITES_LEFT_OUT


def run_rank_command(args: argparse.Namespace) -> int:
    """Run `fedtl rank-backbones` over simulated sites and print the ranking."""
    from fedtl.simulations.ranking import format_ranking, rank_simulated

    backbones = [name.strip() for name in args.backbones.split(",") if name.strip()]
    cfg = config_from_args(args)
    sites = DEFAULT_SITES if args.sites is None else args.sites
    print(format_ranking(rank_simulated(cfg, backbones, num_sites=sites, executor=args.executor)))
    return 0


def run_audit_command(args: argparse.Namespace) -> int:
    """Run `fedtl audit` (simulations/audit.py)."""
    from fedtl.simulations.audit import run_audit_command as run

    return run(args)


def resumed_sites(args: argparse.Namespace) -> int:
    """Return the number of sites the run `--resume` names was simulated with (a different --sites is refused).

    Raises:
        ConfigError: the run folder does not say, or --sites asks for another number.
    """
    path = Path(args.resume).expanduser() / "config.json"
    try:
        stored = json.loads(path.read_text()).get(SIMULATED_SITES)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot resume {args.resume}: {path} is missing or unreadable ({exc})") from exc
    if not isinstance(stored, int):
        raise ConfigError(
            f"cannot resume {args.resume} as a simulation: its config.json does not record `{SIMULATED_SITES}` (a "
            "deployed run is resumed with `flwr run` and resume = '<run folder>')"
        )
    if args.sites is not None and args.sites != stored:
        raise ConfigError(
            f"cannot resume {args.resume} with --sites {args.sites}: the run has {stored} sites, each holding its own "
            "share of the data; drop --sites"
        )
    return stored


def stored_operational_keys(run_dir: Path) -> dict[str, Any]:
    """Return the operational keys (RESUME_OVERRIDABLE) of the run stored in `run_dir` ({} when unreadable)."""
    try:
        stored = json.loads((run_dir.expanduser() / "config.json").read_text())["config"]
    except (OSError, ValueError, KeyError):
        return {}  # the server's resume says what is wrong with the folder
    return {key: stored[key] for key in RESUME_OVERRIDABLE if key in stored}


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Return the run config: defaults, then --set overrides, then the named flags."""
    values: dict[str, Any] = {}
    if getattr(args, "resume", None):  # a resumed run keeps its own operational settings unless asked otherwise
        values.update(stored_operational_keys(Path(args.resume)))
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep:
            raise FedtlError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            values[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            values[key.strip()] = raw  # a bare word is a string
    for flag, key in _FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is not None:
            values[key] = value
    if args.non_private:
        values["non-private"] = True
    if args.resume:
        values["resume"] = str(Path(args.resume).expanduser().resolve())
    return RunConfig.from_mapping(values)


def print_summary(summary: dict[str, Any]) -> None:
    """Print the final table: accuracy beside the majority-class rate, per-site epsilon, time."""
    banner = "NON-PRIVATE BASELINE (no DP): " if summary["non-private"] else ""
    print()
    trained, joined = len(summary["sites"]), len(summary.get("site-outcomes", {}))
    sites = f"{trained} of {joined} sites trained" if joined > trained else f"{trained} sites"
    print(f"{banner}run {summary['run-id']}: {sites}, {summary['num-rounds']} rounds, backbone {summary['backbone']}")
    print(f"{'site':<10} {'accuracy':>9} {'majority':>9} {'bal.acc':>8} {'epsilon':>9}  (local test split)")
    for site in summary["sites"]:
        scores = summary["final-per-site"].get(site, {})
        eps = summary["epsilon-per-site"].get(site, math.nan)
        print(
            f"{site:<10} {_fmt(scores.get('accuracy'))} {_fmt(scores.get('majority-rate'))} "
            f"{_fmt(scores.get('balanced-accuracy'), 8)} {_fmt_eps(eps)}"
        )
    final = summary["final"]
    if "central-accuracy" in final:
        print(
            f"{'server':<10} {_fmt(final['central-accuracy'])} {_fmt(summary['majority-rate'])} "
            f"{_fmt(final.get('central-balanced-accuracy'), 8)} {'':>9}  (held-out test set)"
        )
    print(
        f"epsilon max {_fmt_eps(summary['epsilon-max']).strip()} at delta {summary['delta']:g} "
        f"(cumulative per site); time {summary['seconds']:.1f} s"
    )
    personal = summary.get("personalization")
    if personal:
        print(f"personalisation ({personal['method']}), local test splits:")
        for site, scores in personal["sites"].items():
            shared = scores.get("shared-accuracy")
            print(f"  {site:<10} shared {_fmt(shared)}  personalised {_fmt(scores.get('personalized-accuracy'))}")
    left_out = {n: o for n, o in summary.get("site-outcomes", {}).items() if o["status"] != "completed"}
    for site, outcome in left_out.items():
        print(f"{site}: {outcome['status'].upper()}: {'; '.join(outcome['reasons'])}")
    print(f"model: {summary['model'] or '- (fedper: every site keeps its own last layer)'}")


def run_sweep_command(args: argparse.Namespace) -> int:
    """Run `fedtl sweep SPEC`: every run, the baselines, the tables, plots and report; print what was found."""
    import dataclasses
    from datetime import datetime

    from fedtl.simulations.sweep import parse_spec, run_sweep, sweep_negative_transfer, transfer_assessed

    path = Path(args.spec)
    if not path.is_file():
        raise FedtlError(f"sweep spec {path} does not exist; see `fedtl sweep --help` for its format")
    text = path.read_text()
    spec = parse_spec(text, source=str(path))
    if args.executor:
        spec = dataclasses.replace(spec, executor=args.executor)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path("sweeps") / f"{spec.name}-{stamp}"
    print(f"sweep {spec.name}: {spec.num_runs} federated runs plus baselines ({spec.executor} executor) -> {out}")
    t0 = time.time()
    report = run_sweep(spec, out, spec_text=text)
    print(f"done in {time.time() - t0:.0f} s: {out / 'results.csv'}, report {report}")
    lines = sweep_negative_transfer(out)
    for line in lines:
        print(line)
    if not lines and not transfer_assessed(out):
        print('negative transfer not assessed: no local-only baseline ran (add "local" to the spec\'s baselines)')
    elif not lines:
        print("no negative transfer: every site gained from the federation (or matched its local-only model)")
    return 0


def _fmt(value: Any, width: int = 9) -> str:
    return f"{value:>{width}.4f}" if isinstance(value, (int, float)) else f"{'-':>{width}}"


def _fmt_eps(eps: float) -> str:
    return f"{'inf':>9}" if not math.isfinite(eps) else f"{eps:>9.3f}"
