"""`fedtl certs` and `fedtl server start`: what the federation's operator runs to deploy."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedtl.server.superlink import ServerAddresses, run_server
from fedtl.server.superlink import superlink_command as build_superlink_command
from fedtl.shared.errors import ConfigError


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
    start = server_sub.add_parser(
        "start", help="run the SuperLink (TLS, SuperNode authentication) on loopback and its Fleet API outside"
    )
    start.add_argument("--certs", required=True, help="folder written by `fedtl certs`")
    start.add_argument("--host", default="0.0.0.0", help="address sites dial, Fleet API only (default 0.0.0.0)")
    start.add_argument("--port", type=int, default=8000, help="port sites dial, Fleet API only (default 8000)")
    start.add_argument(
        "--control-port",
        type=int,
        default=9093,
        help="loopback port of the SuperLink itself: Control API for the operator's flwr, Runtime API (default 9093)",
    )
    start.add_argument("--database", help="SuperLink state database file (default: Flower's in-memory state)")
    start.add_argument(
        "--isolation",
        choices=("subprocess", "process"),
        default="subprocess",
        help="ServerApp runner: a subprocess of the SuperLink (default) or a separate flower-superexec",
    )
    start.add_argument("--superexec-auth-secret-file", help="shared secret of a separate flower-superexec")


def run_certs_command(args: argparse.Namespace) -> int:
    """Write the TLS material of a federation and print what goes where."""
    from fedtl.server.certs import generate_certificates, generate_supernode_keys

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


def server_addresses(args: argparse.Namespace) -> ServerAddresses:
    """Return the public Fleet address and the SuperLink's loopback port from `fedtl server start` options."""
    if args.control_port == args.port:
        raise ConfigError(f"--control-port {args.control_port} equals --port; give the SuperLink its own port")
    return ServerAddresses(fleet_host=args.host, fleet_port=args.port, control_port=args.control_port)


def superlink_extra_args(args: argparse.Namespace) -> list[str]:
    """Return the flower-superlink options passed through unchanged."""
    extra = ["--isolation", args.isolation]
    if args.database:
        extra += ["--database", args.database]
    if args.superexec_auth_secret_file:
        extra += ["--superexec-auth-secret-file", args.superexec_auth_secret_file]
    return extra


def superlink_command(args: argparse.Namespace) -> list[str]:
    """Return the `flower-superlink` command line: TLS, SuperNode auth on, every API on loopback only."""
    return build_superlink_command(Path(args.certs), server_addresses(args), superlink_extra_args(args))


def run_server_command(args: argparse.Namespace) -> int:
    """Run the SuperLink on loopback and the Fleet-only front on the public address (`fedtl server start`)."""
    return run_server(Path(args.certs), server_addresses(args), superlink_extra_args(args))
