"""`fedrad site pull` against a real PACS (Orthanc + DICOMweb behind an HTTPS proxy).

The PACS holds two CXR sites: eurorad (DX, RLE, MONOCHROME1) and literature_other (CR,
Implicit VR). A hospital pulls its cohort by a QIDO filter; what it then trains on must
be exactly what the folder export of the same instances gives.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest

from client.dataset import DataSpec, SiteDataset, content_hash, load_site_dataset
from common.config import Task
from fedrad.pacs import PacsConnection, PacsError, open_client
from fedrad.site_pull import pull, refresh_from_node_config
from tests.conftest import find_canaries
from tests.pacs import Pacs, start_pacs

REPO = Path(__file__).resolve().parents[1]
SITES = ("eurorad", "literature_other")
FILTER = {"eurorad": {"ModalitiesInStudy": "DX"}, "literature_other": {"ModalitiesInStudy": "CR"}}


def _instances(site: Path) -> list[Path]:
    return sorted(p for p in site.rglob("*") if p.is_file() and p.suffix != ".csv")


def _loaded(folder: Path, sites: list[Path]) -> Iterator[Pacs]:
    server = start_pacs(folder)
    running = next(server)
    client = open_client(PacsConnection(running.url, running.credentials, running.ca_bundle))
    for site in sites:
        datasets = [pydicom.dcmread(p) for p in _instances(site)]
        for start in range(0, len(datasets), 25):
            client.store_instances(datasets[start:start + 25])
    yield running
    server.close()


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, cxr_root: Path) -> Iterator[Pacs]:
    """The PACS most tests read (none writes to it)."""
    yield from _loaded(tmp_path_factory.mktemp("pacs"), [cxr_root / s for s in SITES])


@pytest.fixture
def own_pacs(tmp_path_factory: pytest.TempPathFactory, cxr_root: Path) -> Iterator[Pacs]:
    """A PACS of the test's own, with eurorad, for tests that store into it."""
    yield from _loaded(tmp_path_factory.mktemp("own-pacs"), [cxr_root / "eurorad"])


def _connection(pacs: Pacs, **changes: object) -> PacsConnection:
    values: dict = {"url": pacs.url, "credentials": pacs.credentials,
                    "ca_bundle": pacs.ca_bundle, **changes}
    return PacsConnection(**values)


def _hashes(data: SiteDataset, rows: np.ndarray) -> list[str]:
    return sorted(content_hash(data.images[i], data.targets[i]) for i in rows)


def _rows_by_patient(data: SiteDataset) -> dict[str, list[str]]:
    return {key: _hashes(data, np.nonzero(data.groups == g)[0])
            for g, key in enumerate(data.patients)}


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*.dcm")}


@pytest.mark.parametrize("task", [Task.LUNG_SEG, Task.CXR_CLASSIFY])
def test_pulled_cohort_trains_on_exactly_the_folder_export(
        pacs: Pacs, cxr_root: Path, tmp_path: Path, task: Task) -> None:
    site = cxr_root / "eurorad"
    summary = pull(_connection(pacs), tmp_path / "pulled", filters=FILTER["eurorad"],
                   labels=site / "labels.csv")
    assert summary.new == len(_instances(site)) and not summary.failed
    spec = DataSpec(task=task, image_size=64, voi_window=False,
                    labels=("label_covid", "label_no_finding"), labels_file=None,
                    foreground=(1,))
    pulled = load_site_dataset(tmp_path / "pulled", tmp_path / "cache-pulled", spec)
    folder = load_site_dataset(site, tmp_path / "cache-folder", spec)
    assert len(pulled.images) == len(folder.images) > 20
    # the same rows for the same patients (rows come in file order, which the layout sets)
    assert pulled.patients == folder.patients
    assert _rows_by_patient(pulled) == _rows_by_patient(folder)
    train, val = pulled.split(0.25, seed=3)
    train_f, val_f = folder.split(0.25, seed=3)
    assert (_hashes(pulled, val) == _hashes(folder, val_f)
            and _hashes(pulled, train) == _hashes(folder, train_f))
    # stored as the PACS keeps them: RLE stays RLE (no transcoding on the way)
    first = pydicom.dcmread(next((tmp_path / "pulled").rglob("*.dcm")))
    assert first.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless


