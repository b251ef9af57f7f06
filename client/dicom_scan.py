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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.datadict import tag_for_keyword
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


_PHI_TAGS = tuple((keyword, tag_for_keyword(keyword)) for keyword in PHI_KEYWORDS)


def _collect_phi(ds: pydicom.Dataset, result: ScanResult) -> None:
    """Identifier values from the raw header bytes (no value conversion: it is the hot path)."""
    encoding = "utf-8" if "ISO_IR 192" in str(ds.get("SpecificCharacterSet", "")) else "latin-1"
    for keyword, tag in _PHI_TAGS:
        if tag is None or tag not in ds:
            continue
        raw = ds.get_item(tag)
        value = raw.value if raw is not None else None
        if isinstance(value, bytes):
            text = value.decode(encoding, errors="replace").strip(" \x00")
        elif value is None:
            continue
        else:
            text = str(value)
        if not text:
            continue
        result.phi_fields += 1
        for item in text.split("\\"):
            result.phi_values.add(item)
            if keyword.endswith("Name"):
                result.phi_values.update(
                    part for group in item.split("=") for part in group.split("^")
                    if len(part) >= 4
                )


def iter_files(root: Path) -> list[Path]:
    """Every regular file under root, in a stable order."""
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            found.append(Path(folder) / name)
    return found


Visitor = Callable[[str, "ImageRef | SegRef", pydicom.Dataset], None]


def scan_folder(root: Path, visit: Visitor | None = None) -> ScanResult:
    """Read every file's header under `root` and sort images, SEGs and the rest.

    With `visit`, each file is read whole, once, and every image ("image") and SEG
    ("seg") dataset is handed to `visit` as it is found, so a caller can decode
    pixels in the same pass instead of reading the file again.
    """
    result = ScanResult(root=root)
    defer = None if visit else "2 KB"
    seen: dict[str, Path] = {}
    for path in iter_files(root):
        if path.name in NON_DICOM_NAMES:
            continue
        if path.stat().st_size == 0:
            result.skip(path, "empty file (0 bytes)")
            continue
        try:
            ds = pydicom.dcmread(path, defer_size=defer)
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
            if visit and result.segs and result.segs[-1].path == path:
                visit("seg", result.segs[-1], ds)
        elif any(keyword in ds for keyword in PIXEL_KEYWORDS):
            _add_image(ds, path, sop_class, result)
            if visit:
                visit("image", result.images[-1], ds)
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
