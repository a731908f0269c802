"""`fedtl site ...`: what a site operator runs (policy, data check, budget, ledger, the site's SuperNode)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

from fedtl.client import admin, approval
from fedtl.client.launcher import run_site, write_runtime_secret
from fedtl.client.policy import SitePolicy, load_policy
from fedtl.client.site import keep_private
from fedtl.shared.errors import ConfigError, FedtlError
from fedtl.shared.files import existing_file, installed_script


def add_site_commands(sub: argparse._SubParsersAction) -> None:
    """Add `fedtl site {init,check,status,ledger,start,approve,revoke,apps,audit}`: what a site operator runs."""
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
    init.add_argument("--schema", default="", help="table rows: the federation's schema (JSON), pinned in the policy")
    init.add_argument("--state-dir", default="state", help="ledger folder (relative to the policy file)")
    init.add_argument(
        "--secret-dir",
        default=None,
        help="the ledger's key and head, outside the state folder (default ~/.config/fedtl/<name>)",
    )
    init.add_argument("--force", action="store_true", help="overwrite an existing policy file")
    for name, text in (
        ("check", "load and validate the site's data as training would, and report counts and skips"),
        ("status", "budget left, allowed and cached backbones, feature cache"),
    ):
        cmd = site_sub.add_parser(name, help=text)
        cmd.add_argument("--policy", required=True, help="the site policy file")
    ledger = site_sub.add_parser(
        "ledger", help="privacy spend per run and in total; `verify`: check key, chain, head; `adopt`: sign old records"
    )
    ledger.add_argument(
        "action",
        nargs="?",
        default="report",
        choices=("report", "verify", "adopt"),
        help="report (default): spend per run; verify: check the ledger's key, MAC chain and head, list every "
        "record and recompute epsilon with Opacus (exit 0 only when all verifies); adopt: show an earlier "
        "version's ledger (or one whose head was lost) and sign it into a chain",
    )
    ledger.add_argument("--policy", required=True, help="the site policy file")
    ledger.add_argument("--yes", action="store_true", help="adopt without asking (after printing the records)")
    ledger.add_argument(
        "--new-key", action="store_true", help="adopt: the key is lost for good; re-sign the records under a new one"
    )
    start = site_sub.add_parser(
        "start", help="run this site's SuperNode (outbound only) and its launcher (approved apps only)"
    )
    start.add_argument("--policy", required=True, help="the site policy file")
    start.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink's Fleet API")
    start.add_argument("--root-certificates", help="CA certificate (PEM) that signed the SuperLink's certificate")
    start.add_argument(
        "--auth-key", help="OpenSSH private key whose public key was registered with `flwr supernode register`"
    )
    start.add_argument("--insecure", action="store_true", help="no TLS (loopback experiments only)")
    start.add_argument("--port", type=int, default=9094, help="local port of the ClientApp runtime API (default 9094)")
    add_approval_commands(site_sub)


def add_approval_commands(site_sub: argparse._SubParsersAction) -> None:
    """Add the site operator's commands that decide which apps the site answers, and show what ran."""
    approve = site_sub.add_parser(
        "approve", help="show an app (folder, .fab file, or the SHA-256 of a refused FAB) and approve its hash"
    )
    approve.add_argument("app", help="app folder (as `flwr run` ships it), .fab file, or SHA-256 of a refused FAB")
    approve.add_argument("--policy", required=True, help="the site policy file")
    approve.add_argument("--yes", action="store_true", help="approve without asking (after printing the app)")
    revoke = site_sub.add_parser("revoke", help="withdraw an app's approval: its later messages are refused")
    revoke.add_argument("sha256", help="the app's FAB SHA-256 (`fedtl site apps` lists them)")
    revoke.add_argument("--policy", required=True, help="the site policy file")
    apps = site_sub.add_parser("apps", help="the approved apps")
    apps.add_argument("--policy", required=True, help="the site policy file")
    audit = site_sub.add_parser("audit", help="what ran, what was refused and what was approved, newest last")
    audit.add_argument("--policy", required=True, help="the site policy file")
    audit.add_argument("--last", type=int, default=50, help="how many records (default 50)")


def run_site_command(args: argparse.Namespace) -> int:
    """Run one `fedtl site ...` command and return its exit status."""
    previous = keep_private()  # whatever a site command writes (policy, state, caches, approvals) is the site's
    try:
        return _run_site_command(args)
    finally:
        os.umask(previous)


