"""Walk a hospital's DICOM export, whatever its layout, and sort what is there.

Files are recognised by content (not extension) and dispatched on SOP Class.
A file that cannot be read is reported with its reason and the scan goes on.
The patient identifiers met on the way are collected for the PHI guard; they
stay in memory at the site.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.errors import InvalidDicomError

from client.header import first_referenced_instance, text
from client.limits import DEFLATED, MAX_INFLATED_BYTES, LimitExceeded, check_deflated
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
PULL_RECORD = ".fedrad-pull.json"  # written by `fedrad site pull` beside what it pulled
NON_DICOM_NAMES = {"labels.csv", "SOURCES.csv", PULL_RECORD}
BURNED_IN_ANNOTATION = 0x00280301
# Header fields whose values identify a person or a visit: the person- and visit-
# identifying attributes of DICOM's Basic Application Level Confidentiality Profile
# (PS3.15 Table E.1-1), found at any depth of nested sequences. Their values feed the PHI
# guard (they are counted by `site check`, never printed). Free-text descriptions of the
# study or series (StudyDescription, ProtocolName, ...) are not among them: their common
# words would match the names of fedrad's own records and metrics.
PHI_KEYWORDS = frozenset({
    "PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames",
    "OtherPatientIDsSequence", "IssuerOfPatientID", "PatientBirthDate", "PatientBirthTime",
    "PatientBirthName", "PatientMotherBirthName", "PatientAddress",
    "PatientTelephoneNumbers", "PatientAge", "MedicalRecordLocator", "PatientComments",
    "AdditionalPatientHistory", "MilitaryRank", "BranchOfService", "Occupation",
    "CountryOfResidence", "RegionOfResidence", "EthnicGroup", "ResponsiblePerson",
    "ResponsibleOrganization", "AccessionNumber", "AdmissionID", "IssuerOfAdmissionID",
    "StudyID", "RequestedProcedureID", "ScheduledProcedureStepID",
    "PerformedProcedureStepID", "PlacerOrderNumberImagingServiceRequest",
    "FillerOrderNumberImagingServiceRequest", "ReferringPhysicianName",
    "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
    "ConsultingPhysicianName", "PhysiciansOfRecord", "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy", "RequestingPhysician", "ScheduledPerformingPhysicianName",
    "OperatorsName", "PersonName", "VerifyingObserverName", "ContentCreatorName",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName",
    "DeviceSerialNumber", "CurrentPatientLocation",
})


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

    _seen: dict[str, Path] = field(default_factory=dict, repr=False)

    def skip(self, path: Path, reason: str) -> None:
        self.skipped.append(Skipped(file=str(path.relative_to(self.root)), reason=reason))

    def add(self, path: Path, note: FileNote) -> None:
        """Take one file's note, in scan order (the first copy of a SOP Instance wins)."""
        if note.kind == "ignore":
            return
        if note.sop_instance_uid:
            if note.sop_instance_uid in self._seen:
                self.skip(path, "duplicate SOPInstanceUID (first copy kept)")
                return
            self._seen[note.sop_instance_uid] = path
            self.phi_values.update(note.phi_values)
            self.phi_fields += note.phi_fields
        if note.kind == "skip":
            self.skip(path, note.reason)
        elif note.kind == "image":
            self.images.append(note.image_ref(path))
        elif note.kind == "seg":
            self.segs.append(note.seg_ref(path))
        else:
            self.other_objects[note.modality] += 1

    def log(self) -> None:
        LOG.info(
            "scan: %d images, %d SEG, %d other objects, %d skipped",
            len(self.images), len(self.segs), sum(self.other_objects.values()),
            len(self.skipped),
        )


def patient_key(patient_id: str) -> str:
    """One-way grouping key for a patient (never the identifier itself)."""
    return hashlib.sha256(f"fedrad-patient|{patient_id}".encode()).hexdigest()[:16]


_PHI_TAGS = {tag: keyword for keyword in sorted(PHI_KEYWORDS)
             if (tag := tag_for_keyword(keyword)) is not None}


def _encoding(ds: pydicom.Dataset) -> str:
    """The Python codec for the dataset's person names and IDs (UTF-8 or Latin-1)."""
    return "utf-8" if "ISO_IR 192" in text(ds, 0x00080005) else "latin-1"


def _phi(ds: pydicom.Dataset) -> tuple[tuple[str, ...], int]:
    """Identifier values of the PHI_KEYWORDS fields at any depth, and how many fields
    held one. A person name also gives each of its components of 4+ characters."""
    encoding = _encoding(ds)
    values: set[str] = set()
    fields = 0
    for elem in _walk(ds):
        if elem.VR == "SQ":
            continue
        raw = elem.value
        value = (raw.decode(encoding, errors="replace") if isinstance(raw, bytes)
                 else "\\".join(str(v) for v in raw) if isinstance(raw, list | tuple |
                                                          pydicom.multival.MultiValue)
                 else "" if raw is None else str(raw)).strip(" \x00")
        if not value:
            continue
        fields += 1
        for item in value.split("\\"):
            values.add(item.strip())
            if elem.VR == "PN" or _PHI_TAGS[elem.tag].endswith("Name"):
                values.update(
                    part for group in item.split("=") for part in group.split("^")
                    if len(part) >= 4
                )
    return tuple(sorted(v for v in values if v)), fields


