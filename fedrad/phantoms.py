"""Built-in multi-site dataset: 2D chest-like phantoms written as real DICOM.

Real images cannot ship in the repository, so `fedrad demo` generates hospitals
whose exports differ the way real ones do (folder layout, MONOCHROME1 vs
MONOCHROME2, bit depth, RLE compression, implicit VR). Each image has a lung
mask written as a DICOM SEG (highdicom) and a nodule-present label in
labels.csv keyed by SOPInstanceUID. Headers carry synthetic PHI with the same
canary tokens as ../shared/data: PatientName contains ``ZZCANARY`` and
PatientID starts with ``CANARY-``.
"""

from __future__ import annotations

import csv
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

UID_PREFIX = "1.2.826.0.1.3680043.10.999."
CR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
DX_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")


@dataclass(frozen=True)
class SiteStyle:
    """How one hospital's PACS export looks."""

    name: str
    layout: str  # "nested" | "flat" | "patient"
    sop_class: UID
    modality: str
    photometric: str
    bits_stored: int
    bits_allocated: int
    transfer_syntax: UID
    contrast: float  # scanner difference applied to the phantom intensities


SITE_STYLES = (
    SiteStyle("hospital-a", "nested", CR_STORAGE, "CR", "MONOCHROME2", 8, 8,
              ExplicitVRLittleEndian, 1.0),
    SiteStyle("hospital-b", "flat", DX_PRESENTATION, "DX", "MONOCHROME1", 12, 16,
              RLELossless, 0.9),
    SiteStyle("hospital-c", "patient", CR_STORAGE, "CR", "MONOCHROME2", 10, 16,
              ImplicitVRLittleEndian, 1.1),
)


