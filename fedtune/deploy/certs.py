"""Credentials of a test federation: a self-signed CA, the SuperLink's TLS certificate, and
one key pair per SuperNode for node authentication.

TLS: the SuperLink serves ``server.pem``/``server.key`` signed by ``ca.pem``; every SuperNode
and ``flwr`` trust ``ca.pem``. Node authentication (Flower 1.41): each SuperNode signs its
requests with its EC private key (OpenSSH format, NIST P-384); the SuperLink accepts only
nodes whose public key was registered with it (``flwr supernode register node-N.pub``).
For a test federation, not for production (no revocation, a CA key on the same disk).
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtune.artifacts import atomic_write
from fedtune.deploy.errors import DeployError

CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
VALID_DAYS = 365


@dataclass(frozen=True)
class Credentials:
    """Paths of one folder written by :func:`make_credentials`."""

    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / CA_CERT

    @property
    def server_cert(self) -> Path:
        return self.folder / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.folder / SERVER_KEY

    def node_key(self, i: int) -> Path:
        return self.folder / f"node-{i}.key"

    def node_pub(self, i: int) -> Path:
        return self.folder / f"node-{i}.pub"

    def node_pubs(self) -> list[Path]:
        return sorted(self.folder.glob("node-*.pub"), key=lambda p: int(p.stem.split("-")[1]))


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Atomic write; private keys readable by the owner only."""
    atomic_write(path, data, 0o600 if private else None)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def _cert(subject: str, key, issuer: x509.Name | None, issuer_key, extensions) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=VALID_DAYS)))
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


def check_hosts(hosts: Sequence[str]) -> None:
    for h in hosts:
        ok = bool(h) and all(c.isalnum() or c in "-.:" for c in h)
        if not ok:
            raise DeployError(f"bad host name {h!r} for the server certificate: use a DNS name or an IP address")


def make_credentials(out: str | Path, nodes: int = 3, hosts: Sequence[str] = ()) -> Credentials:
    """Write ``ca.pem``/``ca.key``, ``server.pem``/``server.key`` (valid for localhost,
    127.0.0.1, ::1 and ``hosts``) and ``node-<i>.key``/``node-<i>.pub`` for i < ``nodes``."""
    if nodes < 0:
        raise DeployError(f"bad --nodes {nodes}: must be >= 0")
    all_hosts = list(dict.fromkeys([*DEFAULT_HOSTS, *hosts]))
    check_hosts(all_hosts)
    creds = Credentials(Path(out))
    existing = [p.name for p in (creds.ca, creds.server_key, creds.node_key(0)) if p.exists()]
    if existing:
        raise DeployError(f"{creds.folder} already holds credentials ({', '.join(existing)}): "
                          "choose another folder, or delete them first (nodes using them will be refused)")
    creds.folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = _cert("fedtune test CA", ca_key, None, ca_key, [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                       encipher_only=False, decipher_only=False), True),
    ])
    srv_key = ec.generate_private_key(ec.SECP384R1())
    srv = _cert("fedtune superlink", srv_key, ca.subject, ca_key, [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (_san(all_hosts), False),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
    ])
    _write(creds.ca, ca.public_bytes(serialization.Encoding.PEM))
    _write(creds.folder / CA_KEY, _pem_key(ca_key), private=True)
    _write(creds.server_cert, srv.public_bytes(serialization.Encoding.PEM))
    _write(creds.server_key, _pem_key(srv_key), private=True)
    for i in range(nodes):
        make_node_key(creds.node_key(i), creds.node_pub(i))
    return creds


def make_node_key(private: Path, public: Path) -> None:
    """One SuperNode's key pair, OpenSSH format, P-384 (what Flower's node auth loads)."""
    key = ec.generate_private_key(ec.SECP384R1())
    _write(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                      serialization.NoEncryption()), private=True)
    _write(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
