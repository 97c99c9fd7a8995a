"""The bundle guard refuses an unapproved app bundle before Flower unpacks or imports it, and the approved
bundle is the exact code Flower imports, whatever the run's metadata says.

These tests wrap Flower's real FAB installer around real bundles built from
the repository, and run Flower's real ClientApp runner (``flwr-clientapp``
behind the guard's ``main``) with only its transport to the SuperNode
replaced; the deployment test shows the refusal end to end.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.cli.install import install_from_fab

from client import bundle_guard
from common.bundle import bundle_bytes


@pytest.fixture
def flwr_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    return tmp_path / "flwr-home"


def _guard(approved: frozenset[str], decisions: Path | None) -> bundle_guard.ApprovedApp:
    """The guard as the launcher sets it up, around Flower's own installer and folder lookup."""
    from flwr.common.config import get_project_dir
    from flwr.supercore.utils import get_flwr_home

    return bundle_guard.ApprovedApp(
        approved, str(decisions) if decisions else None, install_from_fab, get_project_dir, get_flwr_home
    )


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
    installed = _guard(frozenset({digest}), decisions).install(fab, skip_prompt=True)
    assert (Path(installed) / "client" / "client_app.py").is_file()
    assert '"decision": "accepted"' in decisions.read_text()
    assert stat.S_IMODE(flwr_home.stat().st_mode) == 0o700


def test_an_unapproved_bundle_is_refused_before_anything_is_unpacked(flwr_home, tmp_path):
    fab = bundle_bytes()
    approved = frozenset({hashlib.sha256(fab).hexdigest()})
    decisions = tmp_path / "bundles.jsonl"
    tampered = _tampered(fab)
    with pytest.raises(bundle_guard.BundleNotApproved, match="has not approved app bundle sha256:"):
        _guard(approved, decisions).install(tampered, skip_prompt=True)
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
            _guard(approved, None).install(fab, skip_prompt=True)


