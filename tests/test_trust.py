"""The site is the trust boundary, on a real loopback deployment started the README's way.

`fedtl server start` (SuperLink on loopback, Fleet front outside), one site approved with `fedtl site
approve` and started with `fedtl site start`. A hostile party holding only the public `ca.crt` writes
its own Flower app, whose ClientApp reads the site's policy, manifest and images and sends them back:
 1. at the public address it reaches no Control API: `flwr supernode ls` and `flwr run` fail, and a
    raw request to a Control route gets the front's 404;
 2. pushed through the SuperLink's own Control API (as if from the server machine), its run reaches
    the site, which answers with an error reply: the hostile ServerApp receives none of the site's
    data, and the refusal is in the site's audit log;
 3. the approved fedtl app still runs at the site afterwards.
"""

import json
import os
import ssl
import subprocess
import textwrap
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from loopback import BIN, CONNECTION, REPO_ROOT, Loopback
from site_files import save_png, write_csv

from fedtl.client.admin import init_policy
from fedtl.client.approval import build_fab, hash_fab, read_approvals, read_audit
from fedtl.client.policy import load_policy
from fedtl.shared.data import load_dataset

pytestmark = pytest.mark.slow

HOSTILE_CLIENT = '''
"""A ClientApp that reads the site's data files and sends them back."""
import tomllib
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def steal(msg, context):
    policy = Path(context.node_config["policy"])
    site = tomllib.loads(policy.read_text())["site"]
    manifest = policy.parent / site["data"]
    images = sorted(manifest.parent.rglob("*.png"))[:3]
    loot = {"policy": policy.read_text(), "manifest": manifest.read_text()}
    loot.update({p.name: p.read_bytes() for p in images})
    return Message(RecordDict({"loot": ConfigRecord(loot)}), reply_to=msg)
'''

HOSTILE_SERVER = '''
"""A ServerApp that asks every site for its data and writes whatever comes back."""
import json
import time
from pathlib import Path

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import ServerApp

app = ServerApp()


@app.main()
def main(grid, context):
    out = Path(context.run_config["out"])
    deadline = time.time() + 120
    while not (nodes := list(grid.get_node_ids())) and time.time() < deadline:
        time.sleep(1)
    messages = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
    replies = []
    for reply in grid.send_and_receive(messages, timeout=300):
        if reply.has_error():
            replies.append({"error": reply.error.reason})
        else:
            loot = reply.content.config_records["loot"]
            replies.append({k: v.hex() if isinstance(v, bytes) else v for k, v in loot.items()})
    out.write_text(json.dumps({"nodes": nodes, "replies": replies}))
'''


def _write_hostile_app(folder: Path) -> Path:
    """Write the hostile Flower app folder; return it."""
    package = folder / "hostile_app"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "client.py").write_text(HOSTILE_CLIENT)
    (package / "server.py").write_text(HOSTILE_SERVER)
    (folder / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [build-system]
            requires = ["hatchling"]
            build-backend = "hatchling.build"

            [project]
            name = "hostile"
            version = "1.0.0"
            dependencies = ["flwr"]

            [tool.hatch.build.targets.wheel]
            packages = ["."]

            [tool.flwr.app]
            publisher = "mallory"

            [tool.flwr.app.components]
            serverapp = "hostile_app.server:app"
            clientapp = "hostile_app.client:app"

            [tool.flwr.app.config]
            out = ""
            """
        )
    )
    return folder


def _write_site(root: Path) -> Path:
    """Write a small site: PNGs named by patient identifier and diagnosis, a CSV manifest, its policy."""
    train = load_dataset("digits", seed=0).train
    rng = np.random.default_rng(0)
    rows = []
    for i in range(80):
        name = f"png/patient-{9000 + i}-class{train.labels[i]}.png"
        save_png(root / name, train.images[i])
        rows.append([name, str(train.labels[i]), "test" if rng.random() < 0.25 else "train"])
    write_csv(root / "manifest.csv", rows, header=("path", "label", "split"))
    return init_policy(
        root / "policy.toml", site_name="hospital-a", data="manifest.csv", backbones=["tiny"], label_names=[]
    )


def _fedtl(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "fedtl"), *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    policy = _write_site(root / "hospital-a")
    net = Loopback(root / "flower")
    try:
        t0 = time.time()
        net.start_superlink()
        approved = _fedtl("site", "approve", "--policy", str(policy), str(REPO_ROOT), "--yes", env=net.env)
        assert approved.returncode == 0, approved.stdout + approved.stderr
        assert "clientapp  fedtl.client.client_app:app" in approved.stdout
        net.start_site("hospital-a", policy, approve=False)  # approved above, the README's way
        deadline = time.time() + 180
        while net.online_nodes() < 1:
            assert time.time() < deadline, "the site did not come online:\n" + net.log("hospital-a")
            time.sleep(1)
        print(f"deployment up in {time.time() - t0:.1f} s")
        yield net, root, load_policy(policy)
    finally:
        net.close()


def _hostile_home(net: Loopback, root: Path) -> dict:
    """The hostile party's flwr: only the public address and the public ca.crt."""
    home = root / "mallory-home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "target"\n\n[superlink.target]\naddress = "127.0.0.1:{net.port}"\n'
        f'root-certificates = "{net.certs.ca_cert}"\n'
    )
    return {**net.env, "FLWR_HOME": str(home)}


