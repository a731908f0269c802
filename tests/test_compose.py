"""docker-compose.yml and deploy/ without an engine: the compose file, the Dockerfile, and the helpers
the images and their build use (tests/test_containers.py runs the whole stack on a real engine)."""

import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import flwr
import pytest
import yaml

from fedtl.cli.main import build_parser
from fedtl.cli.server import superlink_command
from fedtl.client.policy import load_policy
from fedtl.server.certs import generate_certificates
from fedtl.shared.backbones import backbone_state_dict, build_backbone, fingerprint_state_dict

ROOT = Path(__file__).resolve().parents[1]
SITES = ("site-1", "site-2", "site-3")
sys.path.insert(0, str(ROOT / "deploy"))
import healthcheck  # noqa: E402  (deploy/ is not a package: these scripts ship in the image as files)
import host_pip  # noqa: E402


def _docker_compose(*args: str) -> subprocess.CompletedProcess:
    # A clean environment: Debian's docker-compose is a system-Python program, and variables other
    # tests' libraries leave behind (Ray exports PYTHONPATH) would point it at this venv's packages.
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(["docker-compose", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)


@pytest.fixture(scope="module")
def compose() -> dict:
    """The compose file as docker-compose resolves it (defaults filled in) when installed, else as YAML."""
    if shutil.which("docker-compose"):
        done = _docker_compose("config")
        assert done.returncode == 0, done.stderr
        return yaml.safe_load(done.stdout)
    text = (ROOT / "docker-compose.yml").read_text()
    return yaml.safe_load(re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text))  # the defaults, as Compose would


def test_docker_compose_config_validates_it():
    if not shutil.which("docker-compose"):
        pytest.skip(
            "docker-compose is not installed (Debian: apt-get install -y docker-compose); YAML checks still ran"
        )
    done = _docker_compose("config", "-q")
    assert done.returncode == 0, done.stderr


def test_superlink_executor_and_three_sites_each_with_their_own_volumes_and_secrets(compose):
    services = compose["services"]
    assert set(services) == {"superlink", "superexec", "flwr", *SITES}
    assert services["flwr"]["profiles"] == ["cli"]  # a tool, not started by `up`
    link = services["superlink"]["command"]
    for flag in ("--certs=/run/secrets", "--isolation=process", "--database=:flwr-in-memory:"):
        assert flag in link  # Flower's in-memory state unless FEDTL_SUPERLINK_DATABASE names a file
    assert "--superexec-auth-secret-file=/run/secrets/superexec.secret" in link and "--insecure" not in link
    assert "--host=127.0.0.1" in link  # the Fleet API for this machine only, unless FEDTL_BIND says otherwise
    control = next(f for f in link if f.startswith("--control-port=")).split("=")[1]
    # The executor and the operator's flwr reach the SuperLink itself on loopback, never the Fleet address.
    assert f"--runtime-api-address=127.0.0.1:{control}" in services["superexec"]["command"]
    assert services["flwr"]["environment"]["FEDTL_CONTROL"] == f"127.0.0.1:{control}"
    sources = {s if isinstance(s, str) else s["source"] for s in services["superlink"]["secrets"]}
    assert sources == {"ca.crt", "server.pem", "server.key", "superexec.secret"}
    mounts = {}
    for name in SITES:
        site = services[name]
        assert site["command"][0] == "start"  # the image's entry point is `fedtl site`
        command = " ".join(site["command"])
        assert f"--auth-key=/run/secrets/{name}.key" in command and "--insecure" not in command
        assert "--root-certificates=/run/secrets/ca.crt" in command and "--policy=/policy/policy.toml" in command
        volumes = [v if isinstance(v, str) else f"{v['source']}:{v['target']}:{v.get('read_only', False)}"
                   for v in site["volumes"]]  # fmt: skip
        mounts[name] = volumes
        assert any(v.endswith(f"{name}/data:/data:True") or v.endswith(f"{name}/data:/data:ro") for v in volumes)
        assert any(v.startswith(f"{name}-state:/state") for v in volumes)
        assert any(v.startswith(f"{name}-secret:/secret") for v in volumes)  # the ledger's key, apart
        secrets = [s if isinstance(s, str) else s["source"] for s in site["secrets"]]
        assert set(secrets) == {"ca.crt", f"{name}.key"}  # a site sees its own key only
    flat = [v.split(":")[0] for vs in mounts.values() for v in vs]
    assert len(flat) == len(set(flat))  # no data, policy, ledger or key volume shared between sites
    assert "ca.key" not in str(compose.get("secrets"))  # the CA's key never enters a container


def test_every_service_is_hardened_restarted_and_health_checked(compose):
    for name, service in compose["services"].items():
        assert "ports" not in service and service["network_mode"] == "host", name  # no NAT, nothing published
        assert service["read_only"] is True and service["init"] is True, name
        if name != "flwr":
            assert service["restart"] == "unless-stopped", name
            assert service["healthcheck"]["test"][:3] == ["CMD", "python3", "/opt/fedtl-deploy/healthcheck.py"]
            assert service["logging"]["options"]["max-size"], name


