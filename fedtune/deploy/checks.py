"""Checks of credential files before anything starts: one-line errors instead of a failing
SuperLink or SuperNode later (missing files, wrong formats, a key that is not the
certificate's)."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedtune.deploy.certs import Credentials
from fedtune.deploy.errors import DeployError

NIST_CURVES = ("secp256r1", "secp384r1", "secp521r1")  # what Flower's node authentication accepts


def require_files(*paths: str | Path | None) -> None:
    """One-line error for the first credential file that is missing."""
    for p in paths:
        if p is not None and not Path(p).is_file():
            raise DeployError(f"credential file not found: {p} (make a test set with 'fedtune certs DIR')")


def check_public_key(path: str | Path) -> None:
    """A node public key Flower accepts: OpenSSH format, EC on a NIST curve."""
    try:
        key = serialization.load_ssh_public_key(Path(path).read_bytes())
    except (ValueError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in NIST_CURVES:
        raise DeployError(f"bad node public key {path}: expected an OpenSSH EC key on a NIST curve "
                          "(ssh-keygen -t ecdsa -b 384, or fedtune certs)")


def check_private_key(path: str | Path) -> None:
    """A node private key Flower loads: OpenSSH format, unencrypted, EC on a NIST curve."""
    try:
        key = serialization.load_ssh_private_key(Path(path).read_bytes(), None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in NIST_CURVES:
        raise DeployError(f"bad node private key {path}: expected an unencrypted OpenSSH EC key on a NIST curve "
                          "(ssh-keygen -t ecdsa -b 384 -N '', or fedtune certs)")


def check_server_files(creds: Credentials) -> None:
    """The SuperLink's certificate and key exist, parse, and belong together."""
    require_files(creds.ca, creds.server_cert, creds.server_key)
    try:
        x509.load_pem_x509_certificate(creds.ca.read_bytes())
        cert = x509.load_pem_x509_certificate(creds.server_cert.read_bytes())
        key = serialization.load_pem_private_key(creds.server_key.read_bytes(), None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise DeployError(f"unreadable TLS files in {creds.folder} (PEM, unencrypted key expected): {exc}") from None
    if cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != \
            key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise DeployError(f"{creds.server_key} is not the key of {creds.server_cert}")
