"""Consortium-signed ClientApp code, verified at each site by Flower's own mechanism.

Flower's SuperNode, started with `--trusted-entities FILE` (a YAML map of key id to
Ed25519 OpenSSH public key), runs only a FAB whose `verifications` carry a signature
by one of those keys, and replies FAB_VERIFICATION_ERROR otherwise. In flwr 1.42 the
SuperLink fills `verifications` only for apps it fetches from an app registry at
`$FLWR_SUPERGRID_API_URL` (Flower Hub by default); a FAB pushed by `flwr run <dir>`
carries none and is refused by every site that trusts an entity.

So the consortium runs its own registry beside the SuperLink (127.0.0.1 only):
`fedrad consortium sign-app` builds the FAB with Flower's builder and signs it with the
consortium's Ed25519 key; `fedrad server start` serves the signed FABs and points the
SuperLink at them; a coordinator submits `flwr run @fedrad/fedrad==X.Y.Z`. The signed
message is Flower's: 8-byte big-endian `signed_at` + SHA-256 of the FAB bytes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
import tomllib
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from common.pki import CODE_SIGNING, ProvisioningError

REGISTRY_ENV = "FLWR_SUPERGRID_API_URL"  # read by the SuperLink when it fetches an app
INDEX = "index.json"


@dataclass(frozen=True)
class SignedApp:
    """One signed FAB in the consortium's `apps/` folder."""

    app_id: str  # "@publisher/name", as Flower writes it
    version: str
    sha256: str
    signed_at: int
    signature: str  # base64url, no padding
    key_id: str

    def spec(self) -> str:
        """What `flwr run` takes: @publisher/name==version."""
        return f"{self.app_id}=={self.version}"


def key_id(public_key_line: bytes) -> str:
    """A stable id for the consortium's signing key (the name in trusted-entities.yaml)."""
    return "fedrad-" + hashlib.sha256(public_key_line.split()[1]).hexdigest()[:16]


def trusted_entities(signing_pub: Path) -> str:
    """The SuperNode's `--trusted-entities` YAML: this consortium's key only."""
    line = signing_pub.read_bytes().strip()
    return f"{key_id(line)}: \"{line.decode()}\"\n"


def _fab_metadata(fab: bytes) -> tuple[str, str]:
    import io
    import zipfile

    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        project = tomllib.loads(archive.read("pyproject.toml").decode())
    publisher = project["tool"]["flwr"]["app"]["publisher"]
    return f"@{publisher}/{project['project']['name']}", str(project["project"]["version"])


def _load_index(apps: Path) -> list[dict[str, Any]]:
    path = apps / INDEX
    return list(json.loads(path.read_text())) if path.exists() else []


def sign_app(consortium: Path, app_dir: Path) -> SignedApp:
    """Build the FAB of `app_dir` with Flower's builder, sign it, store it in apps/.

    Re-signing the same bytes is a no-op; other bytes under a version already signed
    are refused (bump `version` in pyproject.toml), so a version names one code.
    """
    from flwr.cli.build import build_fab_from_disk

    key_path = consortium / f"{CODE_SIGNING}.key"
    if not key_path.is_file():
        raise ProvisioningError(
            f"{key_path} not found: apps are signed on the coordinator's machine with the "
            "offline code-signing key, never on the server (which holds the model-signing "
            "key only)")
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ProvisioningError(f"{key_path} is not an Ed25519 key")
    fab = build_fab_from_disk(app_dir)
    app_id, version = _fab_metadata(fab)
    digest = hashlib.sha256(fab).hexdigest()
    apps = consortium / "apps"
    index = _load_index(apps)
    for entry in index:
        if entry["app_id"] == app_id and entry["version"] == version:
            if entry["sha256"] == digest:
                return SignedApp(**entry)
            raise ProvisioningError(
                f"{app_id}=={version} is already signed with other code "
                f"(sha256 {entry['sha256'][:12]}...); bump version in "
                f"{app_dir / 'pyproject.toml'} and sign again")
    signed_at = int(time.time())
    message = signed_at.to_bytes(8, "big") + hashlib.sha256(fab).digest()
    signature = base64.urlsafe_b64encode(key.sign(message)).decode().rstrip("=")
    app = SignedApp(app_id=app_id, version=version, sha256=digest, signed_at=signed_at,
                    signature=signature,
                    key_id=key_id((consortium / f"{CODE_SIGNING}.pub").read_bytes().strip()))
    apps.mkdir(exist_ok=True)
    (apps / f"{digest}.fab").write_bytes(fab)
    index.append(app.__dict__)
    tmp = apps / f".{INDEX}.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, apps / INDEX)
    return app


def signed_hashes(consortium: Path) -> list[str]:
    """The sha256 of every app build the consortium signed (what a new kit pins)."""
    return [entry["sha256"] for entry in _load_index(consortium / "apps")]


def latest(consortium: Path, app_id: str, version: str | None = None) -> SignedApp | None:
    """The signed app for `version`, or the most recently signed one."""
    matches = [SignedApp(**e) for e in _load_index(consortium / "apps")
               if e["app_id"] == app_id and (version is None or e["version"] == version)]
    return max(matches, key=lambda a: a.signed_at) if matches else None


class _Handler(BaseHTTPRequestHandler):
    """POST /v1/hub/fetch-fab → {fab_url, verifications}; GET /v1/fab/<sha256>.fab."""

    consortium: Path
    base_url: str

    def _reply(self, status: int, body: bytes, kind: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        if self.path != "/v1/hub/fetch-fab":
            self._reply(404, b'{"detail": "not found"}')
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
            request = json.loads(self.rfile.read(length))
            app = latest(self.consortium, str(request["app_id"]), request.get("app_version"))
        except (ValueError, KeyError, TypeError):
            self._reply(400, b'{"detail": "expected JSON with app_id and app_version"}')
            return
        if app is None:
            self._reply(404, json.dumps({"detail": f"{request['app_id']} is not signed by "
                                         "this consortium"}).encode())
            return
        self._reply(200, json.dumps({
            "fab_url": f"{self.base_url}/v1/fab/{app.sha256}.fab",
            "verifications": [{"public_key_id": app.key_id, "signature": app.signature,
                               "signed_at": app.signed_at}],
        }).encode())

    def do_GET(self) -> None:  # noqa: N802
        name = self.path.removeprefix("/v1/fab/")
        digest = name.removesuffix(".fab")
        path = self.consortium / "apps" / name
        if (name == self.path or len(digest) != 64
                or not all(c in "0123456789abcdef" for c in digest) or not path.is_file()):
            self._reply(404, b'{"detail": "no such FAB"}')
            return
        self._reply(200, path.read_bytes(), "application/octet-stream")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        return  # the SuperLink logs its fetches; nothing here is worth a line per request


class AppRegistry:
    """The consortium's app registry on 127.0.0.1, served from a daemon thread."""

    def __init__(self, consortium: Path, port: int = 0) -> None:
        handler: type[_Handler] = type("Handler", (_Handler,), {"consortium": consortium})
        self._server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        handler.base_url = self.url
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> AppRegistry:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def api_url(self) -> str:
        """The value of $FLWR_SUPERGRID_API_URL for the SuperLink."""
        return f"{self.url}/v1"
