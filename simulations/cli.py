"""The `fedtl` command line: `simulate` a federation, run a `site`, `predict` with or `audit` an adapted model."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from fedtl.shared.config import RunConfig
from fedtl.shared.errors import FedtlError

log = logging.getLogger("fedtl")

# CLI flag -> run-config key, for the flags every user reaches for; anything else goes through --set.
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


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of every `fedtl` subcommand."""
    parser = argparse.ArgumentParser(prog="fedtl", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log Flower's and fedtl's INFO messages")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser(
        "simulate",
        help="run a whole federation on one machine (Flower simulation engine)",
        description="Run a federation of simulated sites. With no options: EfficientNet-Lite0 "
        "features of scikit-learn's digits over 5 sites, DP-SGD heads at epsilon 8.",
    )
    sim.add_argument("--sites", type=int, default=5, help="number of simulated sites (default 5)")
    sim.add_argument("--rounds", type=int, help="federated rounds")
    sim.add_argument("--epsilon", type=float, help="per-site target epsilon (cumulative over the run)")
    sim.add_argument("--delta", type=float, help="per-site target delta")
    sim.add_argument("--noise-multiplier", type=float, help="fixed DP-SGD noise instead of deriving it from --epsilon")
    sim.add_argument("--backbone", help="backbone name (efficientnet_lite0, resnet18, ..., tiny)")
    sim.add_argument("--head", choices=("linear", "mlp"))
    sim.add_argument("--strategy", choices=("fedavg", "fedprox", "fedadam"))
    sim.add_argument("--data", help="'digits', a MedMNIST .npz, or an image folder (one sub-folder per class)")
    sim.add_argument(
        "--partition", help="iid, dirichlet:ALPHA (label skew), quantity:ALPHA, classes:K, natural (site column)"
    )
    sim.add_argument("--seed", type=int)
    sim.add_argument("--out", help="folder for runs (default runs/)")
    sim.add_argument("--non-private", action="store_true", help="baseline without DP (labelled NON-PRIVATE everywhere)")
    sim.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help='any run-config key, TOML value syntax (e.g. --set local-epochs=2 --set head="mlp")',
    )

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

    add_site_commands(sub)
    add_deployment_commands(sub)

    pred = sub.add_parser("predict", help="label images with an adapted model file")
    pred.add_argument("model", help="model.safetensors written by a run")
    pred.add_argument("images", nargs="+", help="image files")
    pred.add_argument(
        "--backbone-weights", help="backbone weights file (e.g. from a site cache) instead of the registry"
    )
    pred.add_argument("--device", default="auto")
    add_audit_command(sub)
    add_rank_command(sub)
    return parser


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
    rank.add_argument("--sites", type=int, default=5, help="number of simulated sites (default 5)")
    rank.add_argument("--data", help="'digits', a MedMNIST .npz, or an image folder (one sub-folder per class)")
    rank.add_argument("--partition", help="iid, dirichlet:ALPHA, quantity:ALPHA, classes:K, natural")
    rank.add_argument("--seed", type=int)
    rank.add_argument("--out", help="folder for the ranking (default runs/)")
    rank.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any run-config key")
    rank.add_argument("--executor", choices=("inprocess", "flower"), default="inprocess")
    rank.set_defaults(non_private=False, resume=None)


def add_site_commands(sub: argparse._SubParsersAction) -> None:
    """Add `fedtl site {init,check,status,ledger,start}`: what a site operator runs."""
    site = sub.add_parser("site", help="a site operator's commands: policy, data check, budget, ledger, start")
    site_sub = site.add_subparsers(dest="site_command", required=True)
    init = site_sub.add_parser("init", help="write a commented site policy (TOML)")
    init.add_argument("policy", help="where to write the policy file")
    init.add_argument("--name", required=True, help="site name shown to the federation")
    init.add_argument("--data", required=True, help="image folder, CSV manifest, MedMNIST .npz (DICOM via manifest)")
    init.add_argument(
        "--backbone",
        action="append",
        default=None,
        help="registry backbone to allow (its fingerprint is computed here); repeatable; default efficientnet_lite0",
    )
    init.add_argument("--label-names", default="", help="comma-separated class names in the federation's order")
    init.add_argument("--state-dir", default="state", help="ledger folder (relative to the policy file)")
    init.add_argument("--force", action="store_true", help="overwrite an existing policy file")
    for name, text in (
        ("check", "load and validate the site's data as training would, and report counts and skips"),
        ("status", "budget left, allowed and cached backbones, feature cache"),
        ("ledger", "privacy spend per run and in total"),
    ):
        cmd = site_sub.add_parser(name, help=text)
        cmd.add_argument("--policy", required=True, help="the site policy file")
    start = site_sub.add_parser("start", help="run this site's SuperNode (outbound connection to the SuperLink only)")
    start.add_argument("--policy", required=True, help="the site policy file")
    start.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink (one port for all APIs)")
    start.add_argument("--root-certificates", help="CA certificate (PEM) that signed the SuperLink's certificate")
    start.add_argument(
        "--auth-key", help="OpenSSH private key whose public key was registered with `flwr supernode register`"
    )
    start.add_argument("--insecure", action="store_true", help="no TLS (loopback experiments only)")
    start.add_argument("--port", type=int, default=9094, help="local port of the ClientApp runtime API (default 9094)")


