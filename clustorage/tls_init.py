"""``clustorage tls init``: a private CA and node certificates, for users without a PKI.

Made with ``cryptography`` (the ``tls`` extra). The folder is 0700 and every key 0600. A CA
already in the folder is reused, so nodes can be added later; a node's files are never
overwritten. Node certificates serve as both server and client (any node may be the loader)
and name the hosts given, 127.0.0.1 and localhost.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import check_name, private_directory
from .errors import ConfigError

__all__ = ["CA_DAYS", "NODE_DAYS", "init_tls", "issue", "new_key"]

CA_DAYS = 3650
NODE_DAYS = 825
ALWAYS = ("127.0.0.1", "localhost")
EXTRA = "pip install 'clustorage[tls]'"


def _crypto() -> Any:
    try:
        import cryptography  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"'clustorage tls init' needs the cryptography package: {EXTRA}"
        ) from None
    from cryptography import x509

    return x509


def new_key() -> Any:
    """A new private key for a CA or a node (ECDSA P-256: small, quick to handshake)."""
    _crypto()
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _name(common: str) -> Any:
    x509 = _crypto()
    from cryptography.x509.oid import NameOID

    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "clustorage"),
            x509.NameAttribute(NameOID.COMMON_NAME, common),
        ]
    )


def make_ca(key: Any, days: int = CA_DAYS) -> Any:
    """A self-signed CA certificate for ``key``."""
    x509 = _crypto()
    from cryptography.hazmat.primitives import hashes

    name = _name("clustorage CA")
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )


def issue(
    ca_cert: Any,
    ca_key: Any,
    key: Any,
    node: str,
    hosts: Sequence[str],
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    local: bool = True,
) -> Any:
    """A node certificate for ``key``, signed by the CA, naming ``hosts`` (and, if ``local``,
    127.0.0.1 and localhost); valid from ``not_before`` to ``not_after`` (default: now,
    NODE_DAYS on)."""
    x509 = _crypto()
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    names: list[Any] = []
    for host in dict.fromkeys([*hosts, *(ALWAYS if local else ())]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    now = _now()
    start = not_before or now - datetime.timedelta(minutes=5)
    end = not_after or now + datetime.timedelta(days=NODE_DAYS)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(node))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )


def _pem_key(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _pem_cert(cert: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(cert.public_bytes(serialization.Encoding.PEM))


def _write(path: Path, data: bytes, private: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def write_key(path: Path, key: Any) -> None:
    """Write ``key`` as PEM to a new file of mode 0600."""
    _write(path, _pem_key(key), private=True)


def write_cert(path: Path, cert: Any) -> None:
    """Write ``cert`` as PEM to a new file."""
    _write(path, _pem_cert(cert), private=False)


def init_tls(
    directory: str | os.PathLike[str], nodes: Sequence[str], hosts: Sequence[str]
) -> list[str]:
    """Make (or reuse) ``ca.pem``/``ca-key.pem`` in ``directory`` and, for each node,
    ``NODE.pem`` and ``NODE-key.pem``; returns the paths written.

    Raises:
        ConfigError: cryptography is missing (naming the extra), a node name is invalid, or
            a node's files exist already.
    """
    _crypto()
    from cryptography.hazmat.primitives import serialization

    folder = private_directory(Path(directory))
    for node in nodes:
        check_name(node)
        for path in (folder / f"{node}.pem", folder / f"{node}-key.pem"):
            if path.exists():
                raise ConfigError(f"{path} exists already: remove it, or choose another --node")
    made: list[str] = []
    ca_path, ca_key_path = folder / "ca.pem", folder / "ca-key.pem"
    if ca_path.exists() and ca_key_path.exists():
        from cryptography import x509

        ca_cert = x509.load_pem_x509_certificate(ca_path.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
    else:
        ca_key = new_key()
        ca_cert = make_ca(ca_key)
        write_key(ca_key_path, ca_key)
        write_cert(ca_path, ca_cert)
        made += [str(ca_path), str(ca_key_path)]
    for node in nodes:
        key = new_key()
        cert = issue(ca_cert, ca_key, key, node, hosts)
        write_key(folder / f"{node}-key.pem", key)
        write_cert(folder / f"{node}.pem", cert)
        made += [str(folder / f"{node}.pem"), str(folder / f"{node}-key.pem")]
    return made