def _site_secrets(root: Path) -> list[bytes]:
    """Byte strings of the site's data that must never reach the hostile ServerApp (as written or hex-encoded)."""
    site = root / "hospital-a"
    secrets = [b"patient-9000-class", (site / "manifest.csv").read_bytes().splitlines()[1]]
    secrets += [png.read_bytes()[-64:] for png in sorted((site / "png").glob("*.png"))[:3]]
    return secrets + [s.hex().encode() for s in secrets]


def test_the_public_address_serves_no_control_api(deployment):
    net, root, _ = deployment
    env = _hostile_home(net, root)
    hostile = _write_hostile_app(root / "mallory" / "hostile")
    for args in (
        ["supernode", "ls", "target", "--format", "json"],
        ["run", str(hostile), "target", "--format", "json"],
    ):
        done = subprocess.run([str(BIN / "flwr"), *args], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 or '"success": false' in done.stdout, done.stdout + done.stderr
        assert '"run-id"' not in done.stdout and '"nodes"' not in done.stdout
    # The same request that lists runs on the SuperLink's own port is answered 404 by the front.
    tls = ssl.create_default_context(cafile=str(net.certs.ca_cert))
    with httpx.Client(verify=tls) as client:
        front = client.post(f"https://127.0.0.1:{net.port}/v1/control/list-runs", content=b"")
        runtime = client.post(f"https://127.0.0.1:{net.port}/v1/runtime/acquire-task", content=b"")
        fleet = client.post(f"https://127.0.0.1:{net.port}/v1/fleet/pull-messages", content=b"")
        inside = client.post(f"https://127.0.0.1:{net.control_port}/v1/control/list-runs", content=b"")
    assert front.status_code == runtime.status_code == 404 and "serves only the Fleet API" in front.text
    assert fleet.status_code != 404  # forwarded: the SuperLink itself turns the unsigned request away
    assert inside.status_code != 404  # the Control API is there, on loopback
    assert all(r["event"] != "refused" for r in read_audit(deployment[2].state_dir))  # nothing reached the site


def test_a_hostile_app_gets_nothing_and_the_refusal_is_audited(deployment):
    net, root, policy = deployment
    hostile = _write_hostile_app(root / "mallory-inside" / "hostile")
    out = root / "mallory-inside" / "loot.json"
    done = net.flwr("run", str(hostile), CONNECTION, "--format", "json", "--run-config", f'out="{out}"', timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    run_id = int(json.loads(done.stdout)["run-id"])
    assert net.wait(run_id, timeout=400).startswith("finished"), net.run_log(run_id)
    assert out.is_file(), net.run_log(run_id)
    loot = json.loads(out.read_text())
    assert len(loot["nodes"]) == 1 and len(loot["replies"]) == 1
    (reply,) = loot["replies"]
    assert set(reply) == {"error"} and "runs only apps its operator approved" in reply["error"]
    written = out.read_bytes()
    assert not [s for s in _site_secrets(root) if s in written]
    sha = hash_fab(build_fab(hostile))
    (refusal,) = [r for r in read_audit(policy.state_dir) if r["event"] == "refused"]
    assert (refusal["run-id"], refusal["fab-sha256"], refusal["app"]) == (run_id, sha, "mallory/hostile==1.0.0")
    assert sha not in read_approvals(policy.state_dir)
    assert (policy.state_dir / "apps" / "pending" / f"{sha}.fab").read_bytes() == build_fab(hostile)
    shown = _fedtl("site", "audit", "--policy", str(policy.source), env=net.env)
    assert shown.returncode == 0 and "refused" in shown.stdout and sha[:12] in shown.stdout
    # The operator cannot approve it either: its ClientApp is not the installed fedtl one.
    approve = _fedtl("site", "approve", "--policy", str(policy.source), sha, "--yes", env=net.env)
    assert approve.returncode == 2 and "names clientapp 'hostile_app.client:app'" in approve.stderr


def test_the_approved_app_still_runs_afterwards(deployment):
    net, root, policy = deployment
    out = root / "runs"
    config = dict(
        backbone="tiny", data="digits", out=str(out), num_rounds=1, local_epochs=1, target_epsilon=4.0,
        min_available_nodes=1, min_train_sites=1, run_name="after", round_timeout=300.0,
    )  # fmt: skip
    run_id = net.run(" ".join(f"{k.replace('_', '-')}={json.dumps(v)}" for k, v in config.items()))
    assert net.wait(run_id, timeout=600) == "finished:completed", net.run_log(run_id)
    (run_dir,) = [p for p in out.iterdir() if "-after-" in p.name]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sites"] == ["hospital-a"] and not summary["refused-sites"]
    ran = [r for r in read_audit(policy.state_dir) if r["event"] == "ran" and r["run-id"] == run_id]
    assert ran and {r["fab-sha256"] for r in ran} == {hash_fab(build_fab(REPO_ROOT))}
    assert {r["message-type"] for r in ran} >= {"query", "train"}
    assert os.path.getsize(policy.state_dir / "privacy" / "ledger.jsonl") > 0