def add_deployment_commands(sub: argparse._SubParsersAction) -> None:
    """Add `fedtl certs` (private CA, SuperLink certificate, SuperNode keys) and `fedtl server start`."""
    certs = sub.add_parser("certs", help="write a private CA, the SuperLink's TLS certificate and SuperNode keys")
    certs.add_argument("--out", required=True, help="folder for ca.crt, server.pem/.key and supernode-<site>.key/.pub")
    certs.add_argument(
        "--host",
        action="append",
        default=None,
        help="name or address sites dial the SuperLink by (repeatable; localhost and 127.0.0.1 are always added)",
    )
    certs.add_argument("--sites", default="", help="comma-separated site names: one SuperNode key pair each")
    certs.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    certs.add_argument("--force", action="store_true", help="overwrite existing files")
    server = sub.add_parser("server", help="the federation server's commands")
    server_sub = server.add_subparsers(dest="server_command", required=True)
    start = server_sub.add_parser("start", help="run the SuperLink with TLS and SuperNode authentication")
    start.add_argument("--certs", required=True, help="folder written by `fedtl certs`")
    start.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    start.add_argument("--port", type=int, default=8000, help="port of every SuperLink API (default 8000)")


def run_certs_command(args: argparse.Namespace) -> int:
    """Write the TLS material of a federation and print what goes where."""
    from fedtl.shared.certs import generate_certificates, generate_supernode_keys

    hosts = list(dict.fromkeys([*(args.host or []), "localhost", "127.0.0.1"]))
    out = Path(args.out).expanduser().resolve()
    paths = generate_certificates(out, hosts=hosts, days=args.days, overwrite=args.force)
    print(f"CA certificate {paths.ca_cert}: give it to every site (and to `flwr` in config.toml)")
    print(f"CA key {paths.ca_key}: keep it offline; it signs the server certificate")
    print(f"server certificate {paths.server_cert} and key {paths.server_key}: for the SuperLink only")
    sites = [n.strip() for n in args.sites.split(",") if n.strip()]
    keys = generate_supernode_keys(out, sites, overwrite=args.force) if sites else {}
    for name, (key, pub) in keys.items():
        print(
            f"site {name}: private key {key} (send to that site only), public key {pub}: flwr supernode register {pub}"
        )
    return 0


def superlink_command(args: argparse.Namespace) -> list[str]:
    """Return the `flower-superlink` command line: TLS with the federation's certificates, SuperNode auth on."""
    certs = Path(args.certs).expanduser().resolve()
    files = {"--ssl-ca-certfile": "ca.crt", "--ssl-certfile": "server.pem", "--ssl-keyfile": "server.key"}
    missing = [name for name in files.values() if not (certs / name).is_file()]
    if missing:
        raise FedtlError(f"{certs} lacks {', '.join(missing)}; write them with `fedtl certs --out {certs}`")
    command = ["flower-superlink"]
    for flag, name in files.items():
        command += [flag, str(certs / name)]
    return command + ["--enable-supernode-auth", "--host", args.host, "--port", str(args.port)]


def run_site_command(args: argparse.Namespace) -> int:
    """Run one `fedtl site ...` command and return its exit status."""
    from fedtl.client import admin
    from fedtl.client.policy import load_policy

    if args.site_command == "init":
        labels = [n.strip() for n in args.label_names.split(",") if n.strip()]
        path = admin.init_policy(
            args.policy,
            site_name=args.name,
            data=args.data,
            backbones=args.backbone or ["efficientnet_lite0"],
            label_names=labels,
            state_dir=args.state_dir,
            overwrite=args.force,
        )
        print(f"wrote {path}; review it, then: fedtl site check --policy {path}")
        return 0
    policy = load_policy(Path(args.policy).expanduser().resolve())
    if args.site_command == "check":
        print(admin.check_data(policy))
    elif args.site_command == "status":
        print(admin.status_report(policy))
    elif args.site_command == "ledger":
        print(admin.ledger_report(policy))
    elif args.site_command == "start":
        command = supernode_command(args, policy.source)
        print("exec:", " ".join(command), flush=True)
        os.execvp(command[0], command)
    return 0


