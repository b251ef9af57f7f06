"""../shared/data/dicom-corpus: each file's outcome equals its MANIFEST.csv expectation."""

from __future__ import annotations

import csv
import importlib.util

import pytest

from client.dicom_scan import scan_folder
from client.pixels import frames, probe
from tests.conftest import shared_data

CORPUS = shared_data() / "dicom-corpus"
ROWS = list(csv.DictReader((CORPUS / "MANIFEST.csv").open())) if CORPUS.is_dir() else []
# fedrad ships no GPL decoder; files only pylibjpeg-libjpeg decodes are reported instead.
GPL_ONLY = {"pydicom__JPGExtended.dcm"}
HAVE_LIBJPEG = importlib.util.find_spec("libjpeg") is not None


@pytest.mark.skipif(not ROWS, reason="dicom-corpus not found (set FEDRAD_SHARED_DATA)")
@pytest.mark.parametrize("row", ROWS, ids=lambda r: r["file"])
def test_outcome_matches_manifest(row) -> None:
    outcome, reason = probe(CORPUS / row["file"])
    expected = row["expected_decode"]
    if row["file"] in GPL_ONLY and not HAVE_LIBJPEG:
        assert outcome == "fails"
        assert "no installed decoder handles JPEG Extended" in reason and "GPL" in reason
        return
    assert outcome == expected, reason
    if expected == "ok" and row["modality"] != "SEG":
        decoded = frames(CORPUS / row["file"])
        assert decoded.shape[0] == int(row["frames"])


@pytest.mark.skipif(not ROWS, reason="dicom-corpus not found (set FEDRAD_SHARED_DATA)")
def test_scan_of_the_corpus_completes_and_reports() -> None:
    scan = scan_folder(CORPUS)
    skipped = {entry.file: entry.reason for entry in scan.skipped}
    assert "no preamble" in skipped["pydicom__no_meta.dcm"] or \
        "not a DICOM" in skipped["pydicom__no_meta.dcm"]
    assert "SOPClassUID" in skipped["pydicom__meta_missing_tsyntax.dcm"]
    assert scan.other_objects["SR"] == 2 and scan.other_objects["ECG"] == 1
    assert len(scan.images) + len(scan.segs) > 20
