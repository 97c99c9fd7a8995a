"""Attacks by an outsider on the network: one deployed centre on 127.0.0.1 (TLS, node authentication, an
allow-listed site that never connects), attacked at its gateway. (Finding 13, that the release the containers
install, not editable, runs a deployed federation: test_first_day, which runs from such an installation.)
"""

from __future__ import annotations

import pytest

from common import keys

pytestmark = pytest.mark.processes


# --- wire attacks: one deployed centre on 127.0.0.1, shared by findings 7, 11 and 12 ----------------------------

WIRE_SITES = ["site-1"]


@pytest.fixture(scope="module")
def centre(tmp_path_factory):
    """``fedseg-server start`` with TLS, node auth and an allow-listed site that never connects, so the
    centre stays up (waiting for it) while the tests attack its gateway."""
    import yaml

    from server.certs import init_pki
    from tests.helpers.deploy_harness import (
        GATEWAY_HOST,
        Launched,
        allow,
        federation_yaml,
        make_site,
        snapshot_app,
        wait_for,
    )

    root = tmp_path_factory.mktemp("centre")
    app, _ = snapshot_app(root / "app")
    fed = federation_yaml(
        root, app, WIRE_SITES, rounds=1, min_sites=1, run_name="wire", round_timeout_s=600.0, cross_eval=False
    )
    init_pki(root / "certs", [], [GATEWAY_HOST])
    for name in WIRE_SITES:
        allow(fed, name, make_site(root, name, root / "no-data", fed, ["0" * 64]))
    server = Launched(root / "server.out", "fedseg-server", "start", "--config", str(fed))
    try:
        wait_for(lambda: "sites connect to" in server.output(), 180, "the centre to come up", server)
        cfg = yaml.safe_load(fed.read_text())
        yield {
            "root": root,
            "cfg": cfg,
            "server": server,
            "run": root / "runs" / "wire",
            "address": (GATEWAY_HOST, cfg["server"]["fleet_port"]),
            "ca": str(root / "certs" / "ca.crt"),
        }
    finally:
        server.terminate()


def _tls(centre, timeout: float = 20.0):
    """A raw TLS connection to the gateway, as any network peer can open."""
    import socket
    import ssl

    context = ssl.create_default_context(cafile=centre["ca"])
    raw = socket.create_connection(centre["address"], timeout=timeout)
    return context.wrap_socket(raw, server_hostname=centre["address"][0])


def _closed_within(sock, seconds: float) -> bool:
    """Whether the gateway answers or closes ``sock`` within ``seconds`` (reads until EOF or timeout)."""
    import time

    deadline = time.monotonic() + seconds
    sock.settimeout(1.0)
    while time.monotonic() < deadline:
        try:
            if not sock.recv(4096):
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


def test_the_gateway_holds_against_a_flooding_peer(centre):
    """Regression of finding 7."""
    import concurrent.futures

    import httpx

    url = f"https://{centre['address'][0]}:{centre['address'][1]}"
    with httpx.Client(verify=centre["ca"], timeout=10) as peer:
        # Exactly the endpoints a registered SuperNode uses: self-registration is not one of them.
        assert peer.post(url + "/v1/fleet/register-node", content=b"").status_code == 403
        assert (
            peer.post(
                url + "/v1/fleet/get-run", content=b"", headers={"content-type": "application/protobuf"}
            ).status_code
            == 401
        )
        # A forged log line in the path stays on one line of gateway.log.
        assert peer.post(url + "/v1/control/x%0A2026-01-01 INFO forged: admin login", content=b"").status_code == 403

    from server.fleet_gateway import HEADER_TIMEOUT_S, MAX_PER_PEER

    def oversized() -> bytes:
        with _tls(centre) as sock:  # announces 10 GB, sends nothing: refused before a byte of body is read
            sock.sendall(b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n")
            sock.settimeout(5)
            return sock.recv(64)

    def slow_head() -> bool:
        with _tls(centre) as sock:  # slowloris: a head that never ends
            sock.sendall(b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\n")
            return _closed_within(sock, HEADER_TIMEOUT_S + 5)

    def stalled_body() -> bytes:
        with _tls(centre) as sock:
            sock.sendall(b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
            sock.settimeout(20)
            return sock.recv(64)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        answers = [pool.submit(oversized), pool.submit(slow_head), pool.submit(stalled_body)]
        too_large, head_cut, body_cut = (f.result(timeout=60) for f in answers)
    assert too_large.startswith(b"HTTP/1.1 413")
    assert head_cut
    assert body_cut.startswith(b"HTTP/1.1 408")

    import time

    time.sleep(2.0)  # the gateway has let go of the connections above too
    idle = [_tls(centre) for _ in range(MAX_PER_PEER)]  # one address holds at most its share of the gateway
    try:
        with pytest.raises(OSError):  # the next one from that address is closed before TLS (a site at another
            _tls(centre).close()  # address still gets through: tests/test_gateway_limits.py)
    finally:
        for sock in idle:
            sock.close()
    log = (centre["root"] / "server-state" / "gateway.log").read_text()
    assert "forged" in log and not any(line.startswith("2026-01-01 INFO forged") for line in log.splitlines())


def test_the_centres_state_is_private(centre):
    """The SuperLink's database (every site's update passes through it) is owner-only, as is its folder. (finding 12)"""
    import stat

    server_state = centre["root"] / "server-state"
    assert stat.S_IMODE((server_state / "superlink.db").stat().st_mode) == 0o600
    assert stat.S_IMODE(server_state.stat().st_mode) == 0o700


def test_sites_get_only_what_they_need(centre):
    """Regression of finding 11."""
    import tomllib

    from common.config import from_yaml_text
    from common.plan import ChannelNorm, Plan
    from server.planning import plan_config

    shipped = tomllib.loads((centre["run"] / "run-config.toml").read_text())[keys.RUN_CONFIG_KEY]
    for secret in (str(centre["root"]), *WIRE_SITES):  # no centre path, no site's name
        assert secret not in shipped, secret
    assert from_yaml_text(shipped, "run config").model.channels == centre["cfg"]["model"]["channels"]

    plan = Plan(
        (1.0, 1.0, 1.0),
        (16, 16, 16),
        (ChannelNorm("zscore"),),
        (32, 32, 32),
        provenance={"sites": WIRE_SITES, "num_cases": 9, "class_fraction": [0.97, 0.03]},
    )
    sent = Plan.from_json(str(plan_config(plan)[keys.PLAN]))
    assert sent == plan and sent.provenance == {}
