"""Which apps a site takes part in (SHA-256 of the FAB, approved by its operator) and its audit log.

A site never runs code it is sent. `fedtl site start` answers every message with the fedtl ClientApp
installed at the site (client/launcher.py), and only for a run whose Flower App Bundle (FAB) the site
operator approved here by its SHA-256, after seeing what it is (`fedtl site approve`). Anything else
is refused with an error reply, and every decision lands in an append-only audit log. The model is
Fed-BioMed's training-plan approval (hash, register, approve/reject) and NVFlare's per-site
authorisation of custom code; Flower's `--trusted-entities` needs signatures issued by Flower Hub, so
an offline federation cannot use it.

Files, under the policy's `state-dir`: `apps/approved.json` (the approvals), `apps/audit.jsonl` (what
ran, what was refused, who approved what), `apps/pending/<sha256>.fab` (the last refused FABs, kept
for the operator to inspect and approve by hash; they are never unpacked by the launcher).
"""

from __future__ import annotations

import datetime
import fcntl
import getpass
import hashlib
import importlib.util
import io
import json
import os
import re
import tomllib
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from fedtl.shared.errors import ConfigError

# The one ClientApp a site runs: the one installed at the site, never a copy from a FAB.
FEDTL_CLIENTAPP = "fedtl.client.client_app:app"
# FAB folders whose code is fedtl's own packages; compared with the installed copies on approval.
INSTALLED_PACKAGES = {"client/": "fedtl.client", "shared/": "fedtl.shared"}
MAX_PENDING_FABS = 16  # refused FABs kept for review; older ones are deleted
MAX_FAB_BYTES = 64 * 1024 * 1024  # larger files are not read as FABs (Flower's own upload limit is lower)
MAX_UNPACKED_BYTES = 256 * 1024 * 1024
_SHA256_PREFIX = re.compile(r"^[0-9a-f]{12,64}$")  # a whole hash, or the audit table's 12 characters or more
APPROVE_FROM_THE_APP = (
    "approve it from the app's folder or its .fab file (`flwr build` writes one) so that the site can see what it "
    "approves"
)

# Audit record events.
RAN = "ran"
REFUSED = "refused"
FAILED = "failed"
APPROVED = "approved"
REVOKED = "revoked"


@dataclass(frozen=True)
class AppFile:
    """One file of a FAB: its path inside the bundle, SHA-256 and size in bytes."""

    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class AppDescription:
    """What a FAB is: its hash, who published it, its components and every file it carries."""

    sha256: str
    publisher: str
    name: str
    version: str
    serverapp: str
    clientapp: str
    files: tuple[AppFile, ...]


@dataclass(frozen=True)
class Approval:
    """One approved app: its hash, what it was when approved, when and by whom."""

    sha256: str
    publisher: str
    name: str
    version: str
    approved_at: str
    approved_by: str


@dataclass(frozen=True)
class Decision:
    """Whether the site runs a task, and why not."""

    approved: bool
    reason: str = ""


def hash_fab(content: bytes) -> str:
    """Return the SHA-256 of a FAB's bytes (Flower's FAB hash)."""
    return hashlib.sha256(content).hexdigest()


def apps_dir(state_dir: Path) -> Path:
    """Return the folder of a site's approvals, audit log and pending FABs."""
    return Path(state_dir) / "apps"


def build_fab(app_dir: Path) -> bytes:
    """Return the FAB that `flwr run APP_DIR` ships, built the same way (deterministic: fixed dates, sorted)."""
    from flwr.cli.build import build_fab_from_disk

    try:
        return build_fab_from_disk(Path(app_dir))
    except ValueError as exc:
        raise ConfigError(f"cannot build a FAB from {app_dir}: {exc}") from exc