def posed_grid(rng: np.random.Generator, size: int, *, degrees: float,
               scales: tuple[float, float], shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Film coordinates (y, x) in [0, 1] of a patient rotated by up to `degrees`, scaled
    within `scales` and shifted by up to `shift` (drawn from `rng` in that order)."""
    angle = np.deg2rad(rng.uniform(-degrees, degrees))
    scale = rng.uniform(*scales)
    shift_y, shift_x = rng.uniform(-shift, shift, 2)
    grid = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    yy = (np.cos(angle) * grid[0] - np.sin(angle) * grid[1]) / scale - shift_y + 0.5
    xx = (np.sin(angle) * grid[0] + np.cos(angle) * grid[1]) / scale - shift_x + 0.5
    return yy, xx


def chest_phantom(rng: np.random.Generator, size: int, nodule: bool) -> tuple[
    np.ndarray, np.ndarray
]:
    """One chest-like image in [0, 1] (brighter = denser) and its lung mask.

    Anatomy that makes the lung boundary hard to find, as in a real radiograph: a heart
    shadow over the medial left lung and domed diaphragms below (both cut out of the
    mask, as manual lung masks do), ribs and clavicles crossing the lung fields, soft
    tissue, a posed (rotated, shifted, scaled) patient, and per-image exposure (contrast,
    gamma) and noise.
    """
    yy, xx = posed_grid(rng, size, degrees=6, scales=(0.92, 1.06), shift=0.04)
    body = ((xx - 0.5) / rng.uniform(0.40, 0.46)) ** 2 + ((yy - 0.54) / 0.50) ** 2 <= 1
    img = np.where(body, 0.50, 0.04).astype(np.float32)
    img += body * 0.12 * np.clip(1 - np.abs(xx - 0.5) / 0.45, 0, 1)  # soft tissue
    lungs = np.zeros((size, size), dtype=bool)
    cy = rng.uniform(0.42, 0.48)
    ry = rng.uniform(0.25, 0.30)
    for side in (-1, 1):
        cx = 0.5 + side * rng.uniform(0.17, 0.21)
        rx = rng.uniform(0.11, 0.14)
        tilt = side * rng.uniform(0.0, 0.25)
        u = (xx - cx) + tilt * (yy - cy)
        field = (u / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        dome = cy + ry * rng.uniform(0.55, 0.75) - 0.10 * ((xx - cx) / rx) ** 2
        lungs |= field & (yy < dome)  # the diaphragm's dome cuts the lung base
    img[lungs] = 0.16
    heart_y, heart_x = rng.uniform(0.55, 0.62), 0.5 + rng.uniform(0.04, 0.08)
    heart = ((xx - heart_x) / rng.uniform(0.12, 0.16)) ** 2 + \
        ((yy - heart_y) / rng.uniform(0.10, 0.13)) ** 2 <= 1
    img[heart & body] = 0.58
    lungs &= ~heart
    belly = body & (yy > cy + ry * 0.7) & ~lungs
    img[belly] = np.maximum(img[belly], 0.62)
    ribs = (np.sin((yy + 0.35 * (xx - 0.5) ** 2) * np.pi * rng.uniform(14, 18)) > 0.65)
    img += 0.07 * ribs * body
    clavicle = np.abs(yy - (0.20 + 0.25 * np.abs(xx - 0.5))) < 0.012
    img += 0.12 * (clavicle & (np.abs(xx - 0.5) < 0.32))
    spine = np.abs(xx - 0.5) < 0.045
    img[spine & body] = 0.85
    if nodule and lungs.any():
        ys, xs = np.nonzero(lungs)
        pick = rng.integers(len(ys))
        r = rng.uniform(0.02, 0.045) * size
        blob = (np.arange(size)[:, None] - ys[pick]) ** 2 + (
            np.arange(size)[None, :] - xs[pick]
        ) ** 2 <= r**2
        img[blob] = 0.62
    img = np.clip(img * rng.uniform(0.85, 1.15), 0, 1) ** rng.uniform(0.8, 1.25)
    img += rng.normal(0, 0.03, img.shape).astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32), lungs.astype(np.uint8)


_LAST = ["SMITH", "MUELLER", "ROSSI", "DUBOIS", "NOWAK", "SILVA", "JANSEN", "KOWALSKI"]
_FIRST = ["ANNA", "JOHN", "MARIA", "PIOTR", "LUCA", "EMMA", "NOAH", "SOFIA"]


def image_dataset(style: SiteStyle, rng: np.random.Generator, patient: dict[str, str],
                   pixels01: np.ndarray, study_uid: str, number: int):  # noqa: ANN202
    from pydicom.dataset import Dataset

    ds = Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = style.sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid(prefix=UID_PREFIX)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.SOPClassUID = style.sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = patient["name"]
    ds.PatientID = patient["id"]
    ds.PatientBirthDate = patient["birth"]
    ds.PatientSex = patient["sex"]
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid(prefix=UID_PREFIX)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = patient["study_date"]
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.AccessionNumber = f"ACC{rng.integers(10**7, 10**8)}"
    ds.StudyID = str(rng.integers(1000, 9999))
    ds.ReferringPhysicianName = f"{_LAST[rng.integers(len(_LAST))]}^REFERRER"
    ds.InstitutionName = f"{style.name.upper()} GENERAL HOSPITAL"
    ds.StationName = f"XR{rng.integers(10, 99)}"
    ds.Manufacturer = "FEDRAD PHANTOM WORKS"
    ds.ManufacturerModelName = "PHANTOM-XR"
    ds.DeviceSerialNumber = str(rng.integers(10**5, 10**6))
    ds.SoftwareVersions = "1.0"
    ds.Modality = style.modality
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.SeriesNumber = number
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]
    ds.ImagerPixelSpacing = [1.6, 1.6]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = style.photometric
    ds.Rows, ds.Columns = pixels01.shape
    ds.BitsAllocated = style.bits_allocated
    ds.BitsStored = style.bits_stored
    ds.HighBit = style.bits_stored - 1
    ds.PixelRepresentation = 0
    if style.sop_class == DX_PRESENTATION:
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, 0, "US"
        ds.WindowCenter, ds.WindowWidth = 2 ** (style.bits_stored - 1), 2**style.bits_stored
        ds.PresentationLUTShape = "INVERSE" if style.photometric == "MONOCHROME1" else "IDENTITY"
    top = 2**style.bits_stored - 1
    stored = np.round(np.clip(pixels01 * style.contrast, 0, 1) * top).astype(np.int64)
    if style.photometric == "MONOCHROME1":
        stored = top - stored
    dtype = np.uint8 if style.bits_allocated == 8 else np.uint16
    array = stored.astype(dtype)
    if style.transfer_syntax == RLELossless:
        ds.compress(RLELossless, array, generate_instance_uid=False)
    else:
        ds.PixelData = array.tobytes()
        ds.file_meta.TransferSyntaxUID = style.transfer_syntax
    return ds


def _segmentation(image, mask: np.ndarray, number: int):  # noqa: ANN001, ANN202
    import highdicom as hd
    from pydicom.sr.codedict import codes

    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Lung",
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.Lung,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=[image],
        pixel_array=mask[None].astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=generate_uid(prefix=UID_PREFIX),
        series_number=900 + number,
        sop_instance_uid=generate_uid(prefix=UID_PREFIX),
        instance_number=1,
        manufacturer="FEDRAD PHANTOM WORKS",
        manufacturer_model_name="PHANTOM-SEG",
        software_versions="1.0",
        device_serial_number="1",
        omit_empty_frames=False,
    )
    return seg


def export_paths(style: SiteStyle, root: Path, image, seq: int) -> tuple[Path, Path]:  # noqa: ANN001
    if style.layout == "nested":
        folder = root / str(image.PatientID) / image.StudyInstanceUID / image.SeriesInstanceUID
        return folder / f"IM{seq:04d}.dcm", root / "seg" / f"SG{seq:04d}.dcm"
    if style.layout == "flat":
        return root / f"{2 * seq:08X}", root / f"{2 * seq + 1:08X}"
    folder = root / str(image.PatientID)
    return folder / f"{image.SOPInstanceUID}.dcm", folder / f"seg-{image.SOPInstanceUID}.dcm"


Anatomy = Callable[[np.random.Generator, int, bool], tuple[np.ndarray, np.ndarray]]
"""Draws one image in [0, 1] and its lung mask: (rng, size, nodule) -> (image, mask)."""


def write_site(root: Path, style: SiteStyle, *, patients: int, images_per_patient: int,
               size: int, seed: int, nodule_rate: float = 0.4,
               anatomy: Anatomy = chest_phantom) -> int:
    """Write one hospital's export under `root`; return the number of images. `anatomy`
    draws the images (default the demo's `chest_phantom`; fedrad.radiographs for a
    prior)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    seq = 0
    for p in range(patients):
        birth = dt.date(1940, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 60)))
        patient = {
            "name": f"{_LAST[rng.integers(len(_LAST))]}^{_FIRST[rng.integers(len(_FIRST))]}"
            "^ZZCANARY",
            "id": f"CANARY-{style.name[-1].upper()}{p:04d}{rng.integers(100, 999)}",
            "birth": birth.strftime("%Y%m%d"),
            "sex": "FM"[int(rng.integers(2))],
            "study_date": (dt.date(2024, 1, 1) + dt.timedelta(days=int(rng.integers(0, 300))))
            .strftime("%Y%m%d"),
        }
        study_uid = generate_uid(prefix=UID_PREFIX)
        for _ in range(images_per_patient):
            seq += 1
            nodule = bool(rng.random() < nodule_rate)
            pixels, mask = anatomy(rng, size, nodule)
            image = image_dataset(style, rng, patient, pixels, study_uid, seq)
            image_path, seg_path = export_paths(style, root, image, seq)
            image_path.parent.mkdir(parents=True, exist_ok=True)
            image.save_as(image_path, enforce_file_format=True)
            seg = _segmentation(image, mask, seq)
            seg_path.parent.mkdir(parents=True, exist_ok=True)
            seg.save_as(seg_path, enforce_file_format=True)
            rows.append(
                {
                    "sop_instance_uid": str(image.SOPInstanceUID),
                    "accession_number": str(image.AccessionNumber),
                    "label_nodule": str(int(nodule)),
                }
            )
    with (root / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return seq


def write_consortium(root: Path, *, patients: int = 12, images_per_patient: int = 2,
                     size: int = 128, seed: int = 0,
                     anatomy: Anatomy = chest_phantom) -> dict[str, Path]:
    """Write every built-in hospital under `root`; return {site name: folder}."""
    sites: dict[str, Path] = {}
    for index, style in enumerate(SITE_STYLES):
        folder = root / style.name
        write_site(folder, style, patients=patients, images_per_patient=images_per_patient,
                   size=size, seed=seed * 100 + index, anatomy=anatomy)
        sites[style.name] = folder
    return sites


def write_ct_series(folder: Path, *, slices: int = 12, size: int = 48, spacing: float = 2.5,
                    pixel_spacing: float = 1.5, seed: int = 0) -> list[Path]:
    """A small CT series as files named in random order, signed HU pixels, oblique rows.

    Each slice's corner holds 10 x its true index (HU), so a test can check the order.
    InstanceNumber runs backwards on purpose: sorting must use the geometry.
    """
    from pydicom.dataset import Dataset

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    angle = np.deg2rad(10.0)
    row = np.array([np.cos(angle), np.sin(angle), 0.0])
    col = np.array([-np.sin(angle), np.cos(angle), 0.0])
    normal = np.cross(row, col)
    study, series = generate_uid(prefix=UID_PREFIX), generate_uid(prefix=UID_PREFIX)
    yy, xx = np.mgrid[0:size, 0:size]
    paths = []
    for index in range(slices):
        body = ((yy - size / 2) / (size * 0.4)) ** 2 + ((xx - size / 2) / (size * 0.45)) ** 2 <= 1
        hu = np.where(body, 40, -1000).astype(np.int16)
        hu[:4, :4] = 10 * index
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(prefix=UID_PREFIX)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID = "DOE^JANE^ZZCANARY", "CANARY-CT0001"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.SeriesNumber = "CT", 1
        ds.InstanceNumber = slices - index
        ds.ImageOrientationPatient = [*row.round(6), *col.round(6)]
        ds.ImagePositionPatient = list((np.array([-30.0, -40.0, 100.0])
                                        + index * spacing * normal).round(4))
        ds.PixelSpacing = [pixel_spacing, pixel_spacing]
        ds.SliceThickness = spacing
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.PixelData = hu.tobytes()
        path = folder / f"{rng.integers(10**8):08d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