def _run_site_command(args: argparse.Namespace) -> int:
    if args.site_command == "init":
        labels = [n.strip() for n in args.label_names.split(",") if n.strip()]
        path = admin.init_policy(
            args.policy,
            site_name=args.name,
            data=args.data,
            backbones=args.backbone or ["efficientnet_lite0"],
            label_names=labels,
            state_dir=args.state_dir,
            secret_dir=args.secret_dir,
            overwrite=args.force,
            schema=args.schema,
        )
        print(f"wrote {path}; review it, then: fedtl site check --policy {path}")
        return 0
    policy = load_policy(Path(args.policy).expanduser().resolve())
    if args.site_command == "check":
        print(admin.check_data(policy))
    elif args.site_command == "status":
        print(admin.status_report(policy))
    elif args.site_command == "ledger":
        return run_ledger_command(args, policy)
    elif args.site_command == "start":
        keep_private(policy.state_dir, policy.cache_dir)  # the SuperNode and the launcher inherit it
        secret = write_runtime_secret(policy.state_dir)  # only the SuperNode and the site's launcher read it
        command = supernode_command(args, policy.source)
        command += ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]
        return run_site(policy, command, args.port, secret)
    else:
        return run_approval_command(args, policy)
    return 0


def run_ledger_command(args: argparse.Namespace, policy: SitePolicy) -> int:
    """Run `fedtl site ledger [report|verify|adopt]` and return its exit status (verify: 0 only when verified)."""
    if args.action == "report":
        print(admin.ledger_report(policy))
        return 0
    if args.action == "verify":
        verified, report = admin.verify_ledger(policy)
        print(report)
        return 0 if verified else 1
    adoption, listing = admin.plan_ledger_adoption(policy, new_key=args.new_key)
    print(listing)
    if not args.yes:
        if not sys.stdin.isatty():
            raise ConfigError("not adopted: pass --yes to adopt without a terminal to answer on")
        if input(
            f"sign these {len(adoption.charges)} records into site {policy.site_name}'s ledger? [y/N] "
        ).strip().lower() not in ("y", "yes"):
            print("not adopted")
            return 1
    backup = admin.adopt_ledger(policy, adoption)
    print(f"adopted; the file as it was is kept at {backup}")
    verified, report = admin.verify_ledger(policy)
    print(report)
    return 0 if verified else 1


def run_approval_command(args: argparse.Namespace, policy: SitePolicy) -> int:
    """Run `fedtl site approve|revoke|apps|audit` and return its exit status."""
    state = policy.state_dir
    if args.site_command == "approve":
        content = approval.read_app(args.app, state)
        app = approval.describe_fab(content)
        print(approval.format_description(app, content))
        if not args.yes:
            if not sys.stdin.isatty():
                raise ConfigError("not approved: pass --yes to approve without a terminal to answer on")
            question = (
                f"approve {app.publisher}/{app.name} {app.version} ({app.sha256[:12]}) at site {policy.site_name}?"
            )
            if input(f"{question} [y/N] ").strip().lower() not in ("y", "yes"):
                print("not approved")
                return 1
        done = approval.approve_app(state, content)
        print(f"approved {done.sha256} at site {policy.site_name}")
    elif args.site_command == "revoke":
        done = approval.revoke_app(state, args.sha256)
        print(f"revoked {done.sha256} ({done.publisher}/{done.name} {done.version}) at site {policy.site_name}")
    elif args.site_command == "apps":
        print(approval.format_approvals(approval.read_approvals(state)))
    elif args.site_command == "audit":
        print(approval.format_audit(approval.read_audit(state), last=args.last))
    return 0


def is_loopback(host: str) -> bool:
    """Return True when `host` names this machine's loopback interface."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def supernode_command(args: argparse.Namespace, policy_path: str) -> list[str]:
    """Return the `flower-supernode` command line of a site: its policy in the node config, TLS unless --insecure."""
    command = [installed_script("flower-supernode"), "--superlink", args.superlink]
    command += ["--node-config", f"policy='{policy_path}'"]
    command += ["--port", str(args.port)]  # the local ClientApp runtime API (127.0.0.1)
    if args.insecure:
        host = args.superlink.rsplit(":", 1)[0].strip("[]")
        if not is_loopback(host):
            raise FedtlError(
                f"--insecure sends the site's updates unencrypted, so it is only allowed to a SuperLink on this "
                f"machine (127.0.0.1, ::1, localhost), got {args.superlink!r}; give --root-certificates ca.crt instead"
            )
        command.append("--insecure")
    elif args.root_certificates:
        ca = existing_file(
            args.root_certificates, "--root-certificates", "give the federation's CA certificate (ca.crt)"
        )
        command += ["--root-certificates", str(ca)]
    else:
        raise FedtlError("`fedtl site start` needs --root-certificates CA.pem (TLS), or --insecure on loopback")
    if args.auth_key:
        key = existing_file(args.auth_key, "--auth-key", "give the private key whose public key the server registered")
        command += ["--auth-supernode-private-key", str(key)]
    return command
