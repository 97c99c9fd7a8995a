"""A real deployment on 127.0.0.1: SuperLink, Fleet gateway and SuperNodes as separate processes, TLS and auth.

The session's deployed federation (tests/helpers/deployed.py): two approved
sites train for two rounds while a third, registered site refuses the app
bundle, and the other refusals (unregistered key, plaintext, another CA) and
the reachability checks run against the live server.
"""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest
import yaml

from common.files import read_jsonl
from common.flower_env import free_port
from common.processes import descendants
from server.certs import init_pki
from tests.helpers.deploy_harness import GATEWAY_HOST, Launched, events, run_cli, wait_for, write_yaml
from tests.helpers.deployed import GOOD, ROUNDS, UNAPPROVED, finished

pytestmark = pytest.mark.processes


def _listening(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def _gateway(ctx) -> str:
    return f"https://{GATEWAY_HOST}:{ctx['cfg']['server']['fleet_port']}"


def _ca(ctx) -> str:
    return str(ctx["root"] / "certs" / "ca.crt")


def test_a_site_reaches_only_the_fleet_api(deployed):
    ctx = deployed
    with httpx.Client(verify=_ca(ctx), timeout=10) as site:
        for path in (
            "/v1/control/start-run",
            "/v1/control/list-runs",
            "/v1/control/register-node",
            "/v1/runtime/pull-messages",
            "/v1/runtime/create-task",
        ):
            assert site.post(_gateway(ctx) + path, content=b"").status_code == 403, path
        assert site.get(_gateway(ctx) + "/health").status_code == 403
        assert site.get(_gateway(ctx) + "/docs").status_code == 403
        # The Fleet API is there, and the SuperLink itself insists on a signed node identity.
        unsigned = site.post(
            _gateway(ctx) + "/v1/fleet/get-run", content=b"", headers={"content-type": "application/protobuf"}
        )
        assert unsigned.status_code == 401
    superlink_port = ctx["cfg"]["server"]["superlink_port"]
    with pytest.raises(OSError):
        socket.create_connection((GATEWAY_HOST, superlink_port), timeout=5).close()
    with httpx.Client(verify=_ca(ctx), timeout=10) as local:  # the operator's view, on the centre itself
        control = local.post(
            f"https://127.0.0.1:{superlink_port}/v1/control/list-runs",
            content=b"",
            headers={"content-type": "application/protobuf"},
        )
        assert control.status_code != 403


def test_plaintext_connections_are_refused(deployed):
    with pytest.raises(httpx.HTTPError):
        httpx.post(_gateway(deployed).replace("https://", "http://") + "/v1/fleet/get-run", content=b"", timeout=10)


def test_the_site_daemon_leaves_torch_to_its_warm_parent(deployed):
    """The daemon runs as long as the site does: its data check ran in a child of the warm parent."""
    for name, daemon in deployed["daemons"].items():
        said = wait_for(lambda d=daemon: "SuperNode started" in d.output() and d.output(), 240, "the check", daemon)
        assert "0 problem(s)" in said, said  # the check's table, as the child reported it
        (warm,) = [p for p in descendants(daemon.proc.pid) if b"client.warm_start" in _cmdline(p)]
        assert "libtorch" in _maps(warm), name
        assert "libtorch" not in _maps(daemon.proc.pid), name


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def _extra_site(ctx, name: str, **changes) -> Launched:
    """A site daemon that is not part of the allow-list or trusts another CA (its test stops it once it has seen
    what it waits for: turned away, it would restart its SuperNode with back-off for the rest of the session)."""
    site = yaml.safe_load(ctx["sites"]["site-1"].read_text())["site"]
    state = ctx["root"] / "sites" / name
    site.update(name=name, state_dir=str(state), private_key=str(state / "keys" / "site.key"), **changes)
    path = write_yaml(ctx["root"] / f"{name}.yaml", {"site": site})
    assert run_cli("fedseg-client", "keygen", "--config", str(path)).returncode == 0
    daemon = Launched(ctx["root"] / f"{name}.out", "fedseg-client", "start", "--config", str(path))
    ctx["extra"].append(daemon)
    return daemon


def test_a_supernode_whose_key_is_not_registered_is_refused(deployed):
    ctx = deployed
    rogue = _extra_site(ctx, "rogue")
    log = ctx["root"] / "sites" / "rogue" / "supernode.log"
    wait_for(
        lambda: "SuperNode exited with code" in rogue.output(),
        240,
        "the unregistered SuperNode to be turned away",
        rogue,
    )
    rogue.terminate()
    assert "Failed to activate SuperNode" in log.read_text()
    assert "the centre did not accept this site's key" in rogue.output()
    superlink_log = (ctx["root"] / "server-state" / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in superlink_log
    assert not any(e.get("site") == "rogue" for e in events(ctx["run"]))


def test_a_server_certificate_from_another_ca_is_refused(deployed):
    """The centre's real gateway, on its own so the test does not race the federation's end."""
    ctx = deployed
    init_pki(ctx["root"] / "other-ca", [], [GATEWAY_HOST])
    certs, port = ctx["root"] / "certs", free_port(GATEWAY_HOST)
    gateway = Launched(
        ctx["root"] / "lone-gateway.out",
        "python",
        "-m",
        "server.fleet_gateway",
        "--listen",
        f"{GATEWAY_HOST}:{port}",
        "--upstream",
        str(free_port()),
        "--max-body",
        "1024",
        "--cert",
        str(certs / "server.crt"),
        "--key",
        str(certs / "server.key"),
        "--ca",
        str(certs / "ca.crt"),
    )
    ctx["extra"].append(gateway)
    wait_for(lambda: _listening(GATEWAY_HOST, port), 60, "the gateway to listen", gateway)
    foreign = _extra_site(
        ctx,
        "foreign-ca",
        root_certificate=str(ctx["root"] / "other-ca" / "ca.crt"),
        server_address=f"{GATEWAY_HOST}:{port}",
    )
    said = wait_for(
        lambda: "CERTIFICATE_VERIFY_FAILED" in foreign.output() and foreign.output(),
        120,
        "the TLS verification failure",
        foreign,
    )
    foreign.terminate()
    gateway.terminate()
    assert "not issued by the CA in site.root_certificate" in said and "other-ca" in said
    assert not (ctx["root"] / "sites" / "foreign-ca" / "supernode.log").exists(), "no SuperNode for an untrusted server"


def test_two_rounds_with_both_sites_in_every_round_and_the_unapproved_bundle_refused(deployed):
    ctx = deployed
    server = finished(ctx)
    assert server.proc.returncode == 0, server.output()[-3000:]
    log = events(ctx["run"])
    assert log[-1]["event"] == "run-end" and log[-1]["status"] == "completed"
    for rnd in range(1, ROUNDS + 1):
        for stage in ("train", "evaluate"):
            assert sorted(e["site"] for e in log if e["event"] == stage and e["round"] == rnd) == GOOD, (rnd, stage)
        summary = [e for e in log if e["event"] == "round" and e["round"] == rnd]
        assert len(summary) == 1 and summary[0]["sites_ok"] == len(GOOD)
        refused = [e for e in log if e["event"] == "failure" and e["round"] == rnd and e["site"] == UNAPPROVED]
        assert refused and all("has not approved app bundle" in e["reason"] for e in refused)
    state = ctx["root"] / "sites" / UNAPPROVED
    decisions = list(read_jsonl(state / "bundles.jsonl"))
    assert decisions and {d["decision"] for d in decisions} == {"refused"}
    assert not list((state / "flwr-home").rglob("client_app.py")), "the refused bundle was unpacked"
    for name in GOOD:
        accepted = (ctx["root"] / "sites" / name / "bundles.jsonl").read_text()
        assert ctx["digest"] in accepted and "refused" not in accepted
    assert "round 2: 2/3 site(s) replied" in server.output()


def test_status_tells_a_site_what_it_did(deployed):
    ctx = deployed
    finished(ctx)
    status = run_cli("fedseg-client", "status", "--config", str(ctx["sites"]["site-1"]))
    assert status.returncode == 0, status.stderr
    assert "daemon: running" in status.stdout
    assert f"last round trained: {ROUNDS}" in status.stdout
    assert "round   2 train" in status.stdout and "loss" in status.stdout
    refused = run_cli("fedseg-client", "status", "--config", str(ctx["sites"][UNAPPROVED]))
    assert "app bundles refused:" in refused.stdout
