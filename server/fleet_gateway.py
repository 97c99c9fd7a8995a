"""The only door sites reach: a TLS gateway that passes the Fleet API and nothing else.

Flower 1.42's SuperLink serves three APIs on one HTTP host:port: Fleet (what
SuperNodes use), Control (start and stop runs, register nodes: i.e. ship code
to every site) and Runtime (what the ServerApp uses). Control and Runtime are
not authenticated. The launcher therefore binds the SuperLink to 127.0.0.1 and
puts this gateway on the public address: it terminates TLS with the server
certificate, forwards ``POST /v1/fleet/*`` to the SuperLink over TLS on
loopback, and answers everything else with 403. SuperNode authentication is
unaffected: each request carries the node's signature in headers, which are
forwarded as they are, and the SuperLink checks them.

It holds against a peer that wants to exhaust it, too: only the exact Fleet
endpoints an authenticated Flower 1.42 SuperNode calls pass (``FLEET_ENDPOINTS``;
not self-registration), a body may be no larger than the model's travelling
tensors plus an allowance (``--max-body``, set by the launcher) and is refused
from its Content-Length before it is read, and a refused path is logged
escaped, so it cannot forge lines in ``gateway.log``. Every connection is
bounded as a whole, from the moment TCP accepts it (:class:`TlsFront`,
:class:`RequestDeadline`):

- it counts against ``MAX_CONNECTIONS`` and ``MAX_PER_PEER`` (per address)
  from accept to close, its TLS handshake included; beyond either it is
  closed at once, so one address cannot take the slots every site needs;
- the TLS handshake must end within ``HANDSHAKE_TIMEOUT_S``;
- a request's head must arrive within ``HEADER_TIMEOUT_S`` (also what an
  idle keep-alive connection gets), and its body at no less than
  ``MIN_BODY_RATE`` bytes/s on average after ``BODY_GRACE_S``: a body of n
  bytes has ``BODY_GRACE_S + n / MIN_BODY_RATE`` seconds in all. A peer
  sending a byte every few seconds is answered 408 and cut within
  ``BODY_GRACE_S`` plus a check interval, however large a body it declares.

uvicorn alone bounds none of this: its timers restart on every byte, its
TLS handshakes run 60 s outside its connection count.

Run as ``python -m server.fleet_gateway --listen HOST:PORT --upstream PORT
--cert server.crt --key server.key --ca ca.crt``; the launcher does this.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import h11
import httpx
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("fedseg.gateway")

FLEET_ENDPOINTS = frozenset(
    f"/v1/fleet/{name}"
    for name in (
        "activate-node",
        "deactivate-node",
        "send-node-heartbeat",
        "pull-messages",
        "push-messages",
        "get-run",
        "get-fab",
        "push-object",
        "pull-object",
        "confirm-message-received",
    )
)
"""What flwr/supernode/fleet_http_client.py calls for a SuperNode whose key the centre registered."""
ALLOWED_METHOD = "POST"
UPSTREAM_HOST = "127.0.0.1"
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}
UPSTREAM_TIMEOUT_S = 120.0
BODY_ALLOWANCE_BYTES = 4 * 1024 * 1024
"""Bytes a request may carry beyond the model's travelling tensors (message metadata, records, signatures)."""
HANDSHAKE_TIMEOUT_S = 5.0
"""A TLS handshake is two round trips; 5 s is ample even over a slow link."""
HEADER_TIMEOUT_S = 5.0
"""A SuperNode sends a request head in one write; 5 s is ample even over a slow link."""
BODY_GRACE_S = 5.0
"""Seconds a body may take before the rate below applies (a slow start, a congested moment)."""
MIN_BODY_RATE = 32 * 1024
"""Bytes/s a body must average after the grace: 256 kbit/s, far below any hospital link, far above a trickle."""
BODY_IDLE_TIMEOUT_S = 10.0
"""Longest pause allowed between two chunks of a body."""
CHECK_EVERY_S = 0.5
"""How often a connection's deadline is checked."""
SHUTDOWN_TIMEOUT_S = 2.0
"""How long a closing TLS connection waits for the peer's close_notify before it is dropped (asyncio: 30 s)."""
KEEP_ALIVE_S = 5
MAX_CONNECTIONS = 256
"""Connections held at once, from TCP accept (TLS handshakes included) to close."""
MAX_PER_PEER = 32
"""Connections one address may hold at once; a SuperNode uses a handful (its Fleet calls and object transfers)."""
REFUSALS_LOG_EVERY_S = 10.0
"""Refused and cut connections are logged as one summary line at most this often, so a flood cannot fill the log."""
MAX_HEADER_BYTES = 64 * 1024
FORBIDDEN_BODY = b"fedseg gateway: only the Fleet API is served on this port.\n"
TIMED_OUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\nconnection: close\r\n"
    b"content-length: 44\r\n\r\nfedseg gateway: the request came too slowly."
)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def allowed(method: str, path: str) -> bool:
    """Whether a request may pass: exactly the Fleet calls a SuperNode makes."""
    return method == ALLOWED_METHOD and path in FLEET_ENDPOINTS


