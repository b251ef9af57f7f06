"""Stored projection-image values → float32 in [0, 1], brighter = denser: fedrad's one
intensity rule, for training, evaluation, predict and exported MONAI bundles alike.

This module imports only NumPy and pydicom: `fedrad models export --format monai-bundle`
copies it into the bundle's scripts/ so a bundle runs with MONAI alone and feeds its
network exactly as the sites did.
"""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut


def to_unit_range(stored: np.ndarray, *, bits_stored: int, photometric: str,
                  slope: float | None, intercept: float | None, signed: bool,
                  window: tuple[float, float] | None = None,
                  modality_lut: pydicom.Dataset | None = None) -> np.ndarray:
    """The Modality LUT (RescaleSlope/Intercept, or the dataset's ModalityLUTSequence
    given as `modality_lut`), then [0, 1] over the range BitsStored allows, or over the
    VOI `window` (center, width; the linear function of PS3.3 C.11.2.1.2); MONOCHROME1
    inverted; clipped."""
    slope = 1.0 if slope is None else slope
    intercept = 0.0 if intercept is None else intercept
    if modality_lut is not None:
        values = np.asarray(apply_modality_lut(stored, modality_lut), dtype=np.float32)
    else:  # the linear Modality LUT of PS3.3 C.11.1
        values = stored.astype(np.float32)
        if slope != 1.0 or intercept != 0.0:
            values = values * np.float32(slope) + np.float32(intercept)
    if signed:
        low_stored, high_stored = -(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1
    else:
        low_stored, high_stored = 0, 2**bits_stored - 1
    low, high = sorted((low_stored * slope + intercept, high_stored * slope + intercept))
    if window is not None:
        center, width = window
        low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    out = (values - np.float32(low)) * np.float32(1.0 / (high - low))
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return np.clip(out, 0.0, 1.0, out=out)


def _first(value: object) -> float:
    """A number, or the first of a multi-valued one (WindowCenter may hold several)."""
    if isinstance(value, pydicom.multival.MultiValue):
        return float(value[0])
    return float(value)  # type: ignore[arg-type]


def dataset_unit_range(ds: pydicom.Dataset, *, voi_window: bool = False) -> np.ndarray:
    """`to_unit_range` of a grayscale projection image read with plain pydicom (what an
    exported bundle uses; sites use client.pixels, which checks the file first)."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    window = ((_first(center), _first(width)) if voi_window and center is not None
              and width is not None else None)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    return to_unit_range(
        np.asarray(ds.pixel_array), bits_stored=int(ds.BitsStored),
        photometric=str(ds.PhotometricInterpretation),
        slope=None if slope is None else float(slope),
        intercept=None if intercept is None else float(intercept),
        signed=int(ds.get("PixelRepresentation", 0)) == 1, window=window,
        modality_lut=ds if "ModalityLUTSequence" in ds else None)
