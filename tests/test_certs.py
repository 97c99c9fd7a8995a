"""Certificates and node keys: made with cryptography, refused with a message naming the file and why."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from client.cli import main as client_main
from common.pki import CertificateError, load_node_private_key, load_node_public_key
from server import certs
from server.cli import main as server_main


@pytest.fixture
def pki(tmp_path):
    certs.init_pki(tmp_path / "certs", ["fedseg.example.org"], ["10.0.0.5"])
    return tmp_path / "certs"


def _reissue_expired(cert_dir):
    """Replace server.crt with one the same CA signed but that expired yesterday."""
    ca = x509.load_pem_x509_certificate((cert_dir / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((cert_dir / "ca.key").read_bytes(), None)
    key = serialization.load_pem_private_key((cert_dir / "server.key").read_bytes(), None)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(ca.subject)
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(days=30))
        .not_valid_after(now - dt.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    (cert_dir / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_init_makes_a_ca_and_a_server_certificate_with_the_requested_names(pki):
    material = certs.check_server_material(pki)
    cert = x509.load_pem_x509_certificate(material.cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"fedseg.example.org", "localhost"}
    assert set(sans.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("127.0.0.1"),
    }
    for private in ("ca.key", "server.key"):
        assert stat.S_IMODE(os.stat(pki / private).st_mode) == 0o600


def test_init_never_overwrites_the_server_certificate(pki):
    before = (pki / "server.crt").read_bytes()
    with pytest.raises(CertificateError, match="already exists"):
        certs.init_pki(pki, ["other"], [])
    assert (pki / "server.crt").read_bytes() == before


def test_expired_server_certificate_is_refused_naming_file_and_date(pki):
    _reissue_expired(pki)
    with pytest.raises(CertificateError, match=r"server\.crt: the server certificate expired on"):
        certs.check_server_material(pki)


def test_server_certificate_from_another_ca_is_refused(pki, tmp_path):
    certs.init_pki(tmp_path / "other", [], [])
    (pki / "ca.crt").write_bytes((tmp_path / "other" / "ca.crt").read_bytes())
    with pytest.raises(CertificateError, match=r"server\.crt: this certificate was not issued by the CA in"):
        certs.check_server_material(pki)


def test_key_that_does_not_match_the_certificate_is_refused(pki, tmp_path):
    certs.init_pki(tmp_path / "other", [], [])
    (pki / "server.key").chmod(0o600)
    (pki / "server.key").write_bytes((tmp_path / "other" / "server.key").read_bytes())
    with pytest.raises(CertificateError, match=r"server\.key does not match the certificate"):
        certs.check_server_material(pki)


def _site_yaml(tmp_path, name="hospital-a"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"site": {"name": name, "state_dir": str(tmp_path / name)}}))
    return path


def test_keygen_writes_an_openssh_ec_key_pair_private_0600_and_never_overwrites(tmp_path, capsys):
    site = _site_yaml(tmp_path)
    assert client_main(["keygen", "--config", str(site)]) == 0
    private = tmp_path / "hospital-a" / "keys" / "site.key"
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    key = load_node_private_key(private)
    assert isinstance(key.curve, ec.SECP384R1)
    public = load_node_public_key(private.with_name("site.key.pub"))
    assert public == key.public_key()
    before = private.read_bytes()
    assert client_main(["keygen", "--config", str(site)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert private.read_bytes() == before


def test_a_private_key_readable_by_others_is_refused(tmp_path):
    site = _site_yaml(tmp_path)
    client_main(["keygen", "--config", str(site)])
    private = tmp_path / "hospital-a" / "keys" / "site.key"
    private.chmod(0o644)
    with pytest.raises(CertificateError, match=r"site\.key: the private key is readable by others .*chmod 600"):
        load_node_private_key(private)


def test_add_site_allow_lists_keys_and_refuses_bad_or_duplicate_ones(pki, tmp_path, capsys):
    client_main(["keygen", "--config", str(_site_yaml(tmp_path, "hospital-a"))])
    pub = tmp_path / "hospital-a" / "keys" / "site.key.pub"
    fed = tmp_path / "federation.yaml"
    fed.write_text(yaml.safe_dump({"federation": {"sites": ["hospital-a"]}, "server": {"cert_dir": str(pki)}}))
    assert server_main(["certs", "add-site", "--config", str(fed), "--site", "hospital-a", "--key", str(pub)]) == 0
    assert certs.allow_list(pki, ["hospital-a"])["hospital-a"] == load_node_public_key(pub)
    assert server_main(["certs", "add-site", "--config", str(fed), "--site", "hospital-b", "--key", str(pub)]) == 2
    assert "already registered for site 'hospital-a'" in capsys.readouterr().err
    ed = tmp_path / "ed.pub"
    ed.write_bytes(
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    with pytest.raises(CertificateError, match=r"ed\.pub: node keys must be EC keys"):
        certs.add_site_key(pki, "hospital-c", ed)
    with pytest.raises(CertificateError, match=r"no public key for site\(s\) hospital-d"):
        certs.allow_list(pki, ["hospital-a", "hospital-d"])
    assert server_main(["certs", "list", "--config", str(fed)]) == 0
    assert "hospital-a" in capsys.readouterr().out
