"""`fedrad server dashboard`: a read-only status page on 127.0.0.1.

/            runs (status, rounds, strategy, pooled score), sites (registered, online),
             privacy spent per site; refreshes itself every 10 s
/runs/<id>   one run: learning curves per site, participation, privacy, rounds, config,
             checkpoints (the report's own sections, server.report)

It reads the server home (run folders, nodes.json) and asks the SuperLink which nodes
are online through the coordinator's `flwr` CLI; it writes nothing and answers GET
only. Everything shown is numbers and site names: no data, no PHI.
"""

from __future__ import annotations

import html
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from fedrad import processes as proc
from fedrad.server_node import ServerHome
from server.registry import RunFolder
from server.report import PAGE_CSP, page, run_sections

REFRESH_SECONDS = 10
ONLINE_CACHE_SECONDS = 5.0


class _Online:
    """Node id → status from `flwr supernode ls`, cached briefly; None if unreachable."""

    def __init__(self, home: ServerHome) -> None:
        self.home = home
        self._lock = threading.Lock()
        self._at = 0.0
        self._value: dict[int, str] | None = None

    def get(self) -> dict[int, str] | None:
        with self._lock:
            if not (self.home.cli_home / "config.toml").exists():  # no server started here
                return None
            if time.monotonic() - self._at > ONLINE_CACHE_SECONDS:
                try:
                    nodes = proc.flwr_json(self.home.cli_home, "supernode", "ls")["nodes"]
                    self._value = {int(n["node-id"]): str(n["status"]) for n in nodes}
                except (proc.DeploymentError, OSError, KeyError, ValueError):
                    self._value = None
                self._at = time.monotonic()
            return self._value


def index_page(home: ServerHome, online: dict[int, str] | None) -> str:
    body = ["<h1>fedrad server</h1>", "<h2>Runs</h2>", "<table><tr><th>run</th><th>status"
            "</th><th>rounds</th><th>strategy</th><th>task</th><th>last pooled score</th></tr>"]
    epsilon: dict[str, float] = {}
    for run in reversed(RunFolder.all(home.root)):  # newest first
        registry = run.read_json("registry.json")
        config = run.read_json("config.json") or {}
        rows = run.rounds()
        last = rows[-1] if rows else None
        score = (f"{last['score_metric']} {last['pooled_score']:.3f}" if last else "-")
        body.append(f"<tr><td><a href='/runs/{html.escape(run.run_id)}'>"
                    f"{html.escape(run.run_id)}</a></td>"
                    f"<td>{html.escape(str(registry.get('status')))}</td>"
                    f"<td>{len(rows)}/{html.escape(str(config.get('num-rounds', '?')))}</td>"
                    f"<td>{html.escape(str(config.get('strategy', 'fedavg')))}</td>"
                    f"<td>{html.escape(str(config.get('task', '?')))}</td>"
                    f"<td>{html.escape(score)}</td></tr>")
        for site, value in (run.read_json("epsilon.json") or {}).items():
            epsilon[site] = max(epsilon.get(site, 0.0), float(value))
    body.append("</table><h2>Sites</h2>")
    nodes = json.loads(home.nodes.read_text()) if home.nodes.exists() else {}
    if online is None:
        body.append("<p class='warn'>The SuperLink does not answer: online status unknown."
                    "</p>")
    body.append("<table><tr><th>site</th><th>node id</th><th>registered</th><th>now</th>"
                "<th>ε spent (highest run)</th></tr>")
    for site, record in sorted(nodes.items()):
        node = int(record.get("node_id", 0))
        now = "unknown" if online is None else online.get(node, "not connected")
        body.append(f"<tr><td>{html.escape(site)}</td><td>{node}</td>"
                    f"<td>{html.escape(str(record.get('status', 'registered')))}</td>"
                    f"<td>{html.escape(now)}</td>"
                    f"<td>{epsilon.get(site, 0.0):.3f}</td></tr>")
    body.append("</table>")
    return page("fedrad server", body, refresh=REFRESH_SECONDS)


def _handler(home: ServerHome, online: _Online) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, text: str) -> None:
            body = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("Content-Security-Policy",
                             f"{PAGE_CSP}; frame-ancestors 'none'")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("X-Frame-Options", "DENY")
            self.send_header("Referrer-Policy", "no-referrer")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            port = int(self.server.server_address[1])  # type: ignore[index]
            if self.headers.get("Host", "") not in {f"127.0.0.1:{port}", f"localhost:{port}"}:
                # DNS rebinding: a page on another origin that resolves to 127.0.0.1
                self._send(421, page("misdirected", ["<p>unknown Host</p>"]))
                return
            path = self.path.split("?", 1)[0].rstrip("/") or "/"
            if path == "/":
                self._send(200, index_page(home, online.get()))
                return
            parts = path.strip("/").split("/")
            if len(parts) == 2 and parts[0] == "runs" and parts[1].isdigit():
                try:
                    run = RunFolder.open(home.root, parts[1])
                except LookupError:
                    self._send(404, page("not found", [f"<p>no run {parts[1]}</p>"]))
                    return
                self._send(200, page(f"fedrad run {run.run_id}",
                                     ["<p><a href='/'>all runs</a></p>", *run_sections(run)],
                                     refresh=REFRESH_SECONDS))
                return
            self._send(404, page("not found", ["<p>not found</p>"]))

        def _refuse(self) -> None:
            self.send_response(405)
            self.send_header("Allow", "GET")
            self.end_headers()

        do_POST = do_PUT = do_DELETE = do_PATCH = _refuse  # noqa: N815 - read-only

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            return  # no request log: paths hold nothing worth keeping

    return Handler


def serve(home: ServerHome, port: int) -> ThreadingHTTPServer:
    """The dashboard server bound to 127.0.0.1:`port` (not yet serving)."""
    return ThreadingHTTPServer(("127.0.0.1", port), _handler(home, _Online(home)))