def test_images_are_pinned_to_the_flwr_release_fedtl_pins(compose):
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert f'org.fedtl.flwr="{flwr.__version__}"' in dockerfile
    # flwr comes from pyproject's pin through the requirements stage; no pip line names a flwr of its own.
    assert not re.search(r"pip install[^\n]*flwr", dockerfile) and "project']['dependencies']" in dockerfile
    for name, service in compose["services"].items():
        assert service["image"].endswith(f":{flwr.__version__}"), f"{name}: {service['image']} is not the default tag"
    # The images run as uid 10001, never root: every target comes after `USER fedtl` and none resets it.
    tail = dockerfile[dockerfile.index("USER fedtl") :]
    assert "USER" not in tail.replace("USER fedtl", "", 1)


def test_the_sites_policies_are_valid_and_allow_the_default_backbone():
    fingerprint = fingerprint_state_dict(backbone_state_dict(build_backbone("efficientnet_lite0")))
    for name in SITES:
        policy = load_policy(ROOT / "deploy" / name / "policy.toml")
        assert (policy.site_name, policy.data, str(policy.state_dir)) == (name, "/data", "/state")
        assert str(policy.secret_dir) == "/secret"  # the compose file's second volume of each site
        assert policy.allowed_backbones == (fingerprint,)


def test_fedtl_server_start_passes_the_executor_and_state_options_to_the_superlink(tmp_path):
    generate_certificates(tmp_path)
    args = build_parser().parse_args(
        ["server", "start", "--certs", str(tmp_path), "--isolation", "process",
         "--superexec-auth-secret-file", "/run/secrets/s.secret", "--database", "/state/link.db"]
    )  # fmt: skip
    command = superlink_command(args)
    assert command[command.index("--isolation") + 1] == "process"
    assert command[command.index("--superexec-auth-secret-file") + 1] == "/run/secrets/s.secret"
    assert command[command.index("--database") + 1] == "/state/link.db"
    assert command[command.index("--host") + 1] == "127.0.0.1"  # the SuperLink itself stays on loopback


def test_the_build_gets_local_indexes_served_first_and_remote_ones_unchanged(tmp_path):
    index = tmp_path / "mirror" / "simple"
    index.mkdir(parents=True)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    cert = tmp_path / "ca.pem"
    cert.write_text("CA")
    settings = {
        "index-url": ["https://pypi.example.org/simple"],
        "extra-index-url": [f"file://{index}"],
        "find-links": [str(wheels), str(tmp_path / "missing")],
        "cert": [str(cert)],
    }
    out = tmp_path / "out"
    out.mkdir()
    served = host_pip.write_build_settings(out, 4321, settings)
    assert served == [index.parent, wheels]  # an index with its parent: its pages link to ../../files/
    conf = (out / "pip.conf").read_text().splitlines()
    assert conf == [
        "[global]",
        "index-url = http://127.0.0.1:4321/0/simple/",
        "extra-index-url = https://pypi.example.org/simple",
        "find-links = http://127.0.0.1:4321/1/",
    ]
    assert (out / "pip-cert").read_text() == "CA"


def test_the_pip_settings_server_serves_its_folders_only(tmp_path):
    (tmp_path / "simple").mkdir()
    (tmp_path / "simple" / "index.html").write_text("ok")
    (tmp_path / "torch-2.13.0+cpu.whl").write_text("wheel")  # pip asks for it as ...%2Bcpu.whl
    (tmp_path.parent / "secret.txt").write_text("no")
    handler = host_pip.functools.partial(host_pip.FolderHandler, folders=[tmp_path])
    with host_pip.http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.server_address[1]

        def get(path: str) -> str:
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
                return s.makefile("rb").read().decode(errors="replace")

        assert get("/0/simple/index.html").startswith("HTTP/1.0 200") and get("/0/simple/index.html").endswith("ok")
        assert get("/0/torch-2.13.0%2Bcpu.whl").endswith("wheel")
        for path in ("/0/../secret.txt", "/1/simple/index.html", "/x/secret.txt", "/0/%2e%2e/secret.txt"):
            assert get(path).startswith("HTTP/1.0 404"), path
        server.shutdown()


def test_the_health_checks_tell_a_live_tls_server_from_a_wrong_certificate_and_a_closed_port(tmp_path):
    certs = generate_certificates(tmp_path / "federation")
    other = generate_certificates(tmp_path / "other")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs.server_cert, certs.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # the listener was closed: done
                return
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    assert healthcheck.main(["tls", f"127.0.0.1:{port}", str(certs.ca_cert)]) == 0
    assert healthcheck.main(["tls", f"127.0.0.1:{port}", str(other.ca_cert)]) == 1  # not our federation's
    assert healthcheck.main(["tcp", f"127.0.0.1:{port}"]) == 0
    listener.shutdown(socket.SHUT_RDWR)  # wakes the thread's accept(); close() alone would not stop listening
    listener.close()
    assert healthcheck.main(["tcp", f"127.0.0.1:{port}"]) == 1
    assert healthcheck.main(["grpc", f"127.0.0.1:{port}"]) == 1
    assert healthcheck.main(["tls", "127.0.0.1"]) == 2  # usage