@pytest.mark.processes
def test_the_launcher_installs_the_guard_then_hands_over_to_flowers_clientapp_runner(tmp_path):
    launcher = bundle_guard.write_launcher(tmp_path / "bin")
    assert os.access(launcher, os.X_OK)
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    proc = subprocess.run([str(launcher), "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Run a Flower ClientApp" in proc.stdout


# --- the folder Flower imports from (issue 21, M3) ------------------------------------------------------------

PROBE_APP = """
import os
from pathlib import Path

from flwr.app import Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

Path(os.environ["PROBE_OUT"]).write_text("{marker}")
app = ClientApp()


@app.train()
def train(msg, context):
    return Message(RecordDict({{"m": MetricRecord({{"ran": 1}})}}), reply_to=msg)
"""

PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"

[tool.flwr.app]
publisher = "probe"

[tool.flwr.app.components]
serverapp = "{module}.app:app"
clientapp = "{module}.app:app"
"""

RUNNER = r'''
"""Flower's real flwr-clientapp behind the guard's main(); only the SuperNode transport is replaced."""
import json, os, sys
from pathlib import Path

from flwr.app import Context, RecordDict
from flwr.supercore.fab import Fab
from flwr.supercore.run import Run
from flwr.supernode.runtime import run_clientapp as runner

from tests.helpers.envelopes import incoming

task = json.loads(os.environ["PROBE_TASK"])
content = Path(task["fab"]).read_bytes()
run = Run.create_empty(1)
run.fab_id, run.fab_version, run.fab_hash = task["fab_id"], task["fab_version"], task["fab_hash"]
message = incoming(RecordDict(), "train", node_id=7)
context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
outcome = {}


class Transport:
    @classmethod
    def from_server_address(cls, **kwargs):
        return cls()

    def close(self):
        pass


class NoHeartbeat:
    is_running = False

    def __init__(self, *args):
        pass

    def start(self):
        pass


def replied(client, reply, context):
    outcome["error"] = reply.error.reason if reply.has_error() else None


def exited(code, *args, **kwargs):
    outcome["exit"] = int(code)
    print("PROBE " + json.dumps(outcome))
    sys.exit(0)


runner.RuntimeHttpClient = Transport
runner.HeartbeatSender = NoHeartbeat
runner.pull_task_input = lambda client: (message, context, run, Fab(task["fab_hash"], content, {}))
runner.push_message = replied
runner.push_task_output = lambda **kwargs: None
runner.flwr_exit = exited
sys.argv = ["flwr-clientapp", "--insecure", "--token", "probe"]
from client.bundle_guard import main

sys.exit(main())
'''


@pytest.fixture
def probe(tmp_path):
    """An approved probe bundle, its digest, and a planted app named like its folder in a world-writable place."""
    from flwr.cli.build import build_fab_from_files

    src = tmp_path / "probe-src"
    (src / "probeapp").mkdir(parents=True)
    (src / "pyproject.toml").write_text(PYPROJECT.format(name="app", module="probeapp"))
    (src / "probeapp" / "__init__.py").write_text("")
    (src / "probeapp" / "app.py").write_text(PROBE_APP.format(marker="approved"))
    fab = build_fab_from_files({p.relative_to(src).as_posix(): p for p in src.rglob("*") if p.is_file()})[0]
    digest = hashlib.sha256(fab).hexdigest()
    (tmp_path / "probe.fab").write_bytes(fab)
    planted = tmp_path / "world-writable" / f"evil.{digest[:8]}"  # as a local user could leave under /tmp
    (planted / "evilapp").mkdir(parents=True)
    (planted / "pyproject.toml").write_text(PYPROJECT.format(name="evil", module="evilapp"))
    (planted / "evilapp" / "__init__.py").write_text("")
    (planted / "evilapp" / "app.py").write_text(PROBE_APP.format(marker="planted"))
    return {
        "fab": tmp_path / "probe.fab",
        "digest": digest,
        "planted": planted,
        "out": tmp_path / "ran.txt",
        "home": tmp_path / "flwr-home",
        "decisions": tmp_path / "bundles.jsonl",
    }


def _run_task(probe, fab_id: str = "probe/app", fab_version: str = "1.0.0") -> dict:
    """One ClientApp task through flwr-clientapp behind the guard; what it replied and which code ran."""
    task = {"fab": str(probe["fab"]), "fab_id": fab_id, "fab_version": fab_version, "fab_hash": probe["digest"]}
    env = {
        **os.environ,
        "FLWR_HOME": str(probe["home"]),
        "FLWR_TELEMETRY_ENABLED": "0",
        "PROBE_OUT": str(probe["out"]),
        "PROBE_TASK": json.dumps(task),
        bundle_guard.APPROVED_ENV: probe["digest"],
        bundle_guard.DECISIONS_ENV: str(probe["decisions"]),
    }
    probe["out"].unlink(missing_ok=True)
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    assert lines, proc.stdout + proc.stderr
    outcome = json.loads(lines[-1][len("PROBE ") :])
    outcome["ran"] = probe["out"].read_text() if probe["out"].exists() else None
    return outcome


@pytest.mark.processes
def test_the_approved_bundle_runs_through_flowers_own_clientapp_runner(probe):
    outcome = _run_task(probe)
    assert outcome == {"error": None, "exit": 0, "ran": "approved"}
    folder = probe["home"] / "apps" / f"probe.app.1.0.0.{probe['digest'][:8]}"
    inode = folder.stat().st_ino
    assert _run_task(probe)["ran"] == "approved"
    assert folder.stat().st_ino == inode, "an intact app folder is kept, not reinstalled for every task"


@pytest.mark.processes
def test_a_version_that_climbs_out_of_flowers_home_never_loads_the_planted_folder(probe):
    # The real folder exists (it is installed first), so ".../probe.app.1.0.0.<hash8>/../../.." resolves.
    climb = "/..".join([""] * 40)
    version = f"1.0.0.{probe['digest'][:8]}{climb}{probe['planted'].parent}/evil"
    outcome = _run_task(probe, fab_version=version)
    assert outcome["ran"] is None, "code from the planted folder ran"
    assert outcome["exit"] != 0 and "BundleNotApproved" in outcome["error"]
    assert "only the approved bundle's own folder is ever loaded" in outcome["error"]
    refusals = [e for e in map(json.loads, probe["decisions"].read_text().splitlines()) if e["decision"] == "refused"]
    assert refusals and "\n" not in probe["decisions"].read_text().splitlines()[-1]


@pytest.mark.processes
def test_another_name_for_the_same_bytes_is_refused(probe):
    outcome = _run_task(probe, fab_id="evil/app")
    assert outcome["ran"] is None and "BundleNotApproved" in outcome["error"]


@pytest.mark.processes
def test_a_planted_folder_under_the_approved_name_is_replaced_by_the_approved_bytes(probe):
    folder = probe["home"] / "apps" / f"probe.app.1.0.0.{probe['digest'][:8]}"
    (folder / "probeapp").mkdir(parents=True)
    (folder / "pyproject.toml").write_text(PYPROJECT.format(name="app", module="probeapp"))
    (folder / "probeapp" / "__init__.py").write_text("")
    (folder / "probeapp" / "app.py").write_text(PROBE_APP.format(marker="planted"))
    probe["home"].chmod(0o700)
    (probe["home"] / "apps").chmod(0o700)
    assert _run_task(probe)["ran"] == "approved"
    assert "planted" not in (folder / "probeapp" / "app.py").read_text()
    assert '"decision": "replaced"' in probe["decisions"].read_text()


@pytest.mark.processes
def test_a_link_in_place_of_the_app_folder_is_replaced_not_followed(probe):
    apps = probe["home"] / "apps"
    apps.mkdir(parents=True, mode=0o700)
    probe["home"].chmod(0o700)
    (apps / f"probe.app.1.0.0.{probe['digest'][:8]}").symlink_to(probe["planted"])
    assert _run_task(probe)["ran"] == "approved"
    assert (probe["planted"] / "evilapp" / "app.py").is_file(), "the link's target is left alone"


@pytest.mark.processes
def test_a_flower_home_others_could_write_is_closed_and_nothing_in_it_trusted(probe):
    assert _run_task(probe)["ran"] == "approved"
    folder = probe["home"] / "apps" / f"probe.app.1.0.0.{probe['digest'][:8]}"
    planted = folder / "probeapp" / "__pycache__" / "app.cpython-311.pyc"  # as a local user could have left it
    planted.parent.mkdir(exist_ok=True)
    planted.write_bytes(b"not the approved code")
    probe["home"].chmod(0o777)  # a umask of 002 (or a careless chmod) left it open
    assert _run_task(probe)["ran"] == "approved"
    assert stat.S_IMODE(probe["home"].stat().st_mode) & 0o022 == 0
    assert not planted.exists(), "a cache found in a folder others could write was kept"