def test_filter_selects_one_hospitals_studies(pacs: Pacs, cxr_root: Path,
                                              tmp_path: Path) -> None:
    summary = pull(_connection(pacs), tmp_path, filters=FILTER["literature_other"])
    modalities = {str(pydicom.dcmread(p, stop_before_pixels=True).Modality)
                  for p in tmp_path.rglob("*.dcm")}
    assert summary.new == len(_instances(cxr_root / "literature_other"))
    assert modalities == {"CR", "SEG"}


def test_second_pull_fetches_only_new_instances(own_pacs: Pacs, cxr_root: Path,
                                                tmp_path: Path) -> None:
    first = pull(_connection(own_pacs), tmp_path, filters=FILTER["eurorad"])
    before = {k: os.stat(tmp_path / k).st_mtime_ns for k in _files(tmp_path)}
    again = pull(_connection(own_pacs), tmp_path, filters=FILTER["eurorad"])
    assert (again.new, again.already) == (0, first.new)
    assert {k: os.stat(tmp_path / k).st_mtime_ns for k in _files(tmp_path)} == before
    # a new image arrives in the PACS: only it moves
    source = pydicom.dcmread(_instances(cxr_root / "eurorad")[0])
    if source.Modality == "SEG":
        source = pydicom.dcmread(next(p for p in _instances(cxr_root / "eurorad")
                                      if pydicom.dcmread(p).Modality == "DX"))
    source.SOPInstanceUID = pydicom.uid.generate_uid()
    open_client(_connection(own_pacs)).store_instances([source])
    third = pull(_connection(own_pacs), tmp_path, filters=FILTER["eurorad"])
    assert (third.new, third.already) == (1, first.new)
    record = json.loads((tmp_path / ".fedrad-pull.json").read_text())
    assert record["new"] == 1 and record["url"] == own_pacs.url
    assert "password" not in json.dumps(record)


def test_wrong_password_is_a_clear_error_and_keeps_what_was_pulled(
        pacs: Pacs, tmp_path: Path) -> None:
    pull(_connection(pacs), tmp_path, filters=FILTER["literature_other"])
    kept = _files(tmp_path)
    wrong = pacs.credentials_file("wrong.toml", username="site-reader", password="guess")
    with pytest.raises(PacsError) as caught:
        pull(_connection(pacs, credentials=wrong), tmp_path,
             filters=FILTER["literature_other"])
    message = str(caught.value)
    assert pacs.url in message and "refused our credentials (HTTP 401)" in message
    assert str(wrong) in message and "guess" not in message
    assert _files(tmp_path) == kept


def test_bearer_token_through_a_gateway(pacs: Pacs, cxr_root: Path, tmp_path: Path) -> None:
    from tests.pacs import TOKEN

    token = pacs.credentials_file("token.toml", token=TOKEN)
    summary = pull(_connection(pacs, url=pacs.token_url, credentials=token), tmp_path,
                   filters=FILTER["literature_other"])
    assert summary.new == len(_instances(cxr_root / "literature_other"))
    wrong = pacs.credentials_file("wrong-token.toml", token="not-the-token")
    with pytest.raises(PacsError, match=r"refused our credentials \(HTTP 401\)"):
        pull(_connection(pacs, url=pacs.token_url, credentials=wrong), tmp_path / "again")
    # the token is never on the command line or in an error
    assert not list((tmp_path / "again").rglob("*.dcm"))


def test_unreachable_pacs_names_the_url(tmp_path: Path, pacs: Pacs) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    url = f"https://127.0.0.1:{closed}/dicom-web"
    with pytest.raises(PacsError, match=f"{url}: the PACS cannot be reached"):
        pull(PacsConnection(url, pacs.credentials, pacs.ca_bundle), tmp_path)


def test_certificate_from_another_ca_is_refused(pacs: Pacs, tmp_path: Path) -> None:
    # the system's CAs (REQUESTS_CA_BUNDLE may point at them too) never signed the PACS'
    with pytest.raises(PacsError, match="certificate does not verify"):
        pull(_connection(pacs, ca_bundle=None), tmp_path)
    assert not list(tmp_path.rglob("*.dcm"))


