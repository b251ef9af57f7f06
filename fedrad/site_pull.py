"""`fedrad site pull`: a training cohort from the hospital's PACS into the site's folder.

QIDO-RS finds the studies (filtered as the hospital says) and their instances; WADO-RS
retrieves each instance in the transfer syntax the PACS stores. Each one is written as
`<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm` under the site's data
folder, by rename of a finished file, so a pull cut short leaves only whole files and a
second pull fetches only what is new. What the site then trains on goes through the same
ingestion, checks, cache and PHI guard as a folder export of the same instances.

The PACS is outside the site's trust: a UID that is not a DICOM UID (which could name a
path outside the folder), an instance other than the one asked for, or a body that is not
DICOM is reported and skipped; the pull goes on. A refusal of our credentials, or a PACS
that cannot be reached, stops the pull and keeps every file already pulled.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pydicom
import requests
from pydicom.datadict import tag_for_keyword
from pydicom.errors import InvalidDicomError

from client.dicom_scan import PULL_RECORD
from fedrad.pacs import PacsConnection, PacsError, call, open_client

UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
ANY_TRANSFER_SYNTAX = (("application/dicom", "*"),)  # as stored: no transcoding
PAGE = 1000  # QIDO-RS results asked for at a time


@dataclass
class PullSummary:
    folder: Path
    studies: int = 0
    new: int = 0
    already: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "studies": self.studies, "new": self.new,
                "already": self.already, "failed": self.failed}


def parse_filters(items: list[str]) -> dict[str, str]:
    """--study-filter KEY=VALUE (QIDO-RS attribute keywords, e.g. ModalitiesInStudy=CR)."""
    filters = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or tag_for_keyword(key.strip()) is None:
            raise PacsError(f"--study-filter {item!r}: expected KEYWORD=VALUE with a DICOM "
                            "attribute keyword, e.g. ModalitiesInStudy=CR or "
                            "StudyDate=20200101-20201231")
        filters[key.strip()] = value.strip()
    return filters


def _value(attributes: dict[str, Any], tag: str) -> str:
    values = attributes.get(tag, {}).get("Value") or [""]
    return str(values[0])


def _search(search: Callable[..., list[dict[str, Any]]], key: str, **query: Any
            ) -> list[dict[str, Any]]:
    """Every match of a QIDO-RS search, page by page. dicomweb-client's get_remaining
    loops for ever on a PACS that ignores `offset` (Orthanc 1.10 with a filter): a page
    that brings nothing new ends the search here."""
    found: dict[str, dict[str, Any]] = {}
    while True:
        page = search(**query, offset=len(found), limit=PAGE)
        new = {_value(a, key): a for a in page if _value(a, key) not in found}
        found.update(new)
        if len(page) < PAGE or not new:
            return list(found.values())


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    part = path.with_name(path.name + ".part")
    write(part)
    os.chmod(part, 0o600)
    os.replace(part, path)


def _retrieve(client: Any, study: str, series: str, sop: str) -> pydicom.Dataset | str:
    """The instance, or why it is not usable (the pull goes on)."""
    try:
        dataset = client.retrieve_instance(study, series, sop, media_types=ANY_TRANSFER_SYNTAX)
    except requests.exceptions.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        if status in (401, 403):
            raise
        return f"the PACS answered HTTP {status} for this instance"
    except (InvalidDicomError, ValueError, KeyError, EOFError) as exc:
        return f"the PACS sent something that is not a DICOM instance ({type(exc).__name__})"
    if str(dataset.get("SOPInstanceUID", "")) != sop:
        return "the PACS sent another instance than the one asked for"
    return dataset


def _to_fetch(connection: PacsConnection, client: Any, dest: Path, filters: dict[str, str],
              summary: PullSummary) -> list[tuple[str, str, str, Path]]:
    """(study, series, sop, path) of every instance not yet in `dest` (QIDO-RS only)."""
    todo = []
    studies = call(connection, "searching for studies (QIDO-RS)",
                   lambda: _search(client.search_for_studies, "0020000D",
                                   search_filters=filters))
    for study_attributes in studies:
        study = _value(study_attributes, "0020000D")
        if not UID.match(study) or len(study) > 64:
            summary.failed.append({"study": study[:80], "reason": "not a DICOM UID"})
            continue
        summary.studies += 1
        instances = call(connection, f"listing the instances of study {study} (QIDO-RS)",
                         partial(_search, client.search_for_instances, "00080018",
                                 study_instance_uid=study))
        for attributes in instances:
            series, sop = _value(attributes, "0020000E"), _value(attributes, "00080018")
            if not all(UID.match(u) and len(u) <= 64 for u in (series, sop)):
                summary.failed.append({"instance": f"{series[:80]}/{sop[:80]}",
                                       "reason": "not a DICOM UID; not written"})
                continue
            path = dest / study / series / f"{sop}.dcm"
            if path.exists():
                summary.already += 1
            else:
                todo.append((study, series, sop, path))
    return todo


def pull(connection: PacsConnection, dest: Path, *, filters: dict[str, str] | None = None,
         labels: Path | None = None, say: Callable[[str], None] = lambda _: None,
         progress: Callable[[int, int], None] = lambda done, total: None) -> PullSummary:
    """Bring `dest` up to date with the studies the PACS returns for `filters`;
    `progress(done, total)` after each instance retrieved."""
    client = open_client(connection)
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    summary = PullSummary(dest)
    todo = _to_fetch(connection, client, dest, filters or {}, summary)
    progress(0, len(todo))
    for done, (study, series, sop, path) in enumerate(todo, start=1):
        got = call(connection, f"retrieving instance {sop} (WADO-RS)",
                   partial(_retrieve, client, study, series, sop))
        if isinstance(got, str):
            summary.failed.append({"instance": sop, "reason": got})
        else:
            _write_atomic(path, partial(got.save_as, enforce_file_format=True))
            summary.new += 1
        progress(done, len(todo))
    if labels is not None:
        if not labels.is_file():
            raise PacsError(f"--labels {labels}: no such file")
        _write_atomic(dest / "labels.csv", lambda part: shutil.copyfile(labels, part))
    record = {"url": connection.url, "filters": filters or {},
              "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
              **{k: v for k, v in summary.as_dict().items() if k != "folder"}}
    _write_atomic(dest / PULL_RECORD, lambda part: part.write_text(json.dumps(record, indent=1)))
    say(f"pulled {summary.new} new instance(s) of {summary.studies} studies into {dest} "
        f"({summary.already} already there, {len(summary.failed)} not usable)")
    return summary


DICOMWEB_KEYS = frozenset({"dicomweb-url", "dicomweb-credentials", "dicomweb-ca-bundle",
                           "dicomweb-study-filter"})


def refresh_from_node_config(values: dict[str, Any], say: Callable[[str], None]
                             ) -> dict[str, Any]:
    """`site start` with a PACS in its node config: pull into data-dir first. Returns the
    values without the dicomweb-* keys (the SuperNode never sees the PACS' address)."""
    connection = PacsConnection.from_mapping(values)
    rest = {k: v for k, v in values.items() if k not in DICOMWEB_KEYS}
    if connection is None:
        if set(values) & DICOMWEB_KEYS:
            raise PacsError(f"node config sets {sorted(set(values) & DICOMWEB_KEYS)} but no "
                            "dicomweb-url; add the PACS' DICOMweb root or remove them")
        return rest
    table = values.get("dicomweb-study-filter", {})
    if not isinstance(table, dict):
        raise PacsError("node config dicomweb-study-filter must be a table, e.g. "
                        "dicomweb-study-filter = { ModalitiesInStudy = \"CR\" }")
    filters = parse_filters([f"{k}={v}" for k, v in table.items()])
    if "data-dir" not in values:
        raise PacsError("node config has dicomweb-url but no data-dir to pull into")
    pull(connection, Path(str(values["data-dir"])).expanduser(), filters=filters, say=say)
    return rest
