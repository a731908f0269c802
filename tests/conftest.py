"""Shared fixtures: paths to the real data beside the checkout, isolated fedtl homes and site secret folders."""

import os
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# A site's ledger key and head default to $XDG_CONFIG_HOME/fedtl/<site name> (client/policy.py): never the
# user's own. Module-scoped deployments use this session folder; every test gets its own below.
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="fedtl-test-config-")


def shared_data_file(name: str) -> Path:
    """Return a file of ../shared/data, or skip the test saying what is missing."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"real data file {path} is absent (MedMNIST files live in ../shared/data beside the checkout)")
    return path


@pytest.fixture
def breastmnist_path() -> Path:
    """The real BreastMNIST file (28x28 grey, 2 classes)."""
    return shared_data_file("breastmnist.npz")


@pytest.fixture(autouse=True)
def _isolated_fedtl_home(tmp_path_factory, monkeypatch):
    """Keep every test's caches and runs out of the user's home."""
    home = tmp_path_factory.mktemp("fedtl-home")
    monkeypatch.setenv("FEDTL_HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("config-home")))
    return home


@pytest.fixture
def flower_identity(monkeypatch):
    """Messages are stamped with the identity of the process that creates them, as in a Flower app process."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)
