"""Reading and checking the federation's certificates and node keys.

Both ends check their material before they start Flower, because Flower's own
failures (a TLS handshake error, "Unable to parse the private key file") name
neither the file nor the reason. Every refusal here names the file, says what
is wrong with it and what to do.

Two kinds of material exist (see README, "Deploy across hospitals"):

- TLS: a federation CA (``ca.crt``) and the server certificate it issued.
  Sites hold only ``ca.crt`` and use it to verify the server.
- Node authentication: each site's EC key pair in OpenSSH form, which is what
  Flower 1.42's SuperNode (private key) and SuperLink (public key) read.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import stat
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .cli import UserError

NIST_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
"""EC curves Flower's SuperLink accepts for node keys (it checks for NIST curves)."""
PRIVATE_MODE = 0o600
_NodeKey = TypeVar("_NodeKey", ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)
"""A node key of the kind its loader reads."""


class CertificateError(UserError):
    """A certificate or key is missing, unreadable, expired, foreign or mismatched."""


def _read(path: Path, what: str, fix: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise CertificateError(f"{path}: {what} not found; {fix}") from None
    except OSError as err:
        raise CertificateError(f"{path}: cannot read the {what} ({err.strerror}).") from err


def load_certificate(path: Path, what: str, fix: str) -> x509.Certificate:
    """A PEM certificate that is valid now; ``fix`` says how to (re)create it."""
    try:
        cert = x509.load_pem_x509_certificate(_read(path, what, fix))
    except ValueError as err:
        raise CertificateError(f"{path}: not a PEM certificate ({what}); {fix}") from err
    now = dt.datetime.now(dt.UTC)
    if now > cert.not_valid_after_utc:
        raise CertificateError(f"{path}: the {what} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; {fix}")
    if now < cert.not_valid_before_utc:
        raise CertificateError(
            f"{path}: the {what} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC "
            "(check this machine's clock)."
        )
    return cert


def require_ca(cert: x509.Certificate, path: Path) -> None:
    """Refuse a certificate that cannot act as a CA (a leaf passed as ca.crt)."""
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise CertificateError(
            f"{path}: this is not a CA certificate (no basicConstraints CA:TRUE); use the federation's "
            "ca.crt made by `fedseg-server certs init`."
        )


def require_issued_by(cert: x509.Certificate, cert_path: Path, ca: x509.Certificate, ca_path: Path) -> None:
    """Refuse a certificate that the given CA did not sign."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise CertificateError(
            f"{cert_path}: this certificate was not issued by the CA in {ca_path} (another federation's CA?); "
            "re-issue it with `fedseg-server certs init` or use the matching ca.crt."
        ) from None


def load_private_pem(path: Path, what: str, fix: str) -> ec.EllipticCurvePrivateKey:
    """An unencrypted PEM EC private key (the TLS keys fedseg writes)."""
    try:
        key = serialization.load_pem_private_key(_read(path, what, fix), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise CertificateError(f"{path}: not an unencrypted PEM private key ({what}); {fix}") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{path}: the {what} must be an EC key; {fix}")
    return key


def require_key_matches(
    cert: x509.Certificate, cert_path: Path, key: ec.EllipticCurvePrivateKey, key_path: Path
) -> None:
    """Refuse a certificate and private key that do not belong together."""
    if cert.public_key() != key.public_key():
        raise CertificateError(
            f"{key_path} does not match the certificate {cert_path} (mixed-up files?); "
            "re-issue both with `fedseg-server certs init`."
        )


def _check_node_key(key: object, path: Path, kind: type[_NodeKey]) -> _NodeKey:
    if not isinstance(key, kind):
        raise CertificateError(
            f"{path}: node keys must be EC keys (got {type(key).__name__}); make one with `fedseg-client keygen`."
        )
    if not isinstance(key.curve, NIST_CURVES):
        raise CertificateError(
            f"{path}: EC curve {key.curve.name} is not a NIST curve Flower accepts; "
            "make a new key with `fedseg-client keygen`."
        )
    return key


def load_node_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """A site's public node key in OpenSSH form (``ecdsa-sha2-nistp384 AAAA...``)."""
    fix = "ask the site for the .pub file that `fedseg-client keygen` printed."
    try:
        key = serialization.load_ssh_public_key(_read(path, "site public key", fix).strip())
    except (ValueError, UnsupportedAlgorithm) as err:
        raise CertificateError(f"{path}: not an OpenSSH public key; {fix}") from err
    return _check_node_key(key, path, ec.EllipticCurvePublicKey)


def load_node_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The site's private node key in OpenSSH form, readable by its owner only."""
    fix = "create it with `fedseg-client keygen --config site.yaml`."
    data = _read(path, "site private key", fix)
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise CertificateError(
            f"{path}: the private key is readable by others (mode {mode:o}); run `chmod 600 {path}`."
        )
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise CertificateError(f"{path}: not an unencrypted OpenSSH private key; {fix}") from err
    return _check_node_key(key, path, ec.EllipticCurvePrivateKey)


def openssh_public(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def key_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """Short, stable id of a public key (SSH's key fingerprint), for humans comparing keys over the phone."""
    return "SHA256:" + hashlib.sha256(openssh_public(key)).hexdigest()[:32]


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 from the first byte on; never overwrite a key."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    except FileExistsError:
        raise CertificateError(f"{path} already exists; move it away first if you really mean to replace it.") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
