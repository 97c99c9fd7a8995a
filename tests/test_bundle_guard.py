"""The bundle guard refuses an unapproved app bundle before Flower unpacks or imports it.

These tests wrap Flower's real FAB installer around real bundles built from
the repository; the deployment test shows the same refusal end to end.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
from flwr.cli.install import install_from_fab

from client import bundle_guard
from common.bundle import bundle_bytes


@pytest.fixture
def flwr_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    return tmp_path / "flwr-home"


def _tampered(fab: bytes) -> bytes:
    """The same bundle with one extra file, as a hostile server could send."""
    import io
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(fab)) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, src.read(item))
        dst.writestr("client/extra.py", "import os\n")
    return out.getvalue()


def test_an_approved_bundle_is_installed_and_recorded(flwr_home, tmp_path):
    fab = bundle_bytes()
    digest = hashlib.sha256(fab).hexdigest()
    decisions = tmp_path / "bundles.jsonl"
    guarded = bundle_guard.guard_install(install_from_fab, frozenset({digest}), str(decisions))
    installed = guarded(fab, skip_prompt=True)
    assert (Path(installed) / "client" / "client_app.py").is_file()
    assert '"decision": "accepted"' in decisions.read_text()


def test_an_unapproved_bundle_is_refused_before_anything_is_unpacked(flwr_home, tmp_path):
    fab = bundle_bytes()
    approved = frozenset({hashlib.sha256(fab).hexdigest()})
    decisions = tmp_path / "bundles.jsonl"
    guarded = bundle_guard.guard_install(install_from_fab, approved, str(decisions))
    tampered = _tampered(fab)
    with pytest.raises(bundle_guard.BundleNotApproved, match="has not approved app bundle sha256:"):
        guarded(tampered, skip_prompt=True)
    assert not flwr_home.exists() or not any(flwr_home.rglob("*.py"))
    assert hashlib.sha256(tampered).hexdigest() in decisions.read_text()


def test_digests_must_be_sha256_hex():
    assert bundle_guard.parse_approved([" " + "AB" * 32 + " "]) == frozenset({"ab" * 32})
    with pytest.raises(ValueError, match="not a SHA-256 hex digest"):
        bundle_guard.parse_approved(["1.0.0"])


def test_the_guard_fails_closed_when_the_daemon_handed_over_no_valid_list(flwr_home):
    fab = bundle_bytes()
    for env in ({}, {bundle_guard.APPROVED_ENV: ""}, {bundle_guard.APPROVED_ENV: "not-a-digest"}):
        approved = bundle_guard.approved_from_env(env)
        assert approved == frozenset()
        with pytest.raises(bundle_guard.BundleNotApproved):
            bundle_guard.guard_install(install_from_fab, approved, None)(fab, skip_prompt=True)


def test_the_launcher_installs_the_guard_then_hands_over_to_flowers_clientapp_runner(tmp_path):
    launcher = bundle_guard.write_launcher(tmp_path / "bin")
    assert os.access(launcher, os.X_OK)
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    proc = subprocess.run([str(launcher), "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Run a Flower ClientApp" in proc.stdout
