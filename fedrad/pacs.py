"""A hospital PACS over DICOMweb (QIDO-RS, WADO-RS, STOW-RS), as the site reaches it.

Outbound HTTPS only: a site opens no port. The PACS' certificate is checked against the
site's CA bundle (or the system's). Credentials come from a file the hospital writes
(TOML: `username` and `password`, or `token` for a bearer token), never from the command
line, never logged; a file that others on the machine can read is refused, as ssh refuses
such a key. Every failure names the PACS URL and says what to do.
"""

from __future__ import annotations

import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import requests
from dicomweb_client.api import DICOMwebClient

TIMEOUT_S = 60.0
T = TypeVar("T")


class PacsError(RuntimeError):
    """The PACS cannot be reached, refuses us, or sends something unusable."""


@dataclass(frozen=True)
class PacsConnection:
    """Where the PACS is and how to prove who we are; no secret held in memory here."""

    url: str
    credentials: Path | None = None
    ca_bundle: Path | None = None

    def __post_init__(self) -> None:
        if not self.url.startswith("https://"):
            raise PacsError(f"--dicomweb {self.url}: the PACS must be reached over HTTPS "
                            "(https://host/dicom-web); patient images never cross a link "
                            "in clear text")
        if self.ca_bundle is not None and not self.ca_bundle.is_file():
            raise PacsError(f"--ca-bundle {self.ca_bundle}: no such file; give the PEM "
                            "file of the CA that signed the PACS' certificate")

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> PacsConnection | None:
        """The node config's dicomweb-* keys; None when no dicomweb-url is set."""
        url = values.get("dicomweb-url")
        if not url:
            return None
        paths = {k: Path(str(values[k])).expanduser() if values.get(k) else None
                 for k in ("dicomweb-credentials", "dicomweb-ca-bundle")}
        return cls(str(url), paths["dicomweb-credentials"], paths["dicomweb-ca-bundle"])


def _read_credentials(path: Path) -> dict[str, str]:
    try:
        mode = path.stat().st_mode
        values = tomllib.loads(path.read_text())
    except OSError as exc:
        raise PacsError(f"--credentials {path}: cannot read it ({exc.strerror})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise PacsError(f"--credentials {path}: not TOML ({exc}); write username = \"...\" "
                        "and password = \"...\", or token = \"...\"") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PacsError(f"--credentials {path}: others on this machine can read it (mode "
                        f"{stat.S_IMODE(mode):o}); chmod 600 {path}")
    if set(values) == {"token"} or set(values) == {"username", "password"}:
        return {k: str(v) for k, v in values.items()}
    raise PacsError(f"--credentials {path}: expected the keys username and password, or "
                    f"token alone; found {sorted(values)}")


class _Session(requests.Session):
    """A session whose `verify` (the site's CA bundle) wins over REQUESTS_CA_BUNDLE and
    CURL_CA_BUNDLE: requests lets those replace a session's own setting (requests #3829).
    Proxies from the environment still apply."""

    def merge_environment_settings(self, url: Any, proxies: Any, stream: Any, verify: Any,
                                   cert: Any) -> dict[str, Any]:
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        settings["verify"] = self.verify
        return settings


def open_client(connection: PacsConnection) -> DICOMwebClient:
    """A DICOMweb client over one HTTPS session (certificate checked, credentials set)."""
    session = _Session()
    session.verify = str(connection.ca_bundle) if connection.ca_bundle else True
    if connection.credentials is not None:
        secret = _read_credentials(connection.credentials)
        if "token" in secret:
            session.headers["Authorization"] = f"Bearer {secret['token']}"
        else:
            session.auth = (secret["username"], secret["password"])
    client = DICOMwebClient(connection.url, session=session, timeout=TIMEOUT_S)
    client.set_http_retry_params(retry=True, max_attempts=3, wait_exponential_multiplier=200)
    return client


def call(connection: PacsConnection, what: str, request: Callable[[], T]) -> T:
    """`request()`, with the PACS' failure turned into an error a hospital can act on."""
    try:
        return request()
    except requests.exceptions.SSLError as exc:
        raise PacsError(f"{connection.url}: the PACS' certificate does not verify "
                        f"({type(exc).__name__}); give --ca-bundle, the CA that signed it"
                        ) from exc
    except requests.exceptions.ConnectionError as exc:
        raise PacsError(f"{connection.url}: the PACS cannot be reached while {what}; check "
                        "the URL, that the PACS is up and that this host may reach it"
                        ) from exc
    except requests.exceptions.Timeout as exc:
        raise PacsError(f"{connection.url}: the PACS did not answer within {TIMEOUT_S:.0f} s "
                        f"while {what}; try again, or ask the PACS team") from exc
    except requests.exceptions.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        if status in (401, 403):
            raise PacsError(f"{connection.url}: the PACS refused our credentials (HTTP "
                            f"{status}) while {what}; check the file given as "
                            f"--credentials ({connection.credentials})") from exc
        raise PacsError(f"{connection.url}: the PACS answered HTTP {status} while {what}"
                        ) from exc


def store(connection: PacsConnection, paths: list[Path]) -> list[str]:
    """STOW-RS `paths` in one request; the SOP Instance UIDs the PACS says it stored.
    Anything it refused (or left out of its answer) is an error that names them."""
    import pydicom

    client = open_client(connection)
    datasets = [pydicom.dcmread(path) for path in paths]
    response = call(connection, f"storing {len(paths)} result object(s) (STOW-RS)",
                    lambda: client.store_instances(datasets))
    stored = [str(item.ReferencedSOPInstanceUID)
              for item in response.get("ReferencedSOPSequence", [])]
    refused = {str(item.ReferencedSOPInstanceUID): int(item.get("FailureReason", 0))
               for item in response.get("FailedSOPSequence", [])}
    missing = [str(d.SOPInstanceUID) for d in datasets
               if str(d.SOPInstanceUID) not in stored and str(d.SOPInstanceUID) not in refused]
    if refused or missing:
        raise PacsError(f"{connection.url}: the PACS refused {len(refused) + len(missing)} of "
                        f"{len(paths)} result object(s) (failure reasons {refused}, "
                        f"unanswered {missing}); it stored {stored}. The files are kept "
                        f"in {paths[0].parent}")
    return stored