def _walk(ds: pydicom.Dataset, depth: int = 0) -> Iterator[Any]:
    """The PHI_KEYWORDS elements of `ds` at any depth of nested sequences (8 levels at
    most). Only those and the sequences are converted; every other element stays raw."""
    for raw in ds.elements():
        tag = raw.tag
        if tag in _PHI_TAGS:
            yield ds[tag]
        elif (raw.VR or _dictionary_vr(tag)) == "SQ" and depth < 8:
            for item in ds[tag].value or ():  # a broken one raises: the file is skipped
                yield from _walk(item, depth + 1)


def _dictionary_vr(tag: int) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:  # private or unknown
        return ""


@dataclass(frozen=True)
class FileEntry:
    """A regular file under the data folder and the stat values that date its content."""

    root: Path
    rel: str  # path relative to root, "/"-separated
    size: int
    mtime_ns: int

    @property
    def path(self) -> Path:
        return self.root / self.rel


def walk_files(root: Path, skipped: list[Skipped] | None = None) -> list[FileEntry]:
    """Every regular file under root with its size and mtime, in a stable order.

    Symbolic links are followed only while they stay inside `root` (a PACS export may
    link within itself), each folder is entered once (a link loop ends nowhere), and an
    unreadable folder is skipped; each of these lands in `skipped` with its reason.
    """
    found: list[FileEntry] = []
    stack = [""]
    base = os.path.realpath(root)
    seen: set[tuple[int, int]] = set()

    def skip(rel: str, reason: str) -> None:
        if skipped is not None:
            skipped.append(Skipped(rel, reason))

    while stack:
        folder = stack.pop()
        where = os.path.join(base, folder) if folder else base
        try:
            status = os.stat(where)
            if (status.st_dev, status.st_ino) in seen:
                skip(folder, "folder already scanned (a symbolic link loop)")
                continue
            seen.add((status.st_dev, status.st_ino))
            with os.scandir(where) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            skip(folder, f"folder cannot be read ({exc.strerror or type(exc).__name__})")
            continue
        subfolders = []
        for entry in entries:
            rel = f"{folder}/{entry.name}" if folder else entry.name
            try:
                if entry.is_symlink() and not _inside(base, entry.path):
                    skip(rel, "symbolic link that leads outside the data folder")
                    continue
                if entry.is_dir(follow_symlinks=True):
                    subfolders.append(rel)
                elif entry.is_file(follow_symlinks=True):
                    stat = entry.stat()
                    found.append(FileEntry(root, rel, stat.st_size, stat.st_mtime_ns))
            except OSError as exc:
                skip(rel, f"cannot be read ({exc.strerror or type(exc).__name__})")
        stack.extend(reversed(subfolders))
    return found


def _inside(base: str, path: str) -> bool:
    """Whether `path`, with every link resolved, stays inside `base`."""
    try:
        target = os.path.realpath(path, strict=True)
    except OSError:
        return False  # a dangling link or a loop
    return target == base or target.startswith(base + os.sep)


def _deflated(path: Path) -> bool:
    """Whether a file's meta group names the Deflated transfer syntax (from its head)."""
    with path.open("rb") as handle:
        head = handle.read(4096)
    return DEFLATED.encode() in head


def iter_files(root: Path, skipped: list[Skipped] | None = None) -> list[Path]:
    """Every regular file under root, in a stable order (see walk_files)."""
    return [entry.path for entry in walk_files(root, skipped)]


# (kind, reference, dataset): kind "image" or "seg" with the file's dataset, or "nifti"
# (a mask kept as NIfTI) with None: the visitor reads it from the reference's path.
Visitor = Callable[[str, "ImageRef | SegRef", pydicom.Dataset | None], None]
NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass(frozen=True)
class FileNote:
    """What one file holds, as far as a scan cares: replayable while its content is unchanged.

    `kind` is "image", "seg" (a DICOM SEG, or a NIfTI mask named after the
    SOPInstanceUID of the image it segments: `<uid>.nii[.gz]`), "other" (SR, RT,
    waveform: nothing to decode), "skip" (with `reason`) or "ignore" (DICOMDIR,
    labels.csv).
    """

    kind: str
    reason: str = ""
    sop_class: str = ""
    sop_instance_uid: str = ""
    series_uid: str = ""
    study_uid: str = ""
    patient_key: str = ""
    modality: str = ""
    transfer_syntax: str = ""
    accession_number: str = ""  # site-local join key for labels; never sent
    referenced_sop_uid: str = ""
    phi_values: tuple[str, ...] = ()
    phi_fields: int = 0

    def image_ref(self, path: Path) -> ImageRef:
        return ImageRef(path, self.sop_instance_uid, self.series_uid, self.study_uid,
                        self.patient_key, self.modality, self.transfer_syntax,
                        self.accession_number)

    def seg_ref(self, path: Path) -> SegRef:
        return SegRef(path, self.sop_instance_uid, self.referenced_sop_uid)


