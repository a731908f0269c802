"""docker-compose.yml: the SuperLink, the ServerApp executor and three sites, validated without an engine."""

import os
import shutil
import subprocess
from pathlib import Path

import flwr
import pytest
import yaml

from fedtl.client.policy import load_policy
from fedtl.shared.backbones import backbone_state_dict, build_backbone, fingerprint_state_dict

ROOT = Path(__file__).resolve().parents[1]
SITES = ("site-1", "site-2", "site-3")


def _docker_compose(*args: str) -> subprocess.CompletedProcess:
    # A clean environment: Debian's docker-compose is a system-Python program, and variables other
    # tests' libraries leave behind (Ray exports PYTHONPATH) would point it at this venv's packages.
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(["docker-compose", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)


@pytest.fixture(scope="module")
def compose() -> dict:
    """The compose file as docker-compose resolves it when the tool is installed, else as YAML."""
    if shutil.which("docker-compose"):
        done = _docker_compose("config")
        assert done.returncode == 0, done.stderr
        return yaml.safe_load(done.stdout)
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_docker_compose_config_validates_it():
    if not shutil.which("docker-compose"):
        pytest.skip(
            "docker-compose is not installed (Debian: apt-get install -y docker-compose); YAML checks still ran"
        )
    done = _docker_compose("config", "-q")
    assert done.returncode == 0, done.stderr


def test_superlink_serverapp_and_three_sites_with_their_own_volumes_and_secrets(compose):
    services = compose["services"]
    assert set(services) == {"superlink", "serverapp", *SITES}
    link = " ".join(services["superlink"]["command"])
    for flag in ("--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth", "--isolation=process"):
        assert flag in link
    assert "--insecure" not in link
    mounts = {}
    for name in SITES:
        site = services[name]
        command = " ".join(site["command"])
        assert f"--auth-supernode-private-key=/run/secrets/{name}.key" in command and "--insecure" not in command
        assert "--root-certificates=/run/secrets/ca.crt" in command
        assert "ports" not in site  # sites only dial out
        volumes = [v if isinstance(v, str) else f"{v['source']}:{v['target']}" for v in site["volumes"]]
        mounts[name] = volumes
        assert any(v.endswith(":/data:ro") or "/data" in v for v in volumes)
        secrets = [s if isinstance(s, str) else s["source"] for s in site["secrets"]]
        assert set(secrets) == {"ca.crt", f"{name}.key"}  # a site sees its own key only
    flat = [v.split(":")[0] for vs in mounts.values() for v in vs]
    assert len(flat) == len(set(flat))  # no data, policy or ledger volume shared between sites


def test_images_are_pinned_to_the_flwr_release_fedtl_pins(compose):
    for name, service in compose["services"].items():
        tags = [service.get("image", "")] + [service.get("build", {}).get("args", {}).get("BASE", "")]
        for tag in filter(None, tags):
            assert tag.endswith(f":{flwr.__version__}"), f"{name}: {tag} is not pinned to flwr {flwr.__version__}"


def test_the_sites_policies_are_valid_and_allow_the_default_backbone():
    fingerprint = fingerprint_state_dict(backbone_state_dict(build_backbone("efficientnet_lite0")))
    for name in SITES:
        policy = load_policy(ROOT / "deploy" / name / "policy.toml")
        assert (policy.site_name, policy.data, str(policy.state_dir)) == (name, "/data", "/state")
        assert policy.allowed_backbones == (fingerprint,)
