"""TLS material for a deployed federation: a private CA, the SuperLink's certificate and SuperNode key pairs."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtl.shared.errors import ConfigError

CA_CERT_NAME = "ca.crt"
CA_KEY_NAME = "ca.key"
SERVER_CERT_NAME = "server.pem"
SERVER_KEY_NAME = "server.key"
SUPERNODE_KEY_PREFIX = "supernode-"

# NIST P-384: accepted by TLS everywhere, and the curve Flower's SuperNode authentication documents.
_CURVE = ec.SECP384R1
_CLOCK_SKEW = datetime.timedelta(minutes=5)
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class CertificatePaths:
    """Where `generate_certificates` wrote the CA and the SuperLink server certificate."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def generate_certificates(
    out_dir: Path,
    *,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    days: int = 365,
    overwrite: bool = False,
) -> CertificatePaths:
    """Write a private CA and a SuperLink server certificate it signs, for `flower-superlink --ssl-*`.

    Args:
        out_dir: folder to write `ca.crt`, `ca.key`, `server.pem` and `server.key` to (created if absent).
        hosts: names and addresses clients dial the SuperLink by; IP literals become IP subjectAltNames,
            everything else DNS subjectAltNames. The first one is the certificate's common name. Keep
            127.0.0.1: the SuperLink's own ServerApp runner (flower-superexec) dials 127.0.0.1:<port> with the CA.
        days: validity of both certificates, in days from now.
        overwrite: replace existing files instead of refusing.

    Returns:
        CertificatePaths of the four files; the private keys are 0600.

    Raises:
        ConfigError: `hosts` empty or holding a blank/invalid entry, `days` < 1, or one of the files
            already exists and `overwrite` is False.
    """
    out_dir = Path(out_dir)
    sans = _subject_alt_names(hosts)
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ConfigError(f"certificate validity `days` must be an integer >= 1, got {days!r}")
    paths = CertificatePaths(
        ca_cert=out_dir / CA_CERT_NAME,
        ca_key=out_dir / CA_KEY_NAME,
        server_cert=out_dir / SERVER_CERT_NAME,
        server_key=out_dir / SERVER_KEY_NAME,
    )
    _refuse_existing([paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key], overwrite)

    now = datetime.datetime.now(datetime.timezone.utc)
    not_before, not_after = now - _CLOCK_SKEW, now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(_CURVE())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtl private CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(_CURVE())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(hosts[0]).strip())]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    _write(paths.ca_key, _pem_private_key(ca_key), private=True)
    _write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(paths.server_key, _pem_private_key(server_key), private=True)
    _write(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    return paths


def generate_supernode_keys(
    out_dir: Path, names: Sequence[str], *, overwrite: bool = False
) -> dict[str, tuple[Path, Path]]:
    """Write one ECDSA P-384 key pair per site for SuperNode authentication (`--enable-supernode-auth`).

    The private key is an OpenSSH private key (what `flower-supernode --auth-supernode-private-key` loads),
    the public key a one-line OpenSSH public key (what `flwr supernode register <file>` loads).

    Args:
        out_dir: folder to write `supernode-<name>.key` and `supernode-<name>.pub` to (created if absent).
        names: site names, unique, made of letters, digits, '.', '_' and '-' (not starting with '.', '_', '-').
        overwrite: replace existing files instead of refusing.

    Returns:
        {name: (private key path, public key path)} in the order of `names`; private keys are 0600.

    Raises:
        ConfigError: `names` empty, duplicated or not usable as a file name, or one of the files already
            exists and `overwrite` is False.
    """
    out_dir = Path(out_dir)
    if isinstance(names, str):
        raise ConfigError(
            f"`names` must be a sequence of site names, got the single string {names!r}; wrap it in a list"
        )
    names = list(names)
    if not names:
        raise ConfigError("`names` is empty; pass one site name per SuperNode, e.g. ['site-0', 'site-1']")
    for name in names:
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise ConfigError(
                f"site name {name!r} cannot name a key file; use letters, digits, '.', '_' and '-' "
                "and start with a letter or digit"
            )
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"site names must be unique, got {', '.join(duplicates)} more than once")

    paths = {
        name: (out_dir / f"{SUPERNODE_KEY_PREFIX}{name}.key", out_dir / f"{SUPERNODE_KEY_PREFIX}{name}.pub")
        for name in names
    }
    _refuse_existing([path for pair in paths.values() for path in pair], overwrite)

    for name, (private_path, public_path) in paths.items():
        key = ec.generate_private_key(_CURVE())
        private = key.private_bytes(
            encoding=serialization.Encoding.PEM,
            format=serialization.PrivateFormat.OpenSSH,
            encryption_algorithm=serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            encoding=serialization.Encoding.OpenSSH, format=serialization.PublicFormat.OpenSSH
        )
        _write(private_path, private, private=True)
        _write(public_path, public + f" fedtl-{name}\n".encode("ascii"), private=False)
    return paths


def _subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """Turn host names and IP literals into subjectAltName entries, rejecting blanks and bad names."""
    if isinstance(hosts, str):
        raise ConfigError(
            f"`hosts` must be a sequence of host names, got the single string {hosts!r}; wrap it in a list"
        )
    hosts = list(hosts)
    if not hosts:
        raise ConfigError(
            "`hosts` is empty; pass the names clients dial the SuperLink by, e.g. ['localhost', '127.0.0.1']"
        )
    sans: list[x509.GeneralName] = []
    for host in hosts:
        text = host.strip() if isinstance(host, str) else ""
        if not text:
            raise ConfigError(f"host {host!r} is blank or not a string; pass a DNS name or an IP address")
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(text.strip("[]"))))
            continue
        except ValueError:
            pass
        if not text.isascii() or any(c.isspace() or c in "/:@" for c in text):
            raise ConfigError(
                f"host {host!r} is neither an IP address nor an ASCII DNS name; drop the scheme, port or path "
                "(write internationalized names in their xn-- form)"
            )
        sans.append(x509.DNSName(text))
    return sans


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    """KeyUsage of a CA (certificate and CRL signing) or of an ECDSA TLS server (signatures)."""
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _pem_private_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Serialize a private key as unencrypted PKCS#8 PEM (what uvicorn's `ssl_keyfile` loads)."""
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def _refuse_existing(paths: Sequence[Path], overwrite: bool) -> None:
    """Raise ConfigError naming every path that exists, unless `overwrite` is set."""
    if overwrite:
        return
    existing = [str(path) for path in paths if path.exists()]
    if existing:
        raise ConfigError(
            f"refusing to overwrite existing {', '.join(existing)}; pass --force (overwrite=True in Python) to replace "
            "them (clients trusting the old CA or keys must then be given the new files), "
            "or write to another folder"
        )


def _write(path: Path, data: bytes, *, private: bool) -> None:
    """Write `data` atomically; private keys get mode 0600 from creation on, whatever the umask."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # created 0600
    try:
        if not private:
            mask = os.umask(0o022)
            os.umask(mask)
            os.fchmod(fd, 0o644 & ~mask)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if private:
            os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