def supernode_command(args: argparse.Namespace, policy_path: str) -> list[str]:
    """Return the `flower-supernode` command line of a site: its policy in the node config, TLS unless --insecure."""
    command = ["flower-supernode", "--superlink", args.superlink, "--node-config", f"policy='{policy_path}'"]
    command += ["--port", str(args.port)]  # the local ClientApp runtime API (127.0.0.1)
    if args.insecure:
        command.append("--insecure")
    elif args.root_certificates:
        command += ["--root-certificates", str(Path(args.root_certificates).expanduser().resolve())]
    else:
        raise FedtlError("`fedtl site start` needs --root-certificates CA.pem (TLS), or --insecure on loopback")
    if args.auth_key:
        command += ["--auth-supernode-private-key", str(Path(args.auth_key).expanduser().resolve())]
    return command


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Return the run config: defaults, then --set overrides, then the named flags."""
    values: dict[str, Any] = {}
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
    print(
        f"{banner}run {summary['run-id']}: {len(summary['sites'])} sites, {summary['num-rounds']} rounds, "
        f"backbone {summary['backbone']}"
    )
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
    print(f"model: {summary['model'] or '- (fedper: every site keeps its own last layer)'}")


def run_sweep_command(args: argparse.Namespace) -> int:
    """Run `fedtl sweep SPEC`: every run, the baselines, the tables, plots and report; print what was found."""
    import dataclasses
    from datetime import datetime

    from fedtl.simulations.sweep import parse_spec, run_sweep, sweep_negative_transfer

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
    if not lines:
        print("no negative transfer: every site gained from the federation (or matched its local-only model)")
    return 0


def _fmt(value: Any, width: int = 9) -> str:
    return f"{value:>{width}.4f}" if isinstance(value, (int, float)) else f"{'-':>{width}}"


def _fmt_eps(eps: float) -> str:
    return f"{'inf':>9}" if not math.isfinite(eps) else f"{eps:>9.3f}"


def main(argv: list[str] | None = None) -> int:
    """Run the `fedtl` command line and return its exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Flower logs every round through its own console handler (read from FLWR_LOG_LEVEL when flwr is
    # first imported, which happens below); keep the terminal for the final table unless --verbose.
    os.environ.setdefault("FLWR_LOG_LEVEL", "INFO" if args.verbose else "WARNING")
    logging.getLogger("flwr").propagate = False  # its handler prints already; no second copy via root
    try:
        if args.command == "simulate":
            from fedtl.simulations.engine import simulate

            cfg = config_from_args(args)
            t0 = time.time()
            if args.executor == "inprocess":
                from fedtl.simulations.inprocess import run_inprocess

                summary = run_inprocess(cfg, num_sites=args.sites)
            else:
                summary = simulate(cfg, num_sites=args.sites, verbose=args.verbose)
            summary["seconds"] = time.time() - t0
            print_summary(summary)
            if cfg.data and not cfg.resume:
                from fedtl.simulations.partition_report import write_partition_report

                print(f"\nexamples per class at each site (partition {cfg.partition}, seed {cfg.seed}):")
                print(write_partition_report(cfg, args.sites, summary))
        elif args.command == "sweep":
            return run_sweep_command(args)
        elif args.command == "site":
            return run_site_command(args)
        elif args.command == "certs":
            return run_certs_command(args)
        elif args.command == "server":
            command = superlink_command(args)
            print("exec:", " ".join(command), flush=True)
            os.execvp(command[0], command)
        elif args.command == "predict":
            from fedtl.server.predict import predict_images

            for p in predict_images(args.model, args.images, weights_file=args.backbone_weights, device=args.device):
                print(f"{p.path}\t{p.label}\t{p.probability:.4f}")
        elif args.command == "audit":
            from fedtl.simulations.audit import run_audit_command

            return run_audit_command(args)
        elif args.command == "rank-backbones":
            from fedtl.simulations.ranking import format_ranking, rank_simulated

            backbones = [name.strip() for name in args.backbones.split(",") if name.strip()]
            cfg = config_from_args(args)
            print(format_ranking(rank_simulated(cfg, backbones, num_sites=args.sites, executor=args.executor)))
    except FedtlError as exc:
        print(f"fedtl: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
