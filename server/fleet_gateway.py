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
from its Content-Length before it is read, a request's head must arrive
within ``HEADER_TIMEOUT_S`` and its body without a pause longer than
``BODY_IDLE_TIMEOUT_S``, an idle keep-alive connection is closed after
``KEEP_ALIVE_S``, at most ``MAX_CONNECTIONS`` are served at once (503
beyond), and a refused path is logged escaped, so it cannot forge lines in
``gateway.log``.

Run as ``python -m server.fleet_gateway --listen HOST:PORT --upstream PORT
--cert server.crt --key server.key --ca ca.crt``; the launcher does this.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import h11
import httpx
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("fedseg.gateway")

FLEET_ENDPOINTS = frozenset(f"/v1/fleet/{name}" for name in (
    "activate-node", "deactivate-node", "send-node-heartbeat", "pull-messages", "push-messages", "get-run",
    "get-fab", "push-object", "pull-object", "confirm-message-received",
))
"""What flwr/supernode/fleet_http_client.py calls for a SuperNode whose key the centre registered."""
ALLOWED_METHOD = "POST"
UPSTREAM_HOST = "127.0.0.1"
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade", "host", "content-length"}
UPSTREAM_TIMEOUT_S = 120.0
BODY_ALLOWANCE_BYTES = 4 * 1024 * 1024
"""Bytes a request may carry beyond the model's travelling tensors (message metadata, records, signatures)."""
HEADER_TIMEOUT_S = 5.0
"""A SuperNode sends a request head in one write; 5 s is ample even over a slow link."""
BODY_IDLE_TIMEOUT_S = 10.0
"""Longest pause allowed between two chunks of a body."""
KEEP_ALIVE_S = 5
MAX_CONNECTIONS = 64
MAX_HEADER_BYTES = 64 * 1024
FORBIDDEN_BODY = b"fedseg gateway: only the Fleet API is served on this port.\n"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def allowed(method: str, path: str) -> bool:
    """Whether a request may pass: exactly the Fleet calls a SuperNode makes."""
    return method == ALLOWED_METHOD and path in FLEET_ENDPOINTS


def max_body(model_bytes: int) -> int:
    """The largest request body a site may send: its model's travelling tensors plus the allowance."""
    return model_bytes + BODY_ALLOWANCE_BYTES


class HeadDeadline(H11Protocol):
    """uvicorn's HTTP/1.1 protocol plus a deadline for every request head.

    uvicorn times out only idle keep-alive connections, and any byte received
    cancels that timer, so a client sending its headers a byte at a time
    (slowloris) would hold a connection for ever.
    """

    _deadline: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(HEADER_TIMEOUT_S, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        if not self.transport.is_closing():
            log.warning("closed a connection from %s: no complete request head within %.0f s",
                        (self.client or ("?",))[0], HEADER_TIMEOUT_S)
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*(headers or []), (b"content-length", str(len(body)).encode())]})
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
        if body is None:
            await _respond(send, 413, b"fedseg gateway: request body too large.\n", [(b"connection", b"close")])
            return
        headers = [(k.decode(), v.decode()) for k, v in scope["headers"] if k.decode().lower() not in HOP_BY_HOP]
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
    parser.add_argument("--max-body", type=int, required=True,
                        help="Largest request body in bytes (the launcher: model bytes plus an allowance).")
    args = parser.parse_args(argv)
    host, port = args.listen.rsplit(":", 1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(FleetGateway(args.upstream, args.ca, args.max_body), host=host.strip("[]"), port=int(port),
                ssl_certfile=args.cert, ssl_keyfile=args.key, log_level="warning", lifespan="on",
                http=HeadDeadline, timeout_keep_alive=KEEP_ALIVE_S, limit_concurrency=MAX_CONNECTIONS,
                h11_max_incomplete_event_size=MAX_HEADER_BYTES)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
