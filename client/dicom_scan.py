"""Walk a hospital's DICOM export, whatever its layout, and sort what is there.

Files are recognised by content (not extension) and dispatched on SOP Class.
A file that cannot be read is reported with its reason and the scan goes on.
The patient identifiers met on the way are collected for the PHI guard; they
stay in memory at the site.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from client.pixels import PIXEL_KEYWORDS

LOG = logging.getLogger("fedrad.client")

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"
IMAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR",
    "1.2.840.10008.5.1.4.1.1.1.1": "DX",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "DX",
    "1.2.840.10008.5.1.4.1.1.7": "SC",
    "1.2.840.10008.5.1.4.1.1.2": "CT",
    "1.2.840.10008.5.1.4.1.1.4": "MR",
}
NON_DICOM_NAMES = {"labels.csv", "SOURCES.csv"}
# Header fields whose values identify a person or a visit; their values feed
# the PHI guard (they are counted by `site check`, never printed).
PHI_KEYWORDS = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "PatientBirthDate",
    "AccessionNumber",
    "ReferringPhysicianName",
    "InstitutionName",
    "InstitutionAddress",
    "StationName",
    "StudyID",
    "DeviceSerialNumber",
)


@dataclass(frozen=True)
class Skipped:
    """A file the scan could not use, and why."""

    file: str  # relative to the data folder (site-local; never sent)
    reason: str


@dataclass(frozen=True)
class ImageRef:
    """An image file the site can train on."""

    path: Path
    sop_instance_uid: str
    series_uid: str
    study_uid: str
    patient_key: str  # a one-way hash of PatientID, for grouping only
    modality: str
    transfer_syntax: str
    accession_number: str = ""  # site-local join key for labels; never sent


@dataclass(frozen=True)
class SegRef:
    """A DICOM SEG file and the image it segments."""

    path: Path
    sop_instance_uid: str
    referenced_sop_uid: str


@dataclass
class ScanResult:
    """Everything found in one data folder."""

    root: Path
    images: list[ImageRef] = field(default_factory=list)
    segs: list[SegRef] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    other_objects: Counter[str] = field(default_factory=Counter)
    phi_values: set[str] = field(default_factory=set)
    phi_fields: int = 0

    def skip(self, path: Path, reason: str) -> None:
        self.skipped.append(Skipped(file=str(path.relative_to(self.root)), reason=reason))


def patient_key(patient_id: str) -> str:
    """One-way grouping key for a patient (never the identifier itself)."""
    return hashlib.sha256(f"fedrad-patient|{patient_id}".encode()).hexdigest()[:16]


def _collect_phi(ds: pydicom.Dataset, result: ScanResult) -> None:
    for keyword in PHI_KEYWORDS:
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        result.phi_fields += 1
        text = str(value)
        result.phi_values.add(text)
        if keyword.endswith("Name"):
            result.phi_values.update(part for part in text.split("^") if len(part) >= 4)


def iter_files(root: Path) -> list[Path]:
    """Every regular file under root, in a stable order."""
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            found.append(Path(folder) / name)
    return found


def scan_folder(root: Path) -> ScanResult:
    """Read every file's header under `root` and sort images, SEGs and the rest."""
    result = ScanResult(root=root)
    seen: dict[str, Path] = {}
    for path in iter_files(root):
        if path.name in NON_DICOM_NAMES:
            continue
        if path.stat().st_size == 0:
            result.skip(path, "empty file (0 bytes)")
            continue
        try:
            ds = pydicom.dcmread(path, defer_size="2 KB")
        except InvalidDicomError:
            result.skip(path, "not a DICOM file (no DICM preamble or valid header)")
            continue
        except Exception as exc:  # noqa: BLE001 - one bad file never stops the scan
            result.skip(path, f"unreadable DICOM header ({type(exc).__name__})")
            continue
        sop_class = str(ds.get("SOPClassUID", ""))
        sop_uid = str(ds.get("SOPInstanceUID", ""))
        if sop_class == MEDIA_DIRECTORY or path.name == "DICOMDIR":
            continue
        if not sop_class or not sop_uid:
            result.skip(path, "missing SOPClassUID or SOPInstanceUID")
            continue
        if sop_uid in seen:
            result.skip(path, "duplicate SOPInstanceUID (first copy kept)")
            continue
        seen[sop_uid] = path
        _collect_phi(ds, result)
        if sop_class == SEG_STORAGE:
            _add_seg(ds, path, result)
        elif any(keyword in ds for keyword in PIXEL_KEYWORDS):
            _add_image(ds, path, sop_class, result)
        elif sop_class in IMAGE_CLASSES:
            result.skip(path, "image object without PixelData")
        else:  # SR, waveforms, RT plans...: nothing to decode
            result.other_objects[str(ds.get("Modality", "") or sop_class)] += 1
    LOG.info(
        "scan: %d images, %d SEG, %d other objects, %d skipped",
        len(result.images), len(result.segs), sum(result.other_objects.values()),
        len(result.skipped),
    )
    return result


def _add_image(ds: pydicom.Dataset, path: Path, sop_class: str, result: ScanResult) -> None:
    result.images.append(
        ImageRef(
            path=path,
            sop_instance_uid=str(ds.SOPInstanceUID),
            series_uid=str(ds.get("SeriesInstanceUID", "")),
            study_uid=str(ds.get("StudyInstanceUID", "")),
            patient_key=patient_key(str(ds.get("PatientID", ""))),
            modality=str(ds.get("Modality", "") or IMAGE_CLASSES.get(sop_class, "OT")),
            transfer_syntax=str(ds.file_meta.get("TransferSyntaxUID", "")),
            accession_number=str(ds.get("AccessionNumber", "")),
        )
    )


def _add_seg(ds: pydicom.Dataset, path: Path, result: ScanResult) -> None:
    try:
        ref = ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
        referenced = str(ref.ReferencedSOPInstanceUID)
    except (AttributeError, IndexError):
        result.skip(path, "SEG without ReferencedSeriesSequence/ReferencedInstanceSequence")
        return
    result.segs.append(
        SegRef(path=path, sop_instance_uid=str(ds.SOPInstanceUID), referenced_sop_uid=referenced)
    )
