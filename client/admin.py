"""What a site operator runs by hand: write a policy, read the ledger, see the budget, check the data."""

from __future__ import annotations

import math
import time
from datetime import datetime, timezone
from pathlib import Path

from opacus.accountants import PRVAccountant, RDPAccountant
from safetensors import safe_open

from fedtl.client.ledger import ADOPTED, Adoption, PrivacyCharge
from fedtl.client.policy import SitePolicy, default_secret_dir, load_policy, policy_template
from fedtl.client.quotas import WINDOW_S, count_noise_free
from fedtl.client.site import load_policy_data, site_from_policy
from fedtl.shared.backbones import backbone_state_dict, build_backbone, fingerprint_state_dict
from fedtl.shared.errors import ConfigError, DataError
from fedtl.shared.loaders import check_site_source
from fedtl.shared.named_data import named_source
from fedtl.shared.tables import TableSchema, load_schema


def init_policy(
    path: str | Path,
    *,
    site_name: str,
    data: str,
    backbones: list[str],
    label_names: list[str],
    state_dir: str = "state",
    secret_dir: str | None = None,
    overwrite: bool = False,
    schema: str = "",
) -> Path:
    """Write a commented policy file allowing the named registry backbones (their fingerprints computed here).

    The data is checked first, without decoding images (shared.loaders.check_site_source): a missing or
    empty source, or labels that do not fit `label_names`, stop here and no file is written. The ledger's
    secret folder is written out in full (default: `~/.config/fedtl/<site name>`, resolved now).

    Raises:
        ConfigError: the file exists (and `overwrite` is False), a backbone name or `label_names` is bad.
        DataError: the data cannot be used (the message names it, what is wrong and the fix).
    """
    path = Path(path).expanduser().resolve()
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists; refusing to overwrite a site policy (pass --force to replace it)")
    table = load_schema(Path(schema).expanduser().resolve()) if schema else None
    check_policy_data(path, data, label_names, table)
    fingerprints = {
        name: fingerprint_state_dict(backbone_state_dict(build_backbone(name, schema=table))) for name in backbones
    }
    text = policy_template(
        site_name=site_name,
        data=data,
        state_dir=state_dir,
        fingerprints=fingerprints,
        label_names=label_names,
        secret_dir=secret_dir if secret_dir is not None else str(default_secret_dir(site_name)),
        schema=str(Path(schema).expanduser().resolve()) if schema else "",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    load_policy(path)  # the template must always be a valid policy
    return path


def check_policy_data(path: Path, data: str, label_names: list[str], schema: TableSchema | None = None) -> str:
    """Check the data a policy at `path` would name, resolved as load_policy resolves it; return what was found."""
    source = data
    if data != "digits" and named_source(data) is None:  # as load_policy: paths are relative to the policy's folder
        given = Path(data).expanduser()
        source = str(given if given.is_absolute() else path.parent / given)
    try:
        return check_site_source(source, label_names=label_names or None, schema=schema)
    except DataError as exc:
        moved = Path(data).expanduser()
        if source != data and not Path(source).exists() and moved.exists():
            raise DataError(
                f"{exc} (the policy resolves the relative path {data!r} against its own folder {path.parent}, but it "
                f"exists relative to the current folder; fix: pass --data {moved.resolve()})"
            ) from exc
        raise


def ledger_report(policy: SitePolicy) -> str:
    """Return the ledger as a table: spend per run and the cumulative total, at the policy's delta."""
    ledger = site_from_policy(policy).ledger
    runs = ledger.spend_by_run(delta=policy.delta, accountant=policy.accountant)
    lines = [f"privacy ledger {ledger.path} (site {policy.site_name}, delta {policy.delta:g}, {policy.accountant})"]
    if not runs:
        lines.append("no charges yet")
        return "\n".join(lines)
    lines.append(
        f"{'run':<44} {'rounds':>6} {'steps':>7} {'eps(run)':>9} {'eps(total)':>10} {'no-noise':>8}  last charge (UTC)"
    )
    for r in runs:
        when = datetime.fromtimestamp(r.last_time, timezone.utc).strftime("%Y-%m-%d %H:%M")
        lines.append(
            f"{r.run_id:<44} {r.rounds:>6} {r.steps:>7} {_eps(r.epsilon_alone):>9} {_eps(r.epsilon_after):>10} "
            f"{r.noise_free:>8}  {when}"
        )
    total = ledger.epsilon(delta=policy.delta, accountant=policy.accountant)
    lines.append(f"total epsilon {_eps(total)} of max-epsilon {policy.max_epsilon:g}")
    return "\n".join(lines)


def verify_ledger(policy: SitePolicy) -> tuple[bool, str]:
    """Check the ledger's key, MAC chain and head; return (verified, report of every record and of epsilon).

    Epsilon per run and in total is recomputed here over the accounted records with Opacus' own
    accountant classes (`RDPAccountant` or `PRVAccountant` as the policy says; not fedtl's cached RDP
    scan) and must equal the ledger's own figure; noise-free releases are listed and counted against the
    policy's quotas. Verified means: the key, the chain and the head check out, and both epsilons agree.
    """
    ledger = site_from_policy(policy).ledger
    lines = [
        f"privacy ledger {ledger.path} (site {policy.site_name}, delta {policy.delta:g}, {policy.accountant})",
        f"key  {ledger.key_path}",
        f"head {ledger.head_path}",
    ]
    try:
        state = ledger.read_state()
    except DataError as exc:
        lines.append(f"NOT VERIFIED: {exc}")
        return False, "\n".join(lines)
    charges = list(state.charges) + ([state.torn[0]] if state.torn else [])
    if state.key is None:
        lines.append("no key yet: the site has charged nothing (the first charge creates it)")
    else:
        lines.append(f"key present, readable by its owner only; MAC chain of {len(state.charges)} record(s) verifies")
    if state.head is not None:
        behind = " (one record behind after a crash: accepted, updated at the next charge)" if state.head_behind else ""
        lines.append(f"head: {state.head.records} record(s), its MAC matches{behind}")
    if state.torn:
        lines.append("the last record is torn (a crash during a write): counted pessimistically, as shown")
    lines.append(
        f"{'#':>4} {'time (UTC)':<19} {'run':<36} {'round':>5} {'kind':<16} {'noise':>8} {'q':>8} {'steps':>6} mac"
    )
    macs = list(state.macs) + ["(torn)"] * bool(state.torn)
    for i, (c, mac) in enumerate(zip(charges, macs), start=1):
        when = datetime.fromtimestamp(c.time, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        lines.append(
            f"{i:>4} {when:<19} {c.run_id[:36]:<36} {c.server_round:>5} {c.kind:<16} {c.noise_multiplier:>8.4g} "
            f"{c.sample_rate:>8.4g} {c.steps:>6} {mac[:12]}"
        )
    runs = list(dict.fromkeys(c.run_id for c in charges if c.kind != ADOPTED))
    lines.append(f"epsilon at delta {policy.delta:g}, recomputed with Opacus' {policy.accountant} accountant:")
    for run_id in runs:
        mine = [c for c in charges if c.run_id == run_id]
        noise_free = sum(1 for c in mine if not c.accounted)
        lines.append(
            f"  {run_id:<44} epsilon {_eps(opacus_epsilon(mine, policy.delta, policy.accountant)):>9}"
            f"  noise-free releases {noise_free}"
        )
    independent = opacus_epsilon(charges, policy.delta, policy.accountant)
    own = ledger.epsilon(delta=policy.delta, accountant=policy.accountant)
    agree = independent == own or (math.isfinite(own) and abs(independent - own) <= 1e-9 * max(1.0, abs(own)))
    lines.append(
        f"  total {_eps(independent)} (fedtl's own: {_eps(own)}{'' if agree else ', MISMATCH'}) "
        f"of max-epsilon {policy.max_epsilon:g}"
    )
    day = count_noise_free(charges, since=time.time() - WINDOW_S)
    lines.append(
        f"noise-free releases in the last 24 h: {day} of {policy.max_noise_free_releases_per_day}; "
        f"per run at most {policy.max_noise_free_releases_per_run}"
    )
    lines.append("VERIFIED" if agree else "NOT VERIFIED: the recomputed epsilon differs from fedtl's")
    return agree, "\n".join(lines)


def opacus_epsilon(charges: list[PrivacyCharge], delta: float, accountant: str) -> float:
    """Return the epsilon of the accounted `charges` from a fresh Opacus accountant (inf once any had no noise)."""
    history = [(c.noise_multiplier, c.sample_rate, c.steps) for c in charges if c.accounted and c.steps > 0]
    if not history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf
    opacus = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    opacus.history = history
    return float(opacus.get_epsilon(delta=delta))


def plan_ledger_adoption(policy: SitePolicy, *, new_key: bool = False) -> tuple[Adoption, str]:
    """Return what `fedtl site ledger adopt` would sign, and a listing of it for the operator to review."""
    ledger = site_from_policy(policy).ledger
    adoption = ledger.plan_adoption(new_key=new_key)
    lines = [
        f"privacy ledger {ledger.path}: {adoption.reason}",
        f"{len(adoption.charges)} record(s), {adoption.unchecked} of them unchecked; file sha256 {adoption.sha256}",
        f"they will be signed with {ledger.key_path} ({'created now' if not ledger.key_path.exists() else 'existing'})"
        f" and sealed in {ledger.head_path}; the file as it is is kept beside the ledger",
    ]
    for i, c in enumerate(adoption.charges, start=1):
        when = datetime.fromtimestamp(c.time, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        lines.append(
            f"{i:>4} {when} {c.run_id[:36]:<36} {c.server_round:>5} {c.kind:<16} noise {c.noise_multiplier:.4g} "
            f"q {c.sample_rate:.4g} steps {c.steps}"
        )
    total = opacus_epsilon(list(adoption.charges), policy.delta, policy.accountant)
    lines.append(f"epsilon of these records at delta {policy.delta:g}: {_eps(total)}")
    return adoption, "\n".join(lines)


def adopt_ledger(policy: SitePolicy, adoption: Adoption) -> Path:
    """Sign the reviewed records into the ledger's chain (PrivacyLedger.adopt); return the copy of the old file."""
    return site_from_policy(policy).ledger.adopt(adoption)


def status_report(policy: SitePolicy) -> str:
    """Return the site's budget left, its cached backbones and feature caches."""
    site = site_from_policy(policy)
    spent = site.ledger.epsilon(delta=policy.delta, accountant=policy.accountant)
    left = max(policy.max_epsilon - spent, 0.0) if math.isfinite(spent) else 0.0
    lines = [
        f"site {policy.site_name} (policy {policy.source})",
        f"  data: {policy.data}",
        f"  budget: spent epsilon {_eps(spent)} of {policy.max_epsilon:g} at delta {policy.delta:g}; left {left:.3f}"
        + ("  (EXHAUSTED: the site refuses further training)" if left <= 0 else ""),
        f"  ledger: {site.ledger.path}",
        f"  ledger key and head: {site.ledger.secret_dir}",
        f"  min noise multiplier {policy.min_noise_multiplier:g}; max rounds per run {policy.max_rounds_per_run}, "
        f"per 24 h {policy.max_rounds_per_day}; evaluation metrics "
        + (
            f"released (noise-free: at most {policy.max_noise_free_releases_per_run} per run, "
            f"{policy.max_noise_free_releases_per_day} per 24 h)"
            if policy.release_evaluation_metrics
            else "kept local"
        ),
        "  allowed backbones:",
    ]
    cached = set(site.backbones.fingerprints())
    for fp in policy.allowed_backbones or ():
        lines.append(f"    {fp}  {'cached' if fp in cached else 'not cached yet'}")
    lines.append("  cached backbones:")
    for fp in sorted(cached):
        path = site.backbones.path(fp)
        with safe_open(str(path), framework="pt") as fh:
            name = (fh.metadata() or {}).get("backbone-name", "?")
        allowed = "" if policy.allowed_backbones is None or fp in policy.allowed_backbones else "  (NOT allowed)"
        lines.append(f"    {name:<20} {fp[:16]}  {path.stat().st_size / 1e6:.1f} MB{allowed}")
    if not cached:
        lines.append("    none")
    features = sorted(site.feature_cache.root.glob("*.npz")) if site.feature_cache.root.is_dir() else []
    lines.append(f"  feature cache: {len(features)} file(s) in {site.feature_cache.root}")
    return "\n".join(lines)


def check_data(policy: SitePolicy) -> str:
    """Load and validate the site's data exactly as a training round would; return the loader's report.

    Raises:
        DataError: the data cannot be used (the message names the files and the fix).
    """
    return load_policy_data(policy).report.summary()


def _eps(value: float) -> str:
    return "inf" if not math.isfinite(value) else f"{value:.3f}"
