"""A real PACS for the tests: Debian's Orthanc with its DICOMweb plugin, behind nginx for
HTTPS, as hospitals deploy it (the Orthanc Book puts TLS in a reverse proxy; Debian's
Orthanc 1.10 build also crashes on its own HTTPS). Both bind to 127.0.0.1 only; Orthanc
asks for HTTP basic credentials; nginx serves a certificate of a CA made for the test, and
on a second port stands for an API gateway that takes a bearer token instead.

`make test` installs the packages (apt-get install orthanc orthanc-dicomweb nginx-light);
CI sets FEDRAD_REQUIRE_PACS=1 so these tests fail rather than skip without them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "site-reader", "correct horse battery staple"
TOKEN = "fedrad-test-token-4f1c9a"  # what the hospital's API gateway accepts


@dataclass(frozen=True)
class Pacs:
    url: str  # https://127.0.0.1:PORT/dicom-web
    token_url: str  # the same PACS behind a gateway that takes a bearer token instead
    ca_bundle: Path  # the CA that signed the proxy's certificate
    credentials: Path  # a 0600 TOML file with the right username and password
    folder: Path

    def credentials_file(self, name: str, **values: str) -> Path:
        """Another credentials file (wrong password, token...), 0600 like a real one."""
        path = self.folder / name
        path.write_text("".join(f'{k} = "{v}"\n' for k, v in values.items()))
        path.chmod(0o600)
        return path


def _require() -> None:
    missing = [name for name, found in (("Orthanc", shutil.which("Orthanc")),
                                        ("nginx", shutil.which("nginx")),
                                        ("orthanc-dicomweb", DICOMWEB_PLUGIN.exists()))
               if not found]
    if missing:
        if os.environ.get("FEDRAD_REQUIRE_PACS") == "1":
            raise RuntimeError(f"{missing} not installed; `make test` installs them "
                               "(apt-get install orthanc orthanc-dicomweb nginx-light)")
        pytest.skip(f"{missing} not installed (make test installs them)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"not listening on {port} after 30 s: {log.read_text()[-2000:]}")


def _nginx_conf(folder: Path, port: int, token_port: int, upstream: int, cert: Path,
                key: Path) -> str:
    import base64

    temp = folder / "nginx-temp"
    temp.mkdir()
    user = "user root;\n" if os.geteuid() == 0 else ""
    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    return f"""{user}daemon off;
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/nginx-error.log;
events {{}}
http {{
  access_log off;
  client_body_temp_path {temp}/body; proxy_temp_path {temp}/proxy;
  fastcgi_temp_path {temp}/fastcgi; uwsgi_temp_path {temp}/uwsgi; scgi_temp_path {temp}/scgi;
  client_max_body_size 0;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {cert}; ssl_certificate_key {key};
    location / {{ proxy_pass http://127.0.0.1:{upstream}; proxy_request_buffering off; }}
  }}
  map $http_authorization $token_ok {{ "Bearer {TOKEN}" 1; default 0; }}
  server {{
    listen 127.0.0.1:{token_port} ssl;
    ssl_certificate {cert}; ssl_certificate_key {key};
    location / {{
      if ($token_ok = 0) {{ return 401; }}
      proxy_set_header Authorization "Basic {basic}";
      proxy_pass http://127.0.0.1:{upstream}; proxy_request_buffering off;
    }}
  }}
}}
"""


def start_pacs(folder: Path) -> Iterator[Pacs]:
    """Orthanc + nginx in `folder`, stopped when the generator is closed."""
    from common.pki import create_ca, issue_server_cert

    _require()
    pki = folder / "pki"
    create_ca(pki, "test hospital PACS")
    tls = issue_server_cert(pki, ["127.0.0.1"])
    orthanc_port, https_port, token_port = _free_port(), _free_port(), _free_port()
    (folder / "db").mkdir()
    config = {
        "Name": "fedrad-test-pacs", "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"), "HttpPort": orthanc_port,
        "DicomServerEnabled": False, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "Full"},
        "HttpCompressionEnabled": False,
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    (folder / "nginx.conf").write_text(_nginx_conf(folder, https_port, token_port,
                                                   orthanc_port, tls.server_cert,
                                                   tls.server_key))
    logs = {name: (folder / f"{name}.log").open("w") for name in ("orthanc", "nginx")}
    orthanc = subprocess.Popen(["Orthanc", str(folder / "orthanc.json")],
                               stdout=logs["orthanc"], stderr=subprocess.STDOUT)
    nginx = subprocess.Popen(["nginx", "-c", str(folder / "nginx.conf"), "-e",
                              str(folder / "nginx-error.log")],
                             stdout=logs["nginx"], stderr=subprocess.STDOUT)
    try:
        _wait_port(orthanc_port, orthanc, folder / "orthanc.log")
        _wait_port(https_port, nginx, folder / "nginx-error.log")
        _wait_port(token_port, nginx, folder / "nginx-error.log")
        credentials = folder / "credentials.toml"
        credentials.write_text(f'username = "{USER}"\npassword = "{PASSWORD}"\n')
        credentials.chmod(0o600)
        yield Pacs(f"https://127.0.0.1:{https_port}/dicom-web",
                   f"https://127.0.0.1:{token_port}/dicom-web", tls.ca_cert, credentials,
                   folder)
    finally:
        for process in (nginx, orthanc):
            process.terminate()
        for process in (nginx, orthanc):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
        for log in logs.values():
            log.close()
