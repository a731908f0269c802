"""Site app approval (FAB SHA-256), its audit log, the launcher's decision, and the server's Fleet-only front."""

import hashlib
import io
import json
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fedtl.client import approval
from fedtl.client.admin import init_policy
from fedtl.client.approval import (
    FEDTL_CLIENTAPP,
    approve_app,
    build_fab,
    check_app,
    describe_fab,
    format_description,
    keep_pending,
    read_app,
    read_approvals,
    read_audit,
    revoke_app,
)
from fedtl.shared.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]


def _write_app(folder: Path, clientapp: str = FEDTL_CLIENTAPP, body: str = "x = 1\n") -> Path:
    """Write a minimal Flower app folder; return it."""
    (folder / "pkg").mkdir(parents=True)
    (folder / "pkg" / "__init__.py").write_text("")
    (folder / "pkg" / "mod.py").write_text(body)
    (folder / "pyproject.toml").write_text(
        '[project]\nname = "demo"\nversion = "2.1.0"\ndependencies = ["flwr"]\n\n'
        '[tool.flwr.app]\npublisher = "acme"\n\n[tool.flwr.app.components]\n'
        f'serverapp = "pkg.mod:server"\nclientapp = "{clientapp}"\n\n[tool.flwr.app.config]\nx = 1\n'
    )
    return folder