def max_body(model_bytes: int) -> int:
    """The largest request body a site may send: its model's travelling tensors plus the allowance."""
    return model_bytes + BODY_ALLOWANCE_BYTES


class Slots:
    """Connections held now, in all and per address; refusals and cuts, summarised in the log."""

    def __init__(self, total: int = MAX_CONNECTIONS, per_peer: int = MAX_PER_PEER) -> None:
        self.total, self.per_peer = total, per_peer
        self.held: Counter[str] = Counter()
        self._tally: Counter[str] = Counter()
        self._logged = 0.0

    def take(self, peer: str) -> bool:
        """Hold a slot for ``peer``; False (and nothing held) when the gateway or that address is full."""
        if sum(self.held.values()) >= self.total or self.held[peer] >= self.per_peer:
            self.note(f"refused (over {self.total} in all or {self.per_peer} per address)", peer)
            return False
        self.held[peer] += 1
        return True

    def give_back(self, peer: str) -> None:
        self.held[peer] -= 1
        if self.held[peer] <= 0:
            del self.held[peer]

    def note(self, what: str, peer: str) -> None:
        """Count a refused or cut connection; one summary line at most every ``REFUSALS_LOG_EVERY_S``."""
        self._tally[what] += 1
        now = time.monotonic()
        if now - self._logged >= REFUSALS_LOG_EVERY_S:
            summary = "; ".join(f"{n} {why}" for why, n in sorted(self._tally.items()))
            log.warning("connections %s; the latest from %s", summary, peer[:64])
            self._tally.clear()
            self._logged = now


class Ticket:
    """One connection's slot, given back exactly once whichever way the connection ends."""

    def __init__(self, slots: Slots, peer: str) -> None:
        self.slots, self.peer, self.held = slots, peer, True

    def give_back(self) -> None:
        if self.held:
            self.held = False
            self.slots.give_back(self.peer)


