"""Nothing silent: faults on purpose end in one clear message and a documented exit code, or in a correct result."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from flwr.supercore.run import Run

from fedtl.cli import EXIT_ENVIRONMENT, EXIT_FEDERATION_FAILED, EXIT_OK
from fedtl.cli.main import main
from fedtl.client.admin import init_policy
from fedtl.client.client_app import app as client_app
from fedtl.client.ledger import PrivacyLedger
from fedtl.client.policy import load_policy
from fedtl.server.app import run_federation
from fedtl.shared.config import RunConfig
from fedtl.shared.errors import FederationError
from fedtl.simulations.inprocess import InProcessGrid, _task_identity

TINY_RUN = ["--executor", "inprocess", "--backbone", "tiny", "--set", "federated-evaluation=false"]


def _simulate(argv, capsys):
    code = main(["simulate", *TINY_RUN, *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("fedtl: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def tmpfs(tmp_path):
    """A 96 KiB tmpfs (a disk that fills), or skip where this machine cannot mount one."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here to fill a disk on purpose: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_fedtl_home_stops_with_one_message_naming_the_path_and_the_fix(tmpfs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FEDTL_HOME", str(tmpfs))
    code, _, err = _simulate(["--sites", "2", "--rounds", "1", "--out", str(tmp_path / "runs")], capsys)
    line = _one_line(err)
    assert code == EXIT_ENVIRONMENT, err
    assert str(tmpfs) in line and "the disk is full: free space there" in line
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing started


def test_a_read_only_fedtl_home_stops_with_one_message_naming_the_path_and_the_fix(
    tmpfs, tmp_path, monkeypatch, capsys
):
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    monkeypatch.setenv("FEDTL_HOME", str(tmpfs))
    code, _, err = _simulate(["--sites", "2", "--rounds", "1", "--out", str(tmp_path / "runs")], capsys)
    line = _one_line(err)
    assert code == EXIT_ENVIRONMENT, err
    assert "Read-only file system" in line and str(tmpfs) in line and "point FEDTL_HOME" in line


def test_bad_data_stops_before_anything_starts_and_leaves_no_run_folder(tmp_path, capsys):
    (tmp_path / "manifest.csv").write_text("path,label\nmissing.png,benign\nalso-missing.png,malignant\n")
    out = tmp_path / "runs"
    code, _, err = _simulate(["--data", str(tmp_path / "manifest.csv"), "--out", str(out)], capsys)
    assert code == 2 and "missing.png" in _one_line(err)
    assert not out.exists() or not any(out.iterdir())


def _real_site(tmp_path, name, *, max_epsilon):
    path = init_policy(tmp_path / name / "site.toml", site_name=name, data="digits", backbones=["tiny"], label_names=[])
    path.write_text(path.read_text().replace("max-epsilon = 24.0", f"max-epsilon = {max_epsilon}"))
    return load_policy(path)


def test_a_run_whose_only_site_has_spent_its_budget_ends_with_the_refusal_not_a_crash(tmp_path):
    policy = _real_site(tmp_path, "hospital-a", max_epsilon=2.0)
    cfg = RunConfig(
        backbone="tiny", num_rounds=1, target_epsilon=2.0, min_available_nodes=1, out=str(tmp_path / "runs")
    )
    grid = InProcessGrid(client_app, num_nodes=1, node_configs=[{"policy": policy.source}])
    run = Run.create_empty(run_id=7)
    grid.set_run(run)
    with _task_identity(run.run_id):
        first = run_federation(grid, cfg)  # spends the site's whole budget
        assert first["all-sites-completed"] and 1.9 < first["epsilon-max"] <= 2.0 * (1 + 1e-6)
        with pytest.raises(FederationError, match=r"no site released its feature sum.*hospital-a: \[budget\]"):
            run_federation(grid, cfg)
    ledger = PrivacyLedger(policy.state_dir / "privacy" / "ledger.jsonl", secret_dir=policy.secret_dir)
    assert len(ledger.charges()) == 2  # nothing more charged


def test_a_tampered_cached_backbone_is_caught_when_its_features_are_used(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FEDTL_HOME", str(tmp_path / "home"))
    argv = ["--sites", "2", "--rounds", "1", "--set", "feature-centering=false", "--out", str(tmp_path / "runs")]
    code, _, err = _simulate(argv, capsys)
    assert code == EXIT_OK, err
    for path in (tmp_path / "home" / "sim-sites").glob("site-*/backbones/*.safetensors"):
        data = bytearray(path.read_bytes())
        data[-1] ^= 1  # one weight changed; its cached features are still on disk
        path.write_bytes(bytes(data))
    code, _, err = _simulate(argv, capsys)
    assert code == EXIT_FEDERATION_FAILED and "Traceback" not in err, err
    line = [line for line in err.splitlines() if line.startswith("fedtl: ") and "WARNING" not in line][-1]
    assert "[backbone-mismatch]" in line and "was modified on disk" in line and "site-0" in line


@pytest.mark.slow
def test_resume_after_kill_9_continues_the_run_with_its_own_sites(tmp_path, capsys):
    """The README's `fedtl simulate --resume runs/<run-id>` after a kill -9: its 3 sites, not the default 5."""
    env = {**os.environ, "FEDTL_HOME": str(tmp_path / "home"), "FLWR_LOG_LEVEL": "INFO"}
    out = tmp_path / "runs"
    command = [sys.executable, "-m", "fedtl.cli.main", "simulate", *TINY_RUN, "--sites", "3", "--rounds", "6"]
    # DP-SGD with 20 local epochs: rounds slow enough to kill the run between them (auto's are faster).
    command += ["--set", "head-solver=dp-sgd", "--set", "local-epochs=20", "--out", str(out)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while True:
            runs = list(out.glob("*/metrics.jsonl"))
            if runs and len(runs[0].read_text().splitlines()) >= 3:  # rounds 0, 1, 2 done
                break
            assert proc.poll() is None and time.time() < deadline, "the run ended or stalled before round 2"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    run_dir = runs[0].parent
    # Anything but the operational keys is refused, with what the run has; so is another number of sites.
    assert main(["simulate", "--resume", str(run_dir), "--rounds", "9"]) == 2
    assert "num-rounds = 9 (the run has 6)" in capsys.readouterr().err
    assert main(["simulate", "--resume", str(run_dir), "--sites", "5"]) == 2
    assert "the run has 3 sites" in capsys.readouterr().err
    # The README's command, on Flower's engine.
    assert main(["simulate", "--resume", str(run_dir)]) == EXIT_OK
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sites"] == ["site-0", "site-1", "site-2"] and summary["resumed-after-round"] >= 2
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == list(range(7))
    for name in summary["sites"]:
        rounds = [
            c.server_round for c in PrivacyLedger(run_dir / "sites" / name / "privacy" / "ledger.jsonl").charges()
        ]
        # The centre once, then every round once: the interrupted round was not charged again.
        assert rounds == [0, *range(1, 7)] or rounds == list(range(1, 7)), (name, rounds)
