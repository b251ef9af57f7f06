"""The only listener a consortium server exposes: Flower's Fleet API, nothing else.

In flwr 1.42 one SuperLink listener (`--host:--port`) serves the Fleet API (what
SuperNodes call), the Control API (`flwr run/ls/stop/log`, node register/unregister)
and the ServerApp runtime API, and without Flower's enterprise OIDC the Control API
accepts anyone who completes TLS with the CA certificate that every startup kit holds.
So `fedrad server start` binds the SuperLink to 127.0.0.1 on an internal port and puts
this gateway on the public address: it terminates TLS with the SuperLink's own
certificate, forwards `POST /v1/fleet/<route>` for the routes a SuperNode uses, and
answers 404 to everything else (Control, runtime, docs, health) without contacting the
SuperLink. Node authentication is untouched: the signed headers pass through and the
SuperLink verifies them as before. The Control and runtime APIs stay on loopback,
for the coordinator's `flwr` CLI and the ServerApp on the server host only.

Run as its own process: `python -m fedrad.fleet_gateway --listen HOST:PORT --upstream
127.0.0.1:PORT --certfile ... --keyfile ... --ca-certfile ...`.
"""

from __future__ import annotations

import argparse
import logging
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

LOG = logging.getLogger("fedrad.gateway")
PREFIX = "/v1/fleet/"
# The Fleet routes a SuperNode calls (flwr 1.42 superlink/routers/fleet/router.py), less
# register-node: nodes are registered by the coordinator, never by themselves.
FLEET_ROUTES = frozenset({
    "activate-node", "deactivate-node", "unregister-node", "send-node-heartbeat",
    "pull-messages", "push-messages", "get-run", "get-fab", "push-object", "pull-object",
    "confirm-message-received",
})
MAX_BODY = 1 << 30  # a request body larger than this is refused (Flower chunks objects)
_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"te",
                         b"trailer", b"upgrade", b"proxy-connection", b"host"})

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def allowed(method: str, path: str) -> bool:
    """Whether a request may reach the SuperLink through the public address."""
    return method == "POST" and path.startswith(PREFIX) and path[len(PREFIX):] in FLEET_ROUTES


async def _answer(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class Gateway:
    """An ASGI app that forwards the Fleet routes to `upstream` (https://host:port)."""

    def __init__(self, upstream: str, ca_certfile: str) -> None:
        import httpx

        self.upstream = upstream.rstrip("/")
        context = ssl.create_default_context(cafile=ca_certfile)
        self.client = httpx.AsyncClient(
            verify=context, timeout=httpx.Timeout(connect=10.0, read=600.0, write=600.0,
                                                  pool=None),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                event = await receive()
                if event["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif event["type"] == "lifespan.shutdown":
                    await self.client.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if not allowed(method, path):
            LOG.warning("refused %s %s from %s (not a Fleet route)", method, path,
                        (scope.get("client") or ("?",))[0])
            await _answer(send, 404, b'{"detail":"Not Found"}')
            return
        body = bytearray()
        while True:
            event = await receive()
            body += event.get("body", b"")
            if len(body) > MAX_BODY:
                await _answer(send, 413, b'{"detail":"request body too large"}')
                return
            if not event.get("more_body"):
                break
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP_BY_HOP]
        request = self.client.build_request("POST", f"{self.upstream}{path}",
                                            headers=headers, content=bytes(body))
        try:
            response = await self.client.send(request, stream=True)
        except Exception:  # noqa: BLE001 - the SuperLink is down or restarting
            LOG.warning("SuperLink unreachable for %s", path)
            await _answer(send, 502, b'{"detail":"SuperLink unavailable"}')
            return
        try:
            out = [(k, v) for k, v in response.headers.raw if k.lower() not in _HOP_BY_HOP]
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": out})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()


def _address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="public HOST:PORT")
    parser.add_argument("--upstream", required=True, help="the SuperLink's 127.0.0.1:PORT")
    parser.add_argument("--certfile", required=True)
    parser.add_argument("--keyfile", required=True)
    parser.add_argument("--ca-certfile", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    host, port = _address(args.listen)
    upstream_host, upstream_port = _address(args.upstream)
    if upstream_host not in {"127.0.0.1", "::1", "localhost"}:
        parser.error("--upstream must be a loopback address: the SuperLink's Control API "
                     "must not be reachable from the network")
    gateway = Gateway(f"https://{args.upstream}", args.ca_certfile)
    LOG.info("Fleet gateway on %s:%d -> %s (Fleet routes only)", host, port, args.upstream)
    uvicorn.run(gateway, host=host, port=port, ssl_certfile=args.certfile,
                ssl_keyfile=args.keyfile, log_level="warning", access_log=False,
                lifespan="on", timeout_keep_alive=30)


if __name__ == "__main__":
    main()