def examine(path: Path, data: bytes | None = None, visit: Visitor | None = None) -> FileNote:
    """Read one file (from `data` when the caller already holds its bytes) and describe it.

    With `visit`, the whole file is read and each image or SEG dataset is handed to
    `visit`, so the caller decodes pixels from this same read. Never raises on bad input.
    """
    if path.name in NON_DICOM_NAMES:
        return FileNote("ignore")
    if path.name.endswith(NIFTI_SUFFIXES):
        return _nifti_note(path, visit)
    size = len(data) if data is not None else path.stat().st_size
    if size == 0:
        return FileNote("skip", "empty file (0 bytes)")
    if size > MAX_INFLATED_BYTES:
        return FileNote("skip", f"file larger than the site's limit of "
                                f"{MAX_INFLATED_BYTES >> 20} MiB per file")
    try:
        if data is not None or _deflated(path):
            data = data if data is not None else path.read_bytes()
            check_deflated(data)
    except LimitExceeded as exc:
        return FileNote("skip", str(exc))
    try:
        if data is not None:
            ds = pydicom.dcmread(io.BytesIO(data))
        else:
            ds = pydicom.dcmread(path, defer_size=None if visit else "2 KB")
    except InvalidDicomError:
        return FileNote("skip", "not a DICOM file (no DICM preamble or valid header)")
    except Exception as exc:  # noqa: BLE001 - one bad file never stops the scan
        return FileNote("skip", f"unreadable DICOM header ({type(exc).__name__})")
    sop_class = text(ds, 0x00080016)
    sop_uid = text(ds, 0x00080018)
    if sop_class == MEDIA_DIRECTORY or path.name == "DICOMDIR":
        return FileNote("ignore")
    if not sop_class or not sop_uid:
        return FileNote("skip", "missing SOPClassUID or SOPInstanceUID")
    try:
        phi_values, phi_fields = _phi(ds)
    except Exception as exc:  # noqa: BLE001 - fail closed: identifiers unknown, not used
        return FileNote("skip", f"a header sequence cannot be read ({type(exc).__name__}); "
                                "its identifiers are unknown, so the file is not used")
    base: dict[str, Any] = {"sop_class": sop_class, "sop_instance_uid": sop_uid,
            "phi_values": phi_values, "phi_fields": phi_fields}
    if sop_class == SEG_STORAGE:
        note = _seg_note(ds, base)
        if visit and note.kind == "seg":
            visit("seg", note.seg_ref(path), ds)
        return note
    if any(keyword in ds for keyword in PIXEL_KEYWORDS):
        if text(ds, BURNED_IN_ANNOTATION).upper() == "YES":
            return FileNote("skip", "BurnedInAnnotation is YES: the pixels may show "
                                    "identifiers; not used", **base)
        note = _image_note(ds, base)
        if visit:
            visit("image", note.image_ref(path), ds)
        return note
    if sop_class in IMAGE_CLASSES:
        return FileNote("skip", "image object without PixelData", **base)
    return FileNote("other", modality=text(ds, 0x00080060) or sop_class, **base)


def scan_folder(root: Path, visit: Visitor | None = None) -> ScanResult:
    """Read every file under `root` once and sort images, SEGs and the rest (see `examine`)."""
    result = ScanResult(root=root)
    skipped: list[Skipped] = []
    for path in iter_files(root, skipped):
        result.add(path, examine(path, visit=visit))
    for entry in skipped:
        result.skip(root / entry.file, entry.reason)
    result.log()
    return result


def _image_note(ds: pydicom.Dataset, base: dict[str, Any]) -> FileNote:
    encoding = _encoding(ds)
    meta = getattr(ds, "file_meta", None)
    return FileNote(
        "image",
        series_uid=text(ds, 0x0020000E),
        study_uid=text(ds, 0x0020000D),
        patient_key=patient_key(text(ds, 0x00100020, encoding)),
        modality=text(ds, 0x00080060) or IMAGE_CLASSES.get(base["sop_class"], "OT"),
        transfer_syntax=text(meta, 0x00020010) if meta is not None else "",
        accession_number=text(ds, 0x00080050, encoding),
        **base,
    )


def _nifti_note(path: Path, visit: Visitor | None) -> FileNote:
    referenced = path.name.removesuffix(".gz").removesuffix(".nii")
    if not referenced or not set(referenced) <= set("0123456789."):
        return FileNote("skip", "NIfTI file not named <SOPInstanceUID>.nii[.gz] of the image "
                                "it segments; rename it after that image's SOPInstanceUID")
    note = FileNote("seg", sop_class="nifti", referenced_sop_uid=referenced)
    if visit:
        visit("nifti", note.seg_ref(path), None)
    return note


def _seg_note(ds: pydicom.Dataset, base: dict[str, Any]) -> FileNote:
    try:
        referenced = first_referenced_instance(ds) or str(
            ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
        )
    except (AttributeError, IndexError):
        return FileNote("skip", "SEG without ReferencedSeriesSequence/ReferencedInstanceSequence",
                        **base)
    return FileNote("seg", referenced_sop_uid=referenced, **base)
