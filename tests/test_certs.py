"""Private CA, SuperLink certificate and SuperNode keys: checked with `cryptography`, then by a real SuperLink."""

import argparse
import ipaddress
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedtl.server.certs import CertificatePaths, generate_certificates, generate_supernode_keys
from fedtl.shared.errors import ConfigError

VENV_BIN = Path(sys.executable).parent


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def certs(tmp_path) -> CertificatePaths:
    return generate_certificates(tmp_path / "certs", hosts=("localhost", "127.0.0.1", "superlink.lan", "::1"))


def test_paths_and_names(tmp_path):
    paths = generate_certificates(tmp_path)
    assert paths == CertificatePaths(
        ca_cert=tmp_path / "ca.crt",
        ca_key=tmp_path / "ca.key",
        server_cert=tmp_path / "server.pem",
        server_key=tmp_path / "server.key",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.crt", "ca.key", "server.key", "server.pem"]


def test_server_certificate_chains_to_the_ca(certs):
    ca, server = _cert(certs.ca_cert), _cert(certs.server_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert server.issuer == ca.subject
    server.verify_directly_issued_by(ca)  # raises on a wrong issuer or a bad signature
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usage
    # The private keys on disk are the ones the certificates carry.
    for key_path, cert in ((certs.ca_key, ca), (certs.server_key, server)):
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert key.public_key() == cert.public_key()


def test_server_certificate_has_dns_and_ip_subject_alt_names(certs):
    san = _cert(certs.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "superlink.lan"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]


def test_validity_follows_days(tmp_path):
    cert = _cert(generate_certificates(tmp_path, days=30).server_cert)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 30 * 86400 <= lifetime.total_seconds() <= 30 * 86400 + 3600


def test_private_keys_are_0600_and_certificates_world_readable(certs):
    assert _mode(certs.ca_key) == 0o600
    assert _mode(certs.server_key) == 0o600
    assert _mode(certs.ca_cert) & 0o444 == 0o444
    assert _mode(certs.server_cert) & 0o444 == 0o444


def test_private_keys_are_0600_under_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        paths = generate_certificates(tmp_path)
        keys = generate_supernode_keys(tmp_path / "keys", ["site-0"])
    finally:
        os.umask(old)
    assert _mode(paths.ca_key) == _mode(paths.server_key) == _mode(keys["site-0"][0]) == 0o600


def test_refuses_to_overwrite_and_names_the_file(certs):
    before = certs.ca_key.read_bytes()
    with pytest.raises(
        ConfigError, match=r"refusing to overwrite existing .*ca\.crt.*pass --force \(overwrite=True in Python\)"
    ):
        generate_certificates(certs.ca_cert.parent)
    assert certs.ca_key.read_bytes() == before


def test_refuses_when_any_single_file_exists(tmp_path):
    (tmp_path / "server.key").write_text("keep me")
    with pytest.raises(ConfigError, match=r"existing .*server\.key; pass --force \(overwrite=True in Python\)"):
        generate_certificates(tmp_path)
    assert (tmp_path / "server.key").read_text() == "keep me"
    assert not (tmp_path / "ca.crt").exists()  # nothing half-written


def test_overwrite_replaces_the_ca(certs):
    old = _cert(certs.ca_cert).fingerprint(_cert(certs.ca_cert).signature_hash_algorithm)
    fresh = generate_certificates(certs.ca_cert.parent, overwrite=True)
    new_ca = _cert(fresh.ca_cert)
    assert new_ca.fingerprint(new_ca.signature_hash_algorithm) != old
    _cert(fresh.server_cert).verify_directly_issued_by(new_ca)
    assert _mode(fresh.ca_key) == 0o600


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hosts": ()}, r"`hosts` is empty"),
        ({"hosts": "localhost"}, r"single string 'localhost'; wrap it in a list"),
        ({"hosts": ("localhost", " ")}, r"host ' ' is blank"),
        ({"hosts": ("https://example.org:443",)}, r"neither an IP address nor an ASCII DNS name; drop the scheme"),
        ({"days": 0}, r"`days` must be an integer >= 1, got 0"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        generate_certificates(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())


def test_supernode_keys_are_openssh_p384_pairs(tmp_path):
    keys = generate_supernode_keys(tmp_path, ["site-0", "site-1"])
    assert list(keys) == ["site-0", "site-1"]
    seen = set()
    for name, (private_path, public_path) in keys.items():
        assert private_path.name == f"supernode-{name}.key" and public_path.name == f"supernode-{name}.pub"
        assert private_path.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        assert public_path.read_text().startswith("ecdsa-sha2-nistp384 ")
        private = serialization.load_ssh_private_key(private_path.read_bytes(), password=None)
        public = serialization.load_ssh_public_key(public_path.read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
        assert private.public_key() == public
        assert _mode(private_path) == 0o600
        seen.add(public_path.read_text().split()[1])
    assert len(seen) == 2


def test_supernode_keys_load_with_flowers_own_loaders(tmp_path):
    """The exact functions `flwr supernode register` and `flower-supernode` parse key files with."""
    register = pytest.importorskip("flwr.cli.supernode.register")
    supernode_cli = pytest.importorskip("flwr.supernode.cli.flower_supernode")
    private_path, public_path = generate_supernode_keys(tmp_path, ["site-0"])["site-0"]
    registered_pem = register.try_load_public_key(public_path)
    private, public = supernode_cli._try_setup_client_authentication(
        argparse.Namespace(auth_supernode_private_key=str(private_path), auth_supernode_public_key=None)
    )
    assert serialization.load_pem_public_key(registered_pem) == public == private.public_key()


def test_supernode_keys_refuse_to_overwrite(tmp_path):
    generate_supernode_keys(tmp_path, ["site-0"])
    with pytest.raises(ConfigError, match=r"refusing to overwrite existing .*supernode-site-0\.key.*overwrite=True"):
        generate_supernode_keys(tmp_path, ["site-1", "site-0"])
    assert not (tmp_path / "supernode-site-1.key").exists()
    fresh = generate_supernode_keys(tmp_path, ["site-0"], overwrite=True)
    assert _mode(fresh["site-0"][0]) == 0o600


@pytest.mark.parametrize(
    ("names", "match"),
    [
        ([], r"`names` is empty"),
        ("site-0", r"single string 'site-0'"),
        (["../evil"], r"site name '\.\./evil' cannot name a key file"),
        (["a", "b", "a"], r"must be unique, got a more than once"),
    ],
)
def test_supernode_keys_bad_names(tmp_path, names, match):
    with pytest.raises(ConfigError, match=match):
        generate_supernode_keys(tmp_path, names)
    assert not any(tmp_path.iterdir())


def _command(binary: Path, *switches: str, **options: object) -> list[str]:
    """`binary --switch --option-name value ...` from keyword arguments (underscores become dashes)."""
    args = [str(binary), *switches]
    for name, value in options.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    return args


def _start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start a Flower process in its own session (so `_stop` can end it and its children), output to `log`."""
    with log.open("wb") as out:
        return subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, deadline_s: float = 60.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            pytest.fail(f"flower-superlink exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"flower-superlink did not listen on {port} within {deadline_s}s:\n{log.read_text()}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


@pytest.mark.slow
def test_real_superlink_tls_and_supernode_auth(tmp_path, certs):
    """A real flower-superlink on these files: TLS verifies with the CA only; auth refuses, then admits, a SuperNode."""
    superlink, supernode, flwr = (VENV_BIN / name for name in ("flower-superlink", "flower-supernode", "flwr"))
    if not (superlink.exists() and supernode.exists() and flwr.exists()):
        pytest.skip(f"flower-superlink/flower-supernode/flwr not installed beside {sys.executable}")
    port = _free_port()
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_LOG_LEVEL": "INFO",  # the checks read INFO lines; `fedtl` commands run earlier set WARNING here
    }
    log = tmp_path / "superlink.log"
    proc = _start(
        _command(
            superlink,
            "--enable-supernode-auth",
            ssl_ca_certfile=certs.ca_cert,
            ssl_certfile=certs.server_cert,
            ssl_keyfile=certs.server_key,
            isolation="process",  # no ServerApp runner: nothing outlives the SuperLink
            host="127.0.0.1",
            port=port,
        ),
        log,
        env,
    )
    try:
        _wait_for_port(port, proc, log)

        # 1. Python's TLS client, trusting only our CA, verifies the chain and both SANs.
        context = ssl.create_default_context(cafile=str(certs.ca_cert))
        for server_hostname in ("localhost", "127.0.0.1"):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with context.wrap_socket(raw, server_hostname=server_hostname) as tls:
                    peer = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
            assert peer == _cert(certs.server_cert)

        # 2. Without the CA (system trust only) the handshake is refused.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with pytest.raises(ssl.SSLCertVerificationError):
                ssl.create_default_context().wrap_socket(raw, server_hostname="localhost")

        # 3. With authentication on, a SuperNode whose key was never registered is turned away.
        private_path, public_path = generate_supernode_keys(tmp_path / "keys", ["site-0"])["site-0"]
        supernode_args = _command(
            supernode,
            superlink=f"127.0.0.1:{port}",
            root_certificates=certs.ca_cert,
            auth_supernode_private_key=private_path,
            isolation="process",  # no ClientApp runner
            max_retries=3,
        )
        refused_log = tmp_path / "supernode-refused.log"
        refused = _start([*supernode_args, "--port", str(_free_port())], refused_log, env)
        try:
            assert refused.wait(timeout=60) != 0, refused_log.read_text()
        finally:
            _stop(refused)
        assert "Failed to activate SuperNode" in refused_log.read_text(), refused_log.read_text()

        # 4. The flwr CLI, given the CA through config.toml, registers the public key over TLS.
        (tmp_path / "flwr-home").mkdir(exist_ok=True)
        (tmp_path / "flwr-home" / "config.toml").write_text(
            f'[superlink]\ndefault = "tls"\n\n[superlink.tls]\naddress = "127.0.0.1:{port}"\n'
            f'root-certificates = "{certs.ca_cert}"\n'
        )
        done = subprocess.run(
            [str(flwr), "supernode", "register", str(public_path), "tls", "--format", "json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert '"success": true' in done.stdout, done.stdout

        # 5. Now the SuperNode holding the matching private key connects over TLS and is let in.
        node_log = tmp_path / "supernode.log"
        node = _start([*supernode_args, "--port", str(_free_port())], node_log, env)
        try:
            end = time.monotonic() + 180  # a loaded 2-core machine can take over a minute
            while "SuperNode ID:" not in node_log.read_text() and node.poll() is None and time.monotonic() < end:
                time.sleep(0.2)
            assert "SuperNode ID:" in node_log.read_text(), node_log.read_text()
            assert node.poll() is None, node_log.read_text()
        finally:
            _stop(node)
    finally:
        _stop(proc)
