"""A PACS is outside the site's trust: a hostile or broken one must not write outside the
site's folder, nor slip in an instance it was not asked for, nor stop the pull.

The fake PACS here stands for what the outside world could send (real HTTPS, a
certificate of a test CA); the honest path is tested against Orthanc in test_pacs_pull.
"""

from __future__ import annotations

import io
import json
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest

from common.pki import create_ca, issue_server_cert
from fedrad.pacs import PacsConnection
from fedrad.site_pull import pull

STUDY, SERIES = "1.2.826.0.1.3680043.10.99.1", "1.2.826.0.1.3680043.10.99.2"
TRAVERSAL = "../../../../escaped"
GARBAGE, OTHER, FAILING = (f"1.2.826.0.1.3680043.10.99.{n}" for n in (3, 4, 5))
BOUNDARY = "fedradboundary"


def _uid(tag: str, value: str) -> dict:
    return {tag: {"vr": "UI", "Value": [value]}}


def _instance(sop: str) -> dict:
    return {**_uid("0020000D", STUDY), **_uid("0020000E", SERIES), **_uid("00080018", sop)}


def _dicom_bytes(sop: str, cxr_root: Path) -> bytes:
    source = next(p for p in (cxr_root / "literature_other").rglob("*.dcm"))
    dataset = pydicom.dcmread(source)
    dataset.SOPInstanceUID = sop
    out = io.BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _handler(cxr_root: Path) -> type[BaseHTTPRequestHandler]:
    other_body = _dicom_bytes("1.2.826.0.1.3680043.10.99.777", cxr_root)  # not OTHER
    traversal_body = _dicom_bytes(TRAVERSAL, cxr_root)  # what it claims to be

    class Hostile(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _send(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _multipart(self, part: bytes) -> None:
            body = (f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                    + part + f"\r\n--{BOUNDARY}--\r\n".encode())
            self._send(200, body, f'multipart/related; type="application/dicom"; '
                                  f"boundary={BOUNDARY}")

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.split("?")[0].rstrip("/")
            if path == "/dicom-web/studies":
                self._send(200, json.dumps([_uid("0020000D", STUDY)]).encode(),
                           "application/dicom+json")
            elif path == f"/dicom-web/studies/{STUDY}/instances":
                rows = [_instance(s) for s in (TRAVERSAL, GARBAGE, OTHER, FAILING)]
                self._send(200, json.dumps(rows).encode(), "application/dicom+json")
            elif path.endswith("escaped"):
                self._multipart(traversal_body)
            elif path.endswith(f"/instances/{GARBAGE}"):
                self._multipart(b"this is not DICOM at all" * 20)
            elif path.endswith(f"/instances/{OTHER}"):
                self._multipart(other_body)
            else:
                self._send(500, b"internal error", "text/plain")

    return Hostile


@pytest.fixture
def hostile_pacs(tmp_path: Path, cxr_root: Path) -> Iterator[PacsConnection]:
    pki = tmp_path / "pki"
    create_ca(pki, "hostile")
    tls = issue_server_cert(pki, ["127.0.0.1"])
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(cxr_root))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls.server_cert, tls.server_key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield PacsConnection(f"https://127.0.0.1:{server.server_address[1]}/dicom-web",
                         ca_bundle=tls.ca_cert)
    server.shutdown()
    server.server_close()


def test_hostile_pacs_path_traversal_uid_writes_nothing_outside(
        hostile_pacs: PacsConnection, tmp_path: Path) -> None:
    dest = tmp_path / "site" / "data"
    summary = pull(hostile_pacs, dest)
    reasons = {f.get("instance", ""): f["reason"] for f in summary.failed}
    traversal = next(k for k in reasons if "escaped" in k)
    assert reasons[traversal].startswith("not a DICOM UID")
    assert not list(tmp_path.rglob("escaped*"))
    assert summary.new == 0


def test_hostile_pacs_non_dicom_and_substituted_instance_are_skipped(
        hostile_pacs: PacsConnection, tmp_path: Path) -> None:
    summary = pull(hostile_pacs, tmp_path)
    reasons = {f.get("instance", ""): f["reason"] for f in summary.failed}
    assert "not a DICOM instance" in reasons[GARBAGE]
    assert reasons[OTHER] == "the PACS sent another instance than the one asked for"
    assert reasons[FAILING] == "the PACS answered HTTP 500 for this instance"
    assert not list(tmp_path.rglob("*.dcm")) and not list(tmp_path.rglob("*.part"))
