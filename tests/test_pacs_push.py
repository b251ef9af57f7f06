"""`fedrad predict --dicomweb URL --study UID`: a study read from a real PACS (Orthanc),
its SEG or SR stored back with STOW-RS and read back from the PACS."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from fedrad import processes as proc
from fedrad.dicom_results import read_probabilities
from fedrad.pacs import PacsConnection, open_client
from tests.pacs import Pacs, start_pacs

FEDRAD = [sys.executable, "-m", "fedrad.cli"]


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, cxr_root: Path) -> Iterator[Pacs]:
    """radiopaedia's studies (CR, 8-bit) in the PACS."""
    server = start_pacs(tmp_path_factory.mktemp("pacs-push"))
    running = next(server)
    client = open_client(PacsConnection(running.url, running.credentials, running.ca_bundle))
    files = sorted(p for p in (cxr_root / "radiopaedia").rglob("*.dcm"))
    client.store_instances([pydicom.dcmread(p) for p in files])
    yield running
    server.close()


def _study_with_images(cxr_root: Path) -> tuple[str, list[str]]:
    """A radiopaedia study UID and its images' SOP Instance UIDs."""
    by_study: dict[str, list[str]] = {}
    for path in sorted((cxr_root / "radiopaedia").rglob("IM*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        by_study.setdefault(str(ds.StudyInstanceUID), []).append(str(ds.SOPInstanceUID))
    study = max(by_study, key=lambda s: (len(by_study[s]), s))
    return study, by_study[study]


def _predict(model: Path, pacs: Pacs, study: str, out: Path, key: Path | None,
             *extra: str) -> subprocess.CompletedProcess[str]:
    verify = ["--verify-key", str(key)] if key else []
    return subprocess.run([*FEDRAD, "predict", str(model), "--dicomweb", pacs.url, "--study",
                           study, "--credentials", str(pacs.credentials), "--ca-bundle",
                           str(pacs.ca_bundle), "--out", str(out), *verify, *extra],
                          capture_output=True, text=True, check=False,
                          env=proc.child_env({}), timeout=300)


def _predicted(exported, kind: str, pacs: Pacs, cxr_root: Path, tmp_path: Path
               ) -> tuple[str, list[str], dict, subprocess.CompletedProcess[str]]:
    """predict --dicomweb on the biggest radiopaedia study: (study, images, results, run)."""
    study, images = _study_with_images(cxr_root)
    done = _predict(exported["folders"][kind], pacs, study, tmp_path / "out",
                    exported["public"], "--json")
    assert done.returncode == 0, done.stderr
    return study, images, json.loads(done.stdout), done


def _in_pacs(pacs: Pacs, study: str, modality: str) -> list[pydicom.Dataset]:
    client = open_client(PacsConnection(pacs.url, pacs.credentials, pacs.ca_bundle))
    found = client.search_for_instances(study_instance_uid=study,
                                        search_filters={"Modality": modality})
    return [client.retrieve_instance(study, i["0020000E"]["Value"][0],
                                     i["00080018"]["Value"][0]) for i in found]


def test_segmentation_round_trip_through_the_pacs(exported, pacs: Pacs, cxr_root: Path,
                                                  tmp_path: Path) -> None:
    study, images, results, done = _predicted(exported, "seg", pacs, cxr_root, tmp_path)
    assert sorted(e["sop_instance_uid"] for e in results["images"]) == sorted(images)
    stored = results["stored"]["sop_instance_uids"]
    assert sorted(stored) == sorted(e["seg_sop_instance_uid"] for e in results["images"])
    segs = _in_pacs(pacs, study, "SEG")
    fedrad_segs = {str(s.SOPInstanceUID): s for s in segs if s.Manufacturer == "fedrad"}
    assert sorted(fedrad_segs) == sorted(stored)
    for entry in results["images"]:
        back = hd.seg.Segmentation.from_dataset(fedrad_segs[entry["seg_sop_instance_uid"]])
        local = hd.seg.segread(tmp_path / "out" / entry["seg_file"])
        assert (back.pixel_array == local.pixel_array).all()
        referenced = back.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
        assert referenced.ReferencedSOPInstanceUID == entry["sop_instance_uid"]
    assert "ZZCANARY" not in done.stdout + done.stderr
    assert "ZZCANARY" not in (tmp_path / "out" / "results.json").read_text()


def test_classification_sr_round_trip_through_the_pacs(exported, pacs: Pacs, cxr_root: Path,
                                                       tmp_path: Path) -> None:
    study, images, results, _ = _predicted(exported, "cls", pacs, cxr_root, tmp_path)
    reports = {str(r.SOPInstanceUID): r for r in _in_pacs(pacs, study, "SR")}
    for entry in results["images"]:
        back = reports[entry["sr_sop_instance_uid"]]
        expected = {k: v["probability"] for k, v in entry["labels"].items()}
        assert read_probabilities(back) == pytest.approx(expected, abs=1e-6)
        assert back.VerificationFlag == "UNVERIFIED"
    assert len(reports) >= len(images)


def test_unverified_model_is_refused_before_the_pacs_is_touched(
        exported, pacs: Pacs, cxr_root: Path, tmp_path: Path) -> None:
    study, _ = _study_with_images(cxr_root)
    before = len(_in_pacs(pacs, study, "SEG")) + len(_in_pacs(pacs, study, "SR"))
    done = _predict(exported["folders"]["seg"], pacs, study, tmp_path / "out", None)
    assert done.returncode == 1 and "--verify-key" in done.stderr
    assert len(_in_pacs(pacs, study, "SEG")) + len(_in_pacs(pacs, study, "SR")) == before


def test_unknown_study_is_a_clear_error(exported, pacs: Pacs, tmp_path: Path) -> None:
    done = _predict(exported["folders"]["seg"], pacs, "1.2.3.4.5.6.7", tmp_path / "out",
                    exported["public"])
    assert done.returncode == 1
    assert f"{pacs.url} has no study 1.2.3.4.5.6.7" in done.stderr


def test_wrong_credentials_on_push_name_the_pacs(exported, pacs: Pacs, cxr_root: Path,
                                                 tmp_path: Path) -> None:
    study, _ = _study_with_images(cxr_root)
    wrong = pacs.credentials_file("push-wrong.toml", username="site-reader", password="no")
    done = subprocess.run([*FEDRAD, "predict", str(exported["folders"]["seg"]), "--dicomweb",
                           pacs.url, "--study", study, "--credentials", str(wrong),
                           "--ca-bundle", str(pacs.ca_bundle), "--out", str(tmp_path / "o"),
                           "--verify-key", str(exported["public"])],
                          capture_output=True, text=True, check=False,
                          env=proc.child_env({}), timeout=300)
    assert done.returncode == 1
    assert f"{pacs.url}: the PACS refused our credentials (HTTP 401)" in done.stderr
