"""3D volumes from CT/MR series and NIfTI files.

Slices are ordered by their position along the slice normal (ImagePositionPatient
projected onto the cross product of ImageOrientationPatient's row and column
directions), never by file name or InstanceNumber. Duplicate positions, missing
slices and uneven spacing are found and reported; a series with missing slices
is refused rather than silently stretched.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut

from client.dicom_scan import ImageRef
from client.limits import LimitExceeded, check_voxels
from client.pixels import PixelError, stored_pixels

GAP_FACTOR = 1.5  # a step this many times the typical spacing means missing slices
UNEVEN_TOLERANCE = 0.01  # relative spread of steps still called even


class VolumeError(ValueError):
    """A series that cannot be made into a trustworthy volume."""


@dataclass(frozen=True)
class SeriesReport:
    """What the geometry check found in one series."""

    slices: int
    duplicates: int
    missing: int
    uneven: bool
    spacing: float


@dataclass(frozen=True)
class Volume:
    """A 3D image: array (Z, Y, X) in modality units (CT in HU) and its geometry."""

    array: np.ndarray
    spacing: tuple[float, float, float]  # (z, y, x) in mm
    origin: tuple[float, float, float]
    direction: np.ndarray  # 3x3: columns are the x (row), y (column) and z (normal) axes
    report: SeriesReport | None = field(default=None)


def group_series(images: list[ImageRef], modalities: frozenset[str] = frozenset({"CT", "MR"})
                 ) -> dict[str, list[ImageRef]]:
    """Cross-sectional images grouped by SeriesInstanceUID."""
    groups: dict[str, list[ImageRef]] = defaultdict(list)
    for image in images:
        if image.modality in modalities:
            groups[image.series_uid].append(image)
    return dict(groups)


def _geometry(ds: pydicom.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        orientation = np.array([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        position = np.array([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
    except (AttributeError, ValueError, TypeError) as exc:
        raise VolumeError("slice without ImageOrientationPatient/ImagePositionPatient") from exc
    row, col = orientation[:3], orientation[3:]
    return row, col, position


def build_volume(paths: list[Path]) -> Volume:
    """Read one series' slices and stack them in patient order along the normal."""
    if len(paths) < 2:
        raise VolumeError(f"a volume needs at least 2 slices, got {len(paths)}")
    slices = []
    for path in paths:
        ds = pydicom.dcmread(path)
        row, col, position = _geometry(ds)
        slices.append((ds, row, col, position))
    row, col = slices[0][1], slices[0][2]
    if any(not np.allclose(s[1], row, atol=1e-4) or not np.allclose(s[2], col, atol=1e-4)
           for s in slices):
        raise VolumeError("slices of the series have different orientations")
    normal = np.cross(row, col)
    slices.sort(key=lambda s: float(np.dot(s[3], normal)))
    distances = np.array([float(np.dot(s[3], normal)) for s in slices])
    steps = np.diff(distances)
    duplicates = int(np.sum(np.abs(steps) < 1e-3))
    if duplicates:
        keep = np.concatenate([[True], np.abs(steps) >= 1e-3])
        slices = [s for s, k in zip(slices, keep, strict=True) if k]
        distances = distances[keep]
        steps = np.diff(distances)
    spacing = float(np.median(steps))
    missing = int(sum(round(step / spacing) - 1 for step in steps if step > GAP_FACTOR * spacing))
    uneven = bool(np.ptp(steps) > UNEVEN_TOLERANCE * spacing) if len(steps) > 1 else False
    report = SeriesReport(slices=len(slices), duplicates=duplicates, missing=missing,
                          uneven=uneven, spacing=spacing)
    if missing:
        raise VolumeError(
            f"series has {missing} missing slice(s) (gap of {steps.max():.2f} mm where "
            f"slices are {spacing:.2f} mm apart); re-export the complete series"
        )
    arrays = []
    for ds, *_ in slices:
        try:
            values = stored_pixels(ds)
        except PixelError as exc:
            raise VolumeError(f"a slice cannot be decoded: {exc}") from exc
        arrays.append(np.asarray(apply_modality_lut(values, ds), dtype=np.float32))
    if len({a.shape for a in arrays}) != 1:
        raise VolumeError("slices of the series have different sizes")
    pixel = [float(v) for v in slices[0][0].PixelSpacing]
    return Volume(
        array=np.stack(arrays),
        spacing=(spacing, pixel[0], pixel[1]),
        origin=tuple(float(v) for v in slices[0][3]),  # type: ignore[arg-type]
        direction=np.stack([row, col, normal], axis=1),
        report=report,
    )


def load_nifti(path: Path) -> Volume:
    """A NIfTI image or label map as a Volume (array (Z, Y, X), spacing (z, y, x))."""
    import nibabel as nib

    image: Any = nib.load(str(path))
    try:
        check_voxels(image.header.get_data_shape())  # before its data is read
    except LimitExceeded as exc:
        raise VolumeError(str(exc)) from exc
    array = np.asarray(image.dataobj).astype(np.float32)  # (X, Y, Z) in NIfTI order
    zooms = [float(z) for z in image.header.get_zooms()[:3]]
    affine = np.asarray(image.affine)
    direction = affine[:3, :3] / np.array(zooms)
    return Volume(
        array=np.transpose(array, (2, 1, 0)),
        spacing=(zooms[2], zooms[1], zooms[0]),
        origin=tuple(float(v) for v in affine[:3, 3]),  # type: ignore[arg-type]
        direction=direction,
    )
