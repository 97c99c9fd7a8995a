"""An outsider on the network cannot lock the sites out of the gateway (issue 21, M4).

The real gateway runs as its own process with the launcher's command line on
127.0.0.1, in front of a stand-in SuperLink (a loopback HTTPS server that
answers every POST). Peers are real sockets; an attacker's address is a
second loopback address (127.0.0.x), so per-address limits are exercised
as they would be across the Internet.
"""

from __future__ import annotations

import concurrent.futures
import http.server
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from server.fleet_gateway import BODY_GRACE_S, CHECK_EVERY_S, HANDSHAKE_TIMEOUT_S, MAX_CONNECTIONS, MAX_PER_PEER

pytestmark = pytest.mark.processes

HOST = "127.0.0.1"
SITE = "127.0.0.1"
"""The address a well-behaved site connects from."""
ATTACKERS = [f"127.0.0.{n}" for n in range(10, 10 + MAX_CONNECTIONS // MAX_PER_PEER + 1)]
"""Enough attacking addresses to fill the whole gateway, each at its per-address limit."""
UPSTREAM_ANSWER = b"superlink says hello"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class _SuperLink(http.server.BaseHTTPRequestHandler):
    """Answers every POST at once, as the SuperLink answers a registered site."""

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-length", str(len(UPSTREAM_ANSWER)))
        self.end_headers()
        self.wfile.write(UPSTREAM_ANSWER)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    from server.certs import init_pki

    root = tmp_path_factory.mktemp("gateway")
    init_pki(root, [], [HOST])
    upstream = http.server.ThreadingHTTPServer((HOST, 0), _SuperLink)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(root / "server.crt", root / "server.key")
    upstream.socket = context.wrap_socket(upstream.socket, server_side=True)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    port = _free_port()
    log = (root / "gateway.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server.fleet_gateway",
            "--listen",
            f"{HOST}:{port}",
            "--upstream",
            str(upstream.server_address[1]),
            "--cert",
            str(root / "server.crt"),
            "--key",
            str(root / "server.key"),
            "--ca",
            str(root / "ca.crt"),
            "--max-body",
            str(1 << 20),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection((HOST, port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, (root / "gateway.log").read_text()
                time.sleep(0.1)
        yield {"port": port, "ca": str(root / "ca.crt"), "log": root / "gateway.log"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        upstream.shutdown()
        log.close()


def _tcp(gateway, source: str) -> socket.socket:
    """A TCP connection from ``source``: a TLS handshake that never starts, as a slow peer leaves it."""
    sock = socket.create_connection((HOST, gateway["port"]), timeout=10, source_address=(source, 0))
    sock.settimeout(10)
    return sock


def _tls(gateway, source: str) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=gateway["ca"])
    return context.wrap_socket(_tcp(gateway, source), server_hostname=HOST)


def _site_request(gateway, source: str = SITE) -> int:
    """One Fleet call as a registered site makes it (the stand-in SuperLink answers 200)."""
    transport = httpx.HTTPTransport(verify=gateway["ca"], local_address=source)
    with httpx.Client(transport=transport, timeout=10) as site:
        response = site.post(f"https://{HOST}:{gateway['port']}/v1/fleet/get-run", content=b"x" * 1000)
    assert response.content == UPSTREAM_ANSWER
    return response.status_code


def _closed(sock: socket.socket, within: float) -> tuple[bool, bytes]:
    """Whether the gateway closes ``sock`` within ``within`` seconds, and what it said before closing."""
    said, deadline = b"", time.monotonic() + within
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, min(1.0, deadline - time.monotonic())))
        try:
            data = sock.recv(4096)
        except (TimeoutError, ssl.SSLWantReadError):
            continue
        except OSError:
            return True, said
        if not data:
            return True, said
        said += data
    return False, said


def test_a_slowloris_body_is_cut_within_its_deadline_while_a_site_gets_through(gateway):
    """One byte every 4 s (the attack in issue 21, which held a connection for 37 s and more)."""
    sock = _tls(gateway, ATTACKERS[0])
    started = time.monotonic()
    sock.sendall(b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
    cut, said = False, b""
    while not cut and time.monotonic() - started < 30:
        try:
            sock.sendall(b"x")
        except OSError:  # cut between two bytes: read what the gateway said before closing
            cut, said = True, _closed(sock, 1.0)[1]
            break
        cut, said = _closed(sock, 4.0)
    held = time.monotonic() - started
    sock.close()
    assert cut, f"a slow body held its connection for {held:.0f} s"
    assert held <= BODY_GRACE_S + 4.0 + 2 * CHECK_EVERY_S + 1.0
    assert said.startswith(b"HTTP/1.1 408")
    assert _site_request(gateway) == 200


def test_one_address_cannot_take_the_slots_every_site_needs(gateway):
    slow = []
    try:
        for _ in range(MAX_CONNECTIONS + 10):  # more than the whole gateway holds, from one address
            try:
                slow.append(_tls(gateway, ATTACKERS[0]))
            except OSError:  # closed at accept: that address holds its share already
                pass
        assert len(slow) == MAX_PER_PEER
        assert _site_request(gateway) == 200, "a site was locked out while one address held slow connections"
    finally:
        for sock in slow:
            sock.close()


def test_tls_handshakes_count_and_are_cut_within_their_deadline(gateway):
    waiting = []
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            waiting = list(pool.map(lambda n: _tcp(gateway, ATTACKERS[n // MAX_PER_PEER]), range(MAX_CONNECTIONS)))
        time.sleep(0.5)
        # The gateway is full of handshakes that never start: a further connection is refused at once.
        with pytest.raises(httpx.TransportError):
            _site_request(gateway)
        started = time.monotonic()
        cut = [_closed(sock, HANDSHAKE_TIMEOUT_S + 3.0)[0] for sock in waiting]
        assert all(cut), f"{cut.count(False)} stalled handshakes outlived {HANDSHAKE_TIMEOUT_S} s"
        assert time.monotonic() - started <= HANDSHAKE_TIMEOUT_S + 3.0
        assert _site_request(gateway) == 200
    finally:
        for sock in waiting:
            sock.close()
    log = gateway["log"].read_text()
    assert "cut (TLS handshake" in log or "refused (over" in log
    assert all(line.count(" WARNING ") <= 1 for line in log.splitlines())