def read_app(source: str, state_dir: Path) -> bytes:
    """Return a FAB's bytes from an app folder, a `.fab` file, or the SHA-256 of a FAB the site refused.

    A prefix of 12 or more hex characters, as `fedtl site audit` shows the hash, names the refused FAB it matches.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return build_fab(path.resolve())
    if path.is_file():
        if path.stat().st_size > MAX_FAB_BYTES:
            raise ConfigError(f"{path} has {path.stat().st_size} bytes; a FAB has at most {MAX_FAB_BYTES}")
        return path.read_bytes()
    if _SHA256_PREFIX.match(source.lower()):  # refused FABs are kept as apps/pending/<sha256>.fab
        pending_dir = apps_dir(state_dir) / "pending"
        found = sorted(pending_dir.glob(f"{source.lower()}*.fab")) if pending_dir.is_dir() else []
        if len(found) == 1:
            return found[0].read_bytes()
        if found:
            raise ConfigError(
                f"{source} matches {len(found)} refused FABs: {', '.join(p.stem for p in found)}; give more of the hash"
            )
        whole = len(source) == 64
        none = (
            f"no FAB with sha256 {source} was refused here"
            if whole
            else f"no refused FAB's sha256 starts with {source}"
        )
        raise ConfigError(f"{none} (none in {pending_dir}); {APPROVE_FROM_THE_APP}")
    raise ConfigError(
        f"{source!r} is neither an app folder, a .fab file nor the SHA-256 of a FAB refused here (no such path); "
        "fix: give the app's folder (its pyproject.toml names the app), the .fab file `flwr build` writes, or the "
        "hash (or its first 12 characters) `fedtl site audit` lists for a refused run"
    )


def describe_fab(content: bytes) -> AppDescription:
    """Return what a FAB is, from its pyproject.toml and its CONTENT manifest (each file's hash checked)."""
    sha = hash_fab(content)
    try:
        bundle = zipfile.ZipFile(io.BytesIO(content))
        names = bundle.namelist()
        unpacked = sum(info.file_size for info in bundle.infolist())
        if unpacked > MAX_UNPACKED_BYTES:  # a zip bomb is refused before anything is inflated
            raise ConfigError(f"FAB {sha} unpacks to {unpacked} bytes; at most {MAX_UNPACKED_BYTES} are read")
        config = tomllib.loads(bundle.read("pyproject.toml").decode("utf-8"))
        manifest = bundle.read(".info/CONTENT").decode("utf-8")
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"FAB {sha} is not a Flower App Bundle with pyproject.toml and .info/CONTENT: {exc}") from exc
    files = []
    for line in filter(None, manifest.splitlines()):
        path, file_sha, bits = line.rsplit(",", 2)
        data = bundle.read(path) if path in names else None
        if data is None or hash_fab(data) != file_sha or len(data) * 8 != int(bits):
            raise ConfigError(f"FAB {sha}: {path} does not match its line in .info/CONTENT; refusing the bundle")
        files.append(AppFile(path=path, sha256=file_sha, size=len(data)))
    unlisted = sorted(set(names) - {f.path for f in files} - {".info/CONTENT"})
    if unlisted:
        raise ConfigError(f"FAB {sha} carries files outside its .info/CONTENT manifest: {', '.join(unlisted)}")
    app = config.get("tool", {}).get("flwr", {}).get("app", {})
    components = app.get("components", {})
    project = config.get("project", {})
    return AppDescription(
        sha256=sha,
        publisher=str(app.get("publisher", "")),
        name=str(project.get("name", "")),
        version=str(project.get("version", "")),
        serverapp=str(components.get("serverapp", "")),
        clientapp=str(components.get("clientapp", "")),
        files=tuple(files),
    )


def compare_with_installed(content: bytes) -> tuple[list[str], list[str]]:
    """Return the FAB's copies of fedtl's site code that equal the installed files, and those that differ."""
    same, differ = [], []
    bundle = zipfile.ZipFile(io.BytesIO(content))
    for prefix, package in INSTALLED_PACKAGES.items():
        spec = importlib.util.find_spec(package)
        root = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
        for name in bundle.namelist():
            if not name.startswith(prefix) or not name.endswith(".py"):
                continue
            installed = root / name[len(prefix) :] if root else None
            if installed is not None and installed.is_file() and installed.read_bytes() == bundle.read(name):
                same.append(name)
            else:
                differ.append(name)
    return same, differ


def format_description(app: AppDescription, content: bytes) -> str:
    """Return what an operator reads before approving an app: identity, components, files, installed code."""
    same, differ = compare_with_installed(content)
    lines = [
        f"app        {app.publisher}/{app.name} version {app.version}",
        f"sha256     {app.sha256}",
        f"serverapp  {app.serverapp or '-'}   (runs at the server, not here)",
        f"clientapp  {app.clientapp or '-'}",
        f"files      {len(app.files)}, {sum(f.size for f in app.files)} bytes:",
    ]
    lines += [f"  {f.sha256[:12]}  {f.size:>9}  {f.path}" for f in app.files]
    lines.append(
        f"This site never runs code from the bundle: approving it lets the installed {FEDTL_CLIENTAPP} "
        "answer this app's runs, each message still checked against the site policy."
    )
    if same or differ:
        lines.append(f"The bundle's copies of fedtl's site code: {len(same)} files equal the installed ones")
        lines += [f"  differs from the installed copy: {name}" for name in differ]
    return "\n".join(lines)


