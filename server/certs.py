"""The federation's PKI at the centre: a CA, the server's TLS certificate, the sites' public keys.

Layout of ``server.cert_dir``::

    ca.crt          federation CA certificate; every site gets a copy
    ca.key          CA private key (0600); move it offline once certificates are issued
    server.crt      the server's TLS certificate, issued by ca.crt, with SANs for its names and IPs
    server.key      its private key (0600)
    sites/<name>.pub  each allow-listed site's node-authentication public key (OpenSSH)

Nothing is ever overwritten: a second ``init`` reuses the CA and refuses to
replace an existing server certificate, so a typo cannot cut every site off.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.pki import (
    CertificateError,
    load_certificate,
    load_node_public_key,
    load_private_pem,
    openssh_public,
    require_ca,
    require_issued_by,
    require_key_matches,
    write_private,
)
from common.runs import CA_CERT, CA_KEY, NODE_KEYS_DIR, PUBLIC_KEY_SUFFIX, SERVER_CERT, SERVER_KEY

CA_DAYS = 3650
SERVER_DAYS = 825
"""Longest server-certificate lifetime common TLS clients accept."""
LOOPBACK_NAMES = ("localhost",)
LOOPBACK_IPS = ("127.0.0.1",)
"""Always in the server certificate: the launcher reaches its own SuperLink over loopback."""
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
INIT_FIX = "create it with `fedseg-server certs init --config federation.yaml --name <server DNS name>`."


@dataclass(frozen=True)
class ServerMaterial:
    """Checked paths of the TLS files the SuperLink and the Fleet gateway use."""

    ca_cert: Path
    cert: Path
    key: Path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedseg federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _create_ca(cert_dir: Path, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedseg federation CA"))
        .issuer_name(_name("fedseg federation CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    write_private(cert_dir / CA_KEY, _pem_key(key))
    (cert_dir / CA_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _load_ca(cert_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca = load_certificate(cert_dir / CA_CERT, "federation CA certificate", INIT_FIX)
    require_ca(ca, cert_dir / CA_CERT)
    key = load_private_pem(cert_dir / CA_KEY, "CA private key", "bring ca.key back from where it is kept offline.")
    require_key_matches(ca, cert_dir / CA_CERT, key, cert_dir / CA_KEY)
    return ca, key


def _subject_alt_names(names: list[str], ips: list[str]) -> list[x509.GeneralName]:
    alt: list[x509.GeneralName] = [x509.DNSName(n) for n in dict.fromkeys([*names, *LOOPBACK_NAMES])]
    for ip in dict.fromkeys([*ips, *LOOPBACK_IPS]):
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise CertificateError(f"'{ip}' is not an IP address; pass host names with --name.") from None
    return alt


def issue_server_certificate(cert_dir: Path, names: list[str], ips: list[str], days: int = SERVER_DAYS) -> Path:
    """Issue ``server.crt`` for the given DNS names and IPs, signed by the federation CA."""
    ca, ca_key = _load_ca(cert_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    common_name = names[0] if names else (ips[0] if ips else LOOPBACK_NAMES[0])
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(_subject_alt_names(names, ips)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    write_private(cert_dir / SERVER_KEY, _pem_key(key))
    path = cert_dir / SERVER_CERT
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def init_pki(cert_dir: Path, names: list[str], ips: list[str], days: int = SERVER_DAYS) -> list[str]:
    """Create the CA (unless it exists) and the server certificate; returns what was done."""
    cert_dir = Path(cert_dir)
    cert_dir.mkdir(parents=True, exist_ok=True)
    for existing in (SERVER_CERT, SERVER_KEY):
        if (cert_dir / existing).exists():
            raise CertificateError(
                f"{cert_dir / existing} already exists; move server.crt and server.key away "
                "first to issue a new server certificate."
            )
    done = []
    if not (cert_dir / CA_CERT).exists():
        _create_ca(cert_dir, CA_DAYS)
        done.append(f"created the federation CA {cert_dir / CA_CERT} (key {cert_dir / CA_KEY}, mode 0600)")
    path = issue_server_certificate(cert_dir, names, ips, days)
    done.append(f"issued {path} for {', '.join([*names, *ips, *LOOPBACK_NAMES, *LOOPBACK_IPS])}")
    return done


def check_server_material(cert_dir: Path) -> ServerMaterial:
    """Refuse to start on a missing, expired, foreign or mismatched server certificate."""
    cert_dir = Path(cert_dir)
    ca = load_certificate(cert_dir / CA_CERT, "federation CA certificate", INIT_FIX)
    require_ca(ca, cert_dir / CA_CERT)
    cert = load_certificate(cert_dir / SERVER_CERT, "server certificate", INIT_FIX)
    require_issued_by(cert, cert_dir / SERVER_CERT, ca, cert_dir / CA_CERT)
    key = load_private_pem(cert_dir / SERVER_KEY, "server private key", INIT_FIX)
    require_key_matches(cert, cert_dir / SERVER_CERT, key, cert_dir / SERVER_KEY)
    return ServerMaterial(cert_dir / CA_CERT, cert_dir / SERVER_CERT, cert_dir / SERVER_KEY)


def site_key_path(cert_dir: Path, site: str) -> Path:
    return Path(cert_dir) / NODE_KEYS_DIR / f"{site}{PUBLIC_KEY_SUFFIX}"


def add_site_key(cert_dir: Path, site: str, public_key: Path) -> Path:
    """Put a site's public key on the allow-list, refusing duplicates and bad keys."""
    if not SITE_NAME.match(site):
        raise CertificateError(f"site name '{site}' must be letters, digits, '.', '_' or '-' (at most 63).")
    key = load_node_public_key(public_key)
    target = site_key_path(cert_dir, site)
    for other, other_key in site_keys(cert_dir).items():
        if openssh_public(other_key) == openssh_public(key) and other != site:
            raise CertificateError(
                f"{public_key}: this key is already registered for site '{other}'; every site needs its own key."
            )
    if target.exists():
        if openssh_public(load_node_public_key(target)) == openssh_public(key):
            return target
        raise CertificateError(
            f"{target} already holds a different key for site '{site}'; remove it first "
            "if the site really has a new key."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(public_key, target)
    return target


def site_keys(cert_dir: Path) -> dict[str, ec.EllipticCurvePublicKey]:
    """Every registered site key, by site name."""
    folder = Path(cert_dir) / NODE_KEYS_DIR
    if not folder.is_dir():
        return {}
    return {
        p.name[: -len(PUBLIC_KEY_SUFFIX)]: load_node_public_key(p) for p in sorted(folder.glob(f"*{PUBLIC_KEY_SUFFIX}"))
    }


def allow_list(cert_dir: Path, sites: list[str]) -> dict[str, ec.EllipticCurvePublicKey]:
    """The public keys of the federation's sites; every listed site must have one."""
    if not sites:
        raise CertificateError("federation.sites is empty: list the site names allowed to join in federation.yaml.")
    keys = site_keys(cert_dir)
    missing = [s for s in sites if s not in keys]
    if missing:
        raise CertificateError(
            f"no public key for site(s) {', '.join(missing)} in {Path(cert_dir) / NODE_KEYS_DIR}; add each with "
            "`fedseg-server certs add-site --site NAME --key NAME.pub`."
        )
    return {s: keys[s] for s in sites}
