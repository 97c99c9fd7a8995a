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

Run as ``python -m server.fleet_gateway --listen HOST:PORT --upstream PORT
--cert server.crt --key server.key --ca ca.crt``; the launcher does this.
"""

from __future__ import annotations

import argparse
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

log = logging.getLogger("fedseg.gateway")

FLEET_PREFIX = "/v1/fleet/"
ALLOWED_METHOD = "POST"
UPSTREAM_HOST = "127.0.0.1"
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade", "host", "content-length"}
UPSTREAM_TIMEOUT_S = 120.0
MAX_BODY_BYTES = 512 * 1024 * 1024
"""Refuse bodies larger than any model update fedseg sends (a guard against memory exhaustion)."""
FORBIDDEN_BODY = b"fedseg gateway: only the Fleet API is served on this port.\n"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def allowed(method: str, path: str) -> bool:
    """Whether a request may pass: Fleet calls only, and no path tricks."""
    return method == ALLOWED_METHOD and path.startswith(FLEET_PREFIX) and ".." not in path and "//" not in path


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*(headers or []), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class FleetGateway:
    """ASGI app forwarding allowed requests to the loopback SuperLink."""

    def __init__(self, upstream_port: int, ca_file: str) -> None:
        self.base = f"https://{UPSTREAM_HOST}:{upstream_port}"
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

    async def _body(self, receive: Receive) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:
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
            log.warning("refused %s %s from %s", method, path, (scope.get("client") or ("?",))[0])
            await _respond(send, 403, FORBIDDEN_BODY, [(b"content-type", b"text/plain")])
            return
        body = await self._body(receive)
        if body is None:
            await _respond(send, 413, b"fedseg gateway: request body too large.\n")
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
    args = parser.parse_args(argv)
    host, port = args.listen.rsplit(":", 1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(FleetGateway(args.upstream, args.ca), host=host.strip("[]"), port=int(port),
                ssl_certfile=args.cert, ssl_keyfile=args.key, log_level="warning", lifespan="on")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