class RequestDeadline(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a whole-request deadline: the head in time, the body at a minimum rate.

    uvicorn times out only idle keep-alive connections, and any byte received
    cancels that timer, so a client sending a byte at a time (slowloris)
    would hold a connection for ever; a pause limit between body chunks does
    not help against one byte every few seconds.
    """

    def __init__(self, *args: Any, ticket: Ticket, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ticket = ticket
        self._timer: asyncio.TimerHandle | None = None
        self._phase = "head"
        self._since = 0.0
        self._body_bytes = 0
        self._declared = 0

    def _wait_for_head(self) -> None:
        self._phase, self._since = "head", self.loop.time()
        self._schedule()

    def _schedule(self) -> None:
        self._stop()
        self._timer = self.loop.call_later(CHECK_EVERY_S, self._check)

    def _stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        elapsed = self.loop.time() - self._since
        if self._phase == "head" and elapsed > HEADER_TIMEOUT_S:
            self._expire(f"no complete request head within {HEADER_TIMEOUT_S:.0f} s")
        elif self._phase == "body" and self._body_bytes < min(self._declared, MIN_BODY_RATE * (elapsed - BODY_GRACE_S)):
            self._expire(f"the body came slower than {MIN_BODY_RATE // 1024} KiB/s")
        elif self._phase in ("head", "body"):
            self._schedule()

    def _expire(self, why: str) -> None:
        self._phase = "cut"
        if self.transport.is_closing():
            return
        self.ticket.slots.note(f"cut ({why})", self.ticket.peer)
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):  # nothing answered yet: say why first
            self.transport.write(TIMED_OUT)
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._wait_for_head()

    def data_received(self, data: bytes) -> None:
        if self._phase == "body":
            self._body_bytes += len(data)
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        state = self.conn.their_state
        if self._phase == "head" and state is h11.SEND_BODY:
            declared = dict(self.headers).get(b"content-length", b"0")
            self._declared = int(declared) if declared.isdigit() else 0
            self._phase, self._since, self._body_bytes = "body", self.loop.time(), 0
        if self._phase in ("head", "body") and state not in (h11.IDLE, h11.SEND_BODY):
            self._phase = "answer"  # the request is in; the SuperLink's answer has its own timeout
            self._stop()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._phase != "cut":
            self._wait_for_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop()
        self.ticket.give_back()
        super().connection_lost(exc)


class TlsFront(asyncio.Protocol):
    """What TCP accept creates: takes a slot, runs the TLS handshake against a deadline, then hands over.

    uvicorn's own TLS runs inside asyncio's server before any protocol sees
    the connection, with a 60 s handshake timeout and outside its connection
    count; here the handshake is counted and bounded, and only then does
    :class:`RequestDeadline` (uvicorn's HTTP/1.1) take the connection.
    """

    def __init__(self, *, tls: ssl.SSLContext, slots: Slots, **uvicorn: Any) -> None:
        self.tls, self.slots, self.uvicorn = tls, slots, uvicorn
        self.loop: asyncio.AbstractEventLoop = uvicorn.get("_loop") or asyncio.get_event_loop()
        self.ticket: Ticket | None = None
        self.pending: list[bytes] = []
        self.lost = False

    # typeshed types every protocol's transport as BaseTransport; a streaming Protocol is given a Transport.
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        peer = str((transport.get_extra_info("peername") or ("?",))[0])
        if not self.slots.take(peer):
            transport.abort()
            return
        self.ticket = Ticket(self.slots, peer)
        transport.pause_reading()  # nothing is read before the TLS layer is in place
        self.loop.create_task(self._handshake(transport))

    async def _handshake(self, raw: asyncio.Transport) -> None:
        assert self.ticket is not None
        try:
            tls = await self.loop.start_tls(
                raw,
                self,
                self.tls,
                server_side=True,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S,
                ssl_shutdown_timeout=SHUTDOWN_TIMEOUT_S,
            )
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as err:
            self.slots.note(f"cut (TLS handshake: {type(err).__name__})", self.ticket.peer)
            raw.abort()
            self.ticket.give_back()
            return
        if tls is None or self.lost:
            raw.abort()
            self.ticket.give_back()
            return
        http = RequestDeadline(ticket=self.ticket, **self.uvicorn)
        tls.set_protocol(http)
        http.connection_made(tls)
        for data in self.pending:
            http.data_received(data)

    def data_received(self, data: bytes) -> None:  # plaintext that arrived with the handshake's last flight
        self.pending.append(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.ticket is not None:
            self.ticket.give_back()


def server_tls(cert: str, key: str) -> ssl.SSLContext:
    """The gateway's server-side TLS context (what uvicorn would build from ``ssl_certfile``/``ssl_keyfile``)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*(headers or []), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class FleetGateway:
    """ASGI app forwarding allowed requests to the loopback SuperLink."""

    def __init__(self, upstream_port: int, ca_file: str, body_limit: int) -> None:
        self.base = f"https://{UPSTREAM_HOST}:{upstream_port}"
        self.body_limit = body_limit
        self.verify = ssl.create_default_context(cafile=ca_file)
        self.client: httpx.AsyncClient | None = None

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.client = httpx.AsyncClient(verify=self.verify, timeout=UPSTREAM_TIMEOUT_S)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.client is not None:
                    await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The request body, or None when it is (or announces itself) larger than the limit."""
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.body_limit:
            return None
        chunks, size = [], 0
        while True:
            message = await asyncio.wait_for(receive(), BODY_IDLE_TIMEOUT_S)
            if message["type"] == "http.disconnect":  # the peer left (or was cut) mid-body: forward nothing
                raise ConnectionAbortedError("the peer left before its body was complete")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.body_limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if not allowed(method, path):
            log.warning("refused %r %r from %s", method[:16], path[:200], (scope.get("client") or ("?",))[0])
            await _respond(send, 403, FORBIDDEN_BODY, [(b"content-type", b"text/plain")])
            return
        try:
            body = await self._body(scope, receive)
        except TimeoutError:
            log.warning("closed %r from %s: the body stalled", path, (scope.get("client") or ("?",))[0])
            await _respond(send, 408, b"fedseg gateway: request body timed out.\n", [(b"connection", b"close")])
            return
        except ConnectionAbortedError:
            return
        if body is None:
            await _respond(send, 413, b"fedseg gateway: request body too large.\n", [(b"connection", b"close")])
            return
        headers = [(k.decode(), v.decode()) for k, v in scope["headers"] if k.decode().lower() not in HOP_BY_HOP]
        assert self.client is not None, "the lifespan startup creates the client before any request"
        try:
            upstream = await self.client.post(self.base + path, content=body, headers=headers)
        except httpx.HTTPError as err:
            log.error("SuperLink unreachable for %s: %s", path, err)
            await _respond(send, 503, b"fedseg gateway: the SuperLink is not reachable.\n")
            return
        out = [(k.encode(), v.encode()) for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP]
        await _respond(send, upstream.status_code, upstream.content, out)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(description="fedseg's TLS gateway in front of the SuperLink's Fleet API.")
    parser.add_argument("--listen", required=True, help="HOST:PORT sites connect to.")
    parser.add_argument("--upstream", type=int, required=True, help="Loopback port of the SuperLink.")
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument(
        "--max-body",
        type=int,
        required=True,
        help="Largest request body in bytes (the launcher: model bytes plus an allowance).",
    )
    args = parser.parse_args(argv)
    host, port = args.listen.rsplit(":", 1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    front = functools.partial(TlsFront, tls=server_tls(args.cert, args.key), slots=Slots())
    uvicorn.run(
        FleetGateway(args.upstream, args.ca, args.max_body),
        host=host.strip("[]"),
        port=int(port),
        log_level="warning",
        lifespan="on",
        http=front,  # type: ignore[arg-type]  # TLS: TlsFront
        loop="asyncio",  # TlsFront relies on asyncio's documented start_tls/pause_reading order (not uvloop's)
        timeout_keep_alive=KEEP_ALIVE_S,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
