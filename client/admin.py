"""What a site operator runs by hand: write a policy, read the ledger, see the budget, check the data."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path

from safetensors import safe_open

from fedtl.client.policy import SitePolicy, load_policy, policy_template
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
    overwrite: bool = False,
    schema: str = "",
) -> Path:
    """Write a commented policy file allowing the named registry backbones (their fingerprints computed here).

    The data is checked first, without decoding images (shared.loaders.check_site_source): a missing or
    empty source, or labels that do not fit `label_names`, stop here and no file is written.

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
    lines.append(f"{'run':<44} {'rounds':>6} {'steps':>7} {'eps(run)':>9} {'eps(total)':>10}  last charge (UTC)")
    for r in runs:
        when = datetime.fromtimestamp(r.last_time, timezone.utc).strftime("%Y-%m-%d %H:%M")
        lines.append(
            f"{r.run_id:<44} {r.rounds:>6} {r.steps:>7} {_eps(r.epsilon_alone):>9} {_eps(r.epsilon_after):>10}  {when}"
        )
    total = ledger.epsilon(delta=policy.delta, accountant=policy.accountant)
    lines.append(f"total epsilon {_eps(total)} of max-epsilon {policy.max_epsilon:g}")
    unchecked = ledger.unchecked_records()
    if unchecked:
        lines.append(f"WARNING: {unchecked} record(s) carry no checksum (fedtl 0.1): damage to them goes undetected")
    return "\n".join(lines)


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
        f"  min noise multiplier {policy.min_noise_multiplier:g}; max rounds per run {policy.max_rounds_per_run}; "
        f"evaluation metrics {'released' if policy.release_evaluation_metrics else 'kept local'}",
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