def test_plain_http_is_refused() -> None:
    with pytest.raises(PacsError, match="over HTTPS"):
        PacsConnection("http://pacs.example/dicom-web")


def test_credentials_readable_by_others_are_refused(pacs: Pacs, tmp_path: Path) -> None:
    loose = tmp_path / "loose.toml"
    shutil.copyfile(pacs.credentials, loose)
    loose.chmod(0o644)
    with pytest.raises(PacsError, match=f"others on this machine can read it.*chmod 600 {loose}"):
        pull(_connection(pacs, credentials=loose), tmp_path / "out")


def test_broken_instance_in_the_pacs_is_reported_by_the_check_and_the_rest_used(
        own_pacs: Pacs, cxr_root: Path, tmp_path: Path) -> None:
    image = next(p for p in _instances(cxr_root / "literature_other")
                 if pydicom.dcmread(p, stop_before_pixels=True).Modality == "CR")
    broken = pydicom.dcmread(image)
    broken.StudyInstanceUID = pydicom.uid.generate_uid()
    broken.SOPInstanceUID = pydicom.uid.generate_uid()
    broken.PixelData = broken.PixelData[: len(broken.PixelData) // 3]  # truncated pixels
    open_client(_connection(own_pacs)).store_instances([broken])
    summary = pull(_connection(own_pacs), tmp_path, filters={"StudyInstanceUID":
                                                         str(broken.StudyInstanceUID)})
    assert summary.new == 1
    from client.site_check import check_site

    report = check_site(tmp_path)
    assert report["images"] == 0
    assert any("pixel" in s["reason"].lower() for s in report["skipped"]), report["skipped"]


def test_node_config_with_a_pacs_pulls_before_start_and_hides_it_from_the_node(
        pacs: Pacs, tmp_path: Path) -> None:
    values = {"site-id": "lit", "data-dir": str(tmp_path / "data"), "epsilon-budget": 8.0,
              "dicomweb-url": pacs.url, "dicomweb-credentials": str(pacs.credentials),
              "dicomweb-ca-bundle": str(pacs.ca_bundle),
              "dicomweb-study-filter": FILTER["literature_other"]}
    said: list[str] = []
    rest = refresh_from_node_config(values, said.append)
    assert not any(k.startswith("dicomweb-") for k in rest)
    assert rest["data-dir"] == values["data-dir"]
    assert len(list((tmp_path / "data").rglob("*.dcm"))) == 40
    assert said and "40 new instance(s)" in said[0]


def test_cli_pull_json_has_no_phi(pacs: Pacs, cxr_root: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fedrad.cli", "site", "pull", "--dicomweb", pacs.url,
         "--data", str(tmp_path / "data"), "--credentials", str(pacs.credentials),
         "--ca-bundle", str(pacs.ca_bundle), "--study-filter", "ModalitiesInStudy=CR",
         "--json"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["new"] == len(_instances(cxr_root / "literature_other"))
    assert "ZZCANARY" not in done.stdout + done.stderr
    assert "CANARY-" not in done.stdout + done.stderr
    assert "pulling" not in done.stderr  # no progress bar under --json
    (tmp_path / "out.txt").write_text(done.stdout + done.stderr)
    assert find_canaries([tmp_path / "out.txt"]) == []
    assert summary["studies"] > 0


def test_site_check_from_the_pacs_reports_like_the_folder_check(
        pacs: Pacs, cxr_root: Path, tmp_path: Path) -> None:
    def check(*args: str) -> dict:
        done = subprocess.run([sys.executable, "-m", "fedrad.cli", "site", "check", *args,
                               "--json"], capture_output=True, text=True, cwd=REPO,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    site = cxr_root / "eurorad"
    pulled = check("--dicomweb", pacs.url, "--data", str(tmp_path / "data"), "--credentials",
                   str(pacs.credentials), "--ca-bundle", str(pacs.ca_bundle),
                   "--study-filter", "ModalitiesInStudy=DX", "--labels",
                   str(site / "labels.csv"))
    folder = check("--data", str(site))
    for key in ("images", "patients", "masks_matched", "labelled"):
        assert pulled[key] == folder[key], key