@contextmanager
def _locked(state_dir: Path) -> Iterator[Path]:
    """Hold the exclusive lock of a site's apps folder (approvals and audit log); yield the folder."""
    folder = apps_dir(state_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield folder
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_approvals(state_dir: Path) -> dict[str, Approval]:
    """Return the site's approved apps by SHA-256 (none when nothing was ever approved)."""
    path = apps_dir(state_dir) / "approved.json"
    if not path.exists():
        return {}
    try:
        records = json.loads(path.read_text())
        return {r["sha256"]: Approval(**r) for r in records}
    except (json.JSONDecodeError, TypeError, KeyError) as exc:
        raise ConfigError(f"{path} is not a list of approvals ({exc}); restore it from a backup") from exc


def _write_approvals(folder: Path, approvals: dict[str, Approval]) -> None:
    path = folder / "approved.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([asdict(a) for a in approvals.values()], indent=1) + "\n")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def approve_app(state_dir: Path, content: bytes) -> Approval:
    """Record a FAB's SHA-256 as approved at the site; refuse a FAB whose ClientApp is not fedtl's."""
    app = describe_fab(content)
    if app.clientapp != FEDTL_CLIENTAPP:
        raise ConfigError(
            f"app {app.publisher}/{app.name} ({app.sha256}) names clientapp {app.clientapp!r}; this site runs only "
            f"the installed {FEDTL_CLIENTAPP}, so approving it would not run its code: not approved"
        )
    approval = Approval(
        sha256=app.sha256,
        publisher=app.publisher,
        name=app.name,
        version=app.version,
        approved_at=_now(),
        approved_by=_operator(),
    )
    with _locked(state_dir) as folder:
        approvals = read_approvals(state_dir)
        approvals[app.sha256] = approval
        _write_approvals(folder, approvals)
        _append(
            folder, {"event": APPROVED, "fab-sha256": app.sha256, "app": _app_name(app), "by": approval.approved_by}
        )
        (folder / "pending" / f"{app.sha256}.fab").unlink(missing_ok=True)
    return approval


def revoke_app(state_dir: Path, sha256: str) -> Approval:
    """Remove an approval; later messages of that app are refused."""
    with _locked(state_dir) as folder:
        approvals = read_approvals(state_dir)
        if sha256 not in approvals:
            known = ", ".join(approvals) or "none"
            raise ConfigError(f"app {sha256} is not approved at this site (approved: {known})")
        approval = approvals.pop(sha256)
        _write_approvals(folder, approvals)
        _append(folder, {"event": REVOKED, "fab-sha256": sha256, "by": _operator()})
    return approval


def check_app(state_dir: Path, content: bytes, *, announced_sha256: str, task_type: str, site: str) -> Decision:
    """Decide whether the site answers a task of an app, from the FAB's bytes (never unpacked here)."""
    if task_type != "flwr-clientapp":
        return Decision(False, f"site {site} runs only ClientApp tasks; this run asks for a {task_type!r} task")
    sha = hash_fab(content)
    if sha != announced_sha256:
        return Decision(
            False, f"site {site}: the FAB's content hashes to {sha}, not to its announced {announced_sha256}"
        )
    if sha not in read_approvals(state_dir):
        return Decision(
            False,
            f"site {site} runs only apps its operator approved; app sha256 {sha} is not approved "
            f"(the site operator reviews it with `fedtl site approve --policy POLICY {sha}`)",
        )
    return Decision(True)


def keep_pending(state_dir: Path, content: bytes) -> Path | None:
    """Keep a refused FAB for the operator to inspect (the newest MAX_PENDING_FABS); return its path."""
    if len(content) > MAX_FAB_BYTES:
        return None
    folder = apps_dir(state_dir) / "pending"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hash_fab(content)}.fab"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(content)
        os.replace(tmp, path)
    for old in sorted(folder.glob("*.fab"), key=lambda p: p.stat().st_mtime)[:-MAX_PENDING_FABS]:
        old.unlink(missing_ok=True)
    return path


def record_event(state_dir: Path, record: dict) -> None:
    """Append one record to the site's audit log (locked, fsynced), stamped with the time."""
    with _locked(state_dir) as folder:
        _append(folder, record)


def _append(folder: Path, record: dict) -> None:
    line = json.dumps({"time": _now(), **record}, sort_keys=False) + "\n"
    with open(folder / "audit.jsonl", "a") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def read_audit(state_dir: Path) -> list[dict]:
    """Return the site's audit records, oldest first."""
    path = apps_dir(state_dir) / "audit.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def format_audit(records: list[dict], last: int = 50) -> str:
    """Return the last audit records as a table: time, event, app, run, message, reason."""
    if not records:
        return "audit log empty: nothing approved, run or refused yet"
    lines = [f"{'time':<26} {'event':<9} {'fab sha256':<14} {'app':<28} {'run':>20}  detail"]
    for r in records[-last:]:
        detail = r.get("reason") or r.get("message-type") or r.get("by") or ""
        sha = str(r.get("fab-sha256", ""))[:12]
        lines.append(
            f"{r['time']:<26} {r['event']:<9} {sha:<14} {r.get('app', ''):<28} {r.get('run-id', ''):>20}  {detail}"
        )
    return "\n".join(lines)


def format_approvals(approvals: dict[str, Approval]) -> str:
    """Return the approved apps, one a line."""
    if not approvals:
        return "no app approved: every run is refused (approve one with `fedtl site approve`)"
    return "\n".join(
        f"{a.sha256}  {a.publisher}/{a.name} {a.version}  approved {a.approved_at} by {a.approved_by}"
        for a in approvals.values()
    )


def _app_name(app: AppDescription) -> str:
    return f"{app.publisher}/{app.name}=={app.version}"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _operator() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"