def _rezip(content: bytes, change) -> bytes:
    """Return a copy of a FAB with `change(name, data) -> data | None` applied to each member (None drops it)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(content)) as src, zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            data = change(name, src.read(name))
            if data is not None:
                dst.writestr(name, data)
    return out.getvalue()


@pytest.fixture
def fab(tmp_path) -> bytes:
    return build_fab(_write_app(tmp_path / "demo"))


def test_describe_fab_against_the_zip_itself(fab):
    app = describe_fab(fab)
    assert app.sha256 == hashlib.sha256(fab).hexdigest()
    assert (app.publisher, app.name, app.version) == ("acme", "demo", "2.1.0")
    assert (app.serverapp, app.clientapp) == ("pkg.mod:server", FEDTL_CLIENTAPP)
    with zipfile.ZipFile(io.BytesIO(fab)) as bundle:
        expected = {n: bundle.read(n) for n in bundle.namelist() if n != ".info/CONTENT"}
    assert {f.path for f in app.files} == set(expected) == {"pyproject.toml", "pkg/__init__.py", "pkg/mod.py"}
    for f in app.files:
        assert (f.sha256, f.size) == (hashlib.sha256(expected[f.path]).hexdigest(), len(expected[f.path]))


def test_build_fab_is_deterministic_and_follows_the_code(tmp_path):
    first, again = build_fab(_write_app(tmp_path / "a")), build_fab(tmp_path / "a")
    changed = build_fab(_write_app(tmp_path / "b", body="x = 2\n"))
    assert first == again and approval.hash_fab(first) != approval.hash_fab(changed)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            lambda n, d: b"x = 666\n" if n == "pkg/mod.py" else d,
            r"pkg/mod\.py does not match its line in \.info/CONTENT",
        ),
        (lambda n, d: d if n != ".info/CONTENT" else d + b"\n", None),  # a trailing newline is harmless
        (lambda n, d: None if n == "pkg/mod.py" else d, r"pkg/mod\.py does not match"),
        (lambda n, d: d, None),
    ],
)
def test_describe_fab_checks_every_file_against_the_manifest(fab, change, match):
    tampered = _rezip(fab, change)
    if match is None:
        assert describe_fab(tampered).name == "demo"
    else:
        with pytest.raises(ConfigError, match=match):
            describe_fab(tampered)


def test_describe_fab_refuses_unlisted_files_non_fabs_and_zip_bombs(fab, monkeypatch):
    extra = io.BytesIO(fab)
    with zipfile.ZipFile(extra, "a") as bundle:
        bundle.writestr("pkg/evil.py", "import os\n")
    with pytest.raises(ConfigError, match=r"files outside its \.info/CONTENT manifest: pkg/evil\.py"):
        describe_fab(extra.getvalue())
    with pytest.raises(ConfigError, match=r"is not a Flower App Bundle"):
        describe_fab(b"not a zip")
    monkeypatch.setattr(approval, "MAX_UNPACKED_BYTES", 10)
    with pytest.raises(ConfigError, match=r"unpacks to \d+ bytes; at most 10 are read"):
        describe_fab(fab)


def test_approve_check_revoke_and_the_audit_log(tmp_path, fab):
    state = tmp_path / "state"
    sha = approval.hash_fab(fab)
    args = dict(announced_sha256=sha, task_type="flwr-clientapp", site="s1")
    refused = check_app(state, fab, **args)
    assert not refused.approved and f"app sha256 {sha} is not approved" in refused.reason
    done = approve_app(state, fab)
    assert (done.sha256, done.name, done.version) == (sha, "demo", "2.1.0")
    assert read_approvals(state) == {sha: done}
    assert check_app(state, fab, **args).approved
    # A bundle that is not what the run announced, or a task that is not a ClientApp, is refused anyway.
    assert "not to its announced" in check_app(state, fab, **{**args, "announced_sha256": "0" * 64}).reason
    agent = check_app(state, fab, **{**args, "task_type": "flwr-agentapp"})
    assert not agent.approved and "runs only ClientApp tasks" in agent.reason
    revoke_app(state, sha)
    assert read_approvals(state) == {} and not check_app(state, fab, **args).approved
    with pytest.raises(ConfigError, match=rf"app {sha} is not approved at this site \(approved: none\)"):
        revoke_app(state, sha)
    events = [(r["event"], r["fab-sha256"]) for r in read_audit(state)]
    assert events == [("approved", sha), ("revoked", sha)]
    assert json.loads((state / "apps" / "approved.json").read_text()) == []


def test_an_app_whose_clientapp_is_not_fedtls_cannot_be_approved(tmp_path):
    hostile = build_fab(_write_app(tmp_path / "evil", clientapp="pkg.mod:steal"))
    with pytest.raises(ConfigError, match=r"names clientapp 'pkg\.mod:steal'; this site runs only the installed"):
        approve_app(tmp_path / "state", hostile)
    assert read_approvals(tmp_path / "state") == {}


def test_read_app_from_a_folder_a_fab_file_or_a_refused_hash(tmp_path, fab):
    state = tmp_path / "state"
    (tmp_path / "demo.fab").write_bytes(fab)
    assert read_app(str(tmp_path / "demo"), state) == read_app(str(tmp_path / "demo.fab"), state) == fab
    sha = approval.hash_fab(fab)
    with pytest.raises(ConfigError, match=rf"no FAB with sha256 {sha} was refused here"):
        read_app(sha, state)
    assert keep_pending(state, fab) == state / "apps" / "pending" / f"{sha}.fab"
    assert read_app(sha.upper(), state) == fab
    # `fedtl site audit` shows 12 characters of the hash: a prefix naming one refused FAB is enough.
    assert read_app(sha[:12], state) == fab
    twin = state / "apps" / "pending" / f"{sha[:12]}{'e' if sha[12] == 'f' else 'f'}{'0' * 51}.fab"
    twin.write_bytes(b"another app")  # a second refused FAB whose hash shares those 12 characters
    with pytest.raises(ConfigError, match=rf"{sha[:12]} matches 2 refused FABs: .*; give more of the hash"):
        read_app(sha[:12], state)
    assert read_app(sha[:13], state) == fab
    twin.unlink()
    with pytest.raises(ConfigError, match=r"no refused FAB's sha256 starts with 0123456789ab"):
        read_app("0123456789ab", state)
    with pytest.raises(
        ConfigError,
        match=r"'nonsense' is neither an app folder, a \.fab file nor the SHA-256 .*; fix: give the app's folder",
    ):
        read_app("nonsense", state)
    approve_app(state, fab)
    assert not (state / "apps" / "pending" / f"{sha}.fab").exists()  # approved: no longer pending


def test_pending_fabs_are_capped(tmp_path, monkeypatch):
    monkeypatch.setattr(approval, "MAX_PENDING_FABS", 2)
    for i in range(4):
        keep_pending(tmp_path, f"fab {i}".encode())
    kept = sorted(p.read_bytes() for p in (tmp_path / "apps" / "pending").glob("*.fab"))
    assert len(kept) == 2 and set(kept) <= {f"fab {i}".encode() for i in range(4)}


def test_the_description_compares_the_bundles_site_code_with_the_installed_one(tmp_path):
    repo_fab = build_fab(REPO_ROOT)
    text = format_description(describe_fab(repo_fab), repo_fab)
    assert f"clientapp  {FEDTL_CLIENTAPP}" in text and "differs from the installed copy" not in text
    changed = _rezip(repo_fab, lambda n, d: d + b"# changed\n" if n == "client/client_app.py" else d)
    text = format_description(describe_fab(repo_fab), changed)
    assert "differs from the installed copy: client/client_app.py" in text


def test_site_approve_apps_audit_revoke_commands(tmp_path, capsys):
    from fedtl.cli.main import main

    policy = tmp_path / "site" / "policy.toml"
    assert main(["site", "init", str(policy), "--name", "s1", "--data", "digits", "--backbone", "tiny"]) == 0
    app = _write_app(tmp_path / "demo")
    capsys.readouterr()
    assert main(["site", "approve", "--policy", str(policy), str(app)]) == 2  # no terminal, no --yes
    assert "pass --yes" in capsys.readouterr().err
    assert main(["site", "apps", "--policy", str(policy)]) == 0
    assert "no app approved" in capsys.readouterr().out
    assert main(["site", "approve", "--policy", str(policy), str(app), "--yes"]) == 0
    out = capsys.readouterr().out
    sha = approval.hash_fab(build_fab(app))
    assert "app        acme/demo version 2.1.0" in out and f"approved {sha} at site s1" in out
    assert main(["site", "apps", "--policy", str(policy)]) == 0
    assert f"{sha}  acme/demo 2.1.0" in capsys.readouterr().out
    assert main(["site", "revoke", "--policy", str(policy), sha]) == 0
    assert main(["site", "audit", "--policy", str(policy)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines[-2:]] == ["approved", "revoked"]


def test_runtime_secret_is_fresh_and_private(tmp_path):
    from fedtl.client.launcher import write_runtime_secret

    first = write_runtime_secret(tmp_path).read_bytes()
    path = write_runtime_secret(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_bytes()) == 32
    assert path.read_bytes() != first


def test_the_fleet_front_forwards_only_fleet_routes(tmp_path):
    import asyncio

    import httpx

    from fedtl.server.certs import generate_certificates
    from fedtl.server.superlink import create_fleet_front, fleet_paths

    paths = fleet_paths()
    assert "/v1/fleet/pull-messages" in paths and "/v1/fleet/get-fab" in paths
    assert all(p.startswith("/v1/fleet/") for p in paths)
    front = create_fleet_front("https://127.0.0.1:9", generate_certificates(tmp_path).ca_cert)
    requests = [
        ("POST", "/v1/control/start-run"),
        ("POST", "/v1/control/list-nodes"),
        ("POST", "/v1/runtime/acquire-task"),
        ("GET", "/v1/fleet/pull-messages"),
        ("GET", "/docs"),
        ("POST", "/v1/fleet/pull-messages/../../control/start-run"),
    ]

    async def send() -> list[httpx.Response]:
        # Nothing listens upstream (port 9): each of these is answered by the front itself.
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=front), base_url="https://front") as client:
            return [await client.request(method, path, content=b"") for method, path in requests]

    for (method, path), answer in zip(requests, asyncio.run(send())):
        assert answer.status_code == 404 and "serves only the Fleet API" in answer.text, (method, path)


def test_server_start_refuses_one_port_for_both(tmp_path, capsys):
    from fedtl.cli.main import main

    main(["certs", "--out", str(tmp_path)])
    capsys.readouterr()
    assert main(["server", "start", "--certs", str(tmp_path), "--port", "9093"]) == 2
    assert "--control-port 9093 equals --port" in capsys.readouterr().err


def test_the_launcher_exits_with_its_supernode_so_a_restart_policy_can_start_the_site_again(tmp_path):
    """A SuperNode that fails to activate (Flower exit 305, e.g. its old self still counted online) ends the site.

    The launcher's task claims would otherwise retry the dead Runtime API for ever and the container
    (docker-compose restart policy) would stay up, never reconnecting.
    """
    policy = init_policy(tmp_path / "site.toml", site_name="s", data="digits", backbones=["tiny"], label_names=[])
    script = (
        "import socket, sys\n"
        "from fedtl.client.launcher import run_site, write_runtime_secret\n"
        "from fedtl.client.policy import load_policy\n"
        "policy = load_policy(sys.argv[1])\n"
        "with socket.socket() as s:\n"
        "    s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]  # nothing will listen there\n"
        "dead = [sys.executable, '-c', 'import time, sys; time.sleep(1); sys.exit(305 % 256)']\n"
        "sys.exit(run_site(policy, dead, port, write_runtime_secret(policy.state_dir)))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(policy)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 305 % 256, done.stderr[-3000:]


def test_the_task_zygote_forks_a_process_per_task_that_reads_the_policy_afresh(tmp_path, monkeypatch):
    """Each task runs in its own forked process (never in the zygote), with the policy as the file says now."""
    import os
    import signal
    import time

    from fedtl.client import launcher

    path = init_policy(tmp_path / "site.toml", site_name="s", data="digits", backbones=["tiny"], label_names=[])
    seen = tmp_path / "seen"
    seen.mkdir()

    def fake_task(policy, address, token, task_type):
        (seen / token).write_text(json.dumps([os.getpid(), policy.site_name, address, task_type]))
        return 0

    monkeypatch.setattr(launcher, "run_task", fake_task)
    path.write_text(path.read_text().replace('name = "s"', 'name = "renamed"', 1))  # edited after the zygote started
    lines = "".join(json.dumps({"token": t, "task-type": "clientapp"}) + "\n" for t in ("t1", "t2"))
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    before = signal.getsignal(signal.SIGCHLD)
    try:
        assert launcher.serve_tasks(path, "127.0.0.1:9") == 0  # returns at end of input, in this (the zygote's) process
    finally:
        signal.signal(signal.SIGCHLD, before)
    deadline = time.time() + 30
    while len(list(seen.iterdir())) < 2:
        assert time.time() < deadline, "the forked tasks did not run"
        time.sleep(0.05)
    time.sleep(0.2)  # the files are written before the children exit; let them finish writing
    runs = {p.name: json.loads(p.read_text()) for p in seen.iterdir()}
    assert {name: run[1:] for name, run in runs.items()} == {
        "t1": ["renamed", "127.0.0.1:9", "clientapp"],
        "t2": ["renamed", "127.0.0.1:9", "clientapp"],
    }
    pids = {run[0] for run in runs.values()}
    assert len(pids) == 2 and os.getpid() not in pids  # one process each, neither the zygote


def test_the_task_zygote_is_started_without_the_token_or_the_environments_python_path(tmp_path):
    from fedtl.client.launcher import TaskZygote
    from fedtl.client.policy import load_policy

    policy = load_policy(
        init_policy(tmp_path / "site.toml", site_name="s", data="digits", backbones=["tiny"], label_names=[])
    )
    zygote = TaskZygote.start(policy, "127.0.0.1:9")
    try:
        argv = zygote.process.args
        assert argv[:4] == [sys.executable, "-I", "-m", "fedtl.client.launcher"] and "--tasks" in argv
        assert zygote.send("secret-token", "clientapp")  # by its stdin pipe, never argv or environment
        assert "secret-token" not in " ".join(argv)
    finally:
        zygote.process.stdin.close()  # end of input: it stops
        zygote.process.wait(timeout=60)
    assert not zygote.send("late", "clientapp")  # a stopped zygote is reported, so the launcher starts another
