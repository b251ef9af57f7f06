"""Turn stored DICOM pixel values into one convention: float32, 0..1, brighter = denser."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut


class PixelError(ValueError):
    """Pixel data that cannot be decoded or does not make sense."""


PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _read(path: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001 - truncated and corrupt files raise many types
        raise PixelError(f"file cannot be read ({type(exc).__name__})") from exc


def _check_bits(ds: pydicom.Dataset) -> int:
    bits_stored = int(ds.get("BitsStored", 0))
    bits_allocated = int(ds.get("BitsAllocated", 0))
    if bits_allocated not in (1, 8, 16, 32, 64) or not 0 < bits_stored <= bits_allocated:
        raise PixelError(
            f"unsupported BitsAllocated/BitsStored {bits_allocated}/{bits_stored}"
        )
    return bits_stored


def stored_pixels(ds: pydicom.Dataset) -> np.ndarray:
    """Decode the stored values of every frame; a failure says which decoder is missing."""
    if not any(keyword in ds for keyword in PIXEL_KEYWORDS):
        raise PixelError("object has no pixel data")
    try:
        return np.asarray(ds.pixel_array)
    except Exception as exc:  # noqa: BLE001 - decoder errors come in many types
        meta = getattr(ds, "file_meta", None)
        syntax = meta.get("TransferSyntaxUID") if meta is not None else None
        name = getattr(syntax, "name", str(syntax))
        if "Unable to decode" in str(exc) or "No plugins" in str(exc):
            bits = ds.get("BitsStored", "?")
            raise PixelError(
                f"no installed decoder handles {name} at {bits} bits; pylibjpeg-libjpeg "
                "(GPL-3.0) does, install it if your site accepts its licence"
            ) from exc
        raise PixelError(f"pixel data cannot be decoded ({type(exc).__name__}, {name})") from exc


def frames(path: Path) -> np.ndarray:
    """Any object's pixels as float32 in modality units (CT in HU): (frames, rows, cols[, 3])."""
    return dataset_frames(_read(path))


def dataset_frames(ds: pydicom.Dataset) -> np.ndarray:
    """`frames` for a dataset already read."""
    if "PixelData" in ds:
        _check_bits(ds)
    values = stored_pixels(ds)
    frame_count = int(ds.get("NumberOfFrames", 1) or 1)
    if int(ds.get("SamplesPerPixel", 1)) == 1 and "PixelData" in ds:
        values = apply_modality_lut(values, ds)
    values = np.asarray(values, dtype=np.float32)
    return values if frame_count > 1 else values[None]


def projection_image(path: Path) -> np.ndarray:
    """Decode a 2D projection image (CR/DX) to float32 in [0, 1], brighter = denser.

    Applies the Modality LUT (RescaleSlope/Intercept), normalises by the range
    BitsStored allows, and inverts MONOCHROME1.
    """
    return projection_pixels(_read(path))


def projection_pixels(ds: pydicom.Dataset, *, voi_window: bool = False) -> np.ndarray:
    """`projection_image` for a dataset already read.

    With `voi_window`, the image's own VOI window (WindowCenter/WindowWidth, linear
    function of PS3.3 C.11.2.1.2) maps values to 0..1 instead of the full stored range;
    an image without a window keeps the full range.
    """
    bits_stored = _check_bits(ds)
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise PixelError(
            f"expected a grayscale image, got PhotometricInterpretation {photometric!r}"
        )
    stored = stored_pixels(ds)
    if stored.ndim != 2:
        raise PixelError(f"expected one 2D frame, got array of shape {stored.shape}")
    slope = float(ds.get("RescaleSlope", 1.0))
    intercept = float(ds.get("RescaleIntercept", 0.0))
    if slope == 1.0 and intercept == 0.0 and "ModalityLUTSequence" not in ds:
        values = stored.astype(np.float32)  # identity Modality LUT: skip the float64 pass
    else:
        values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
    if int(ds.get("PixelRepresentation", 0)) == 1:
        low_stored, high_stored = -(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1
    else:
        low_stored, high_stored = 0, 2**bits_stored - 1
    low, high = sorted((low_stored * slope + intercept, high_stored * slope + intercept))
    if voi_window and "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first_value(ds.WindowCenter), _first_value(ds.WindowWidth)
        if width < 1:
            raise PixelError(f"WindowWidth must be >= 1, got {width}")
        low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    out = (values - np.float32(low)) * np.float32(1.0 / (high - low))
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return np.clip(out, 0.0, 1.0, out=out)


def _first_value(value: object) -> float:
    """WindowCenter/Width may hold several windows; the first is the default."""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return float(value[0])  # type: ignore[index]
    return float(value)  # type: ignore[arg-type]


def seg_pixels(ds: pydicom.Dataset) -> np.ndarray:
    """A one-frame binary SEG's mask (frames merged) as uint8."""
    mask = stored_pixels(ds)
    if mask.ndim == 3:
        mask = mask.max(axis=0)
    return (mask > 0).astype(np.uint8)


def check_geometry(mask_shape: tuple[int, ...], image_shape: tuple[int, ...]) -> None:
    """Refuse a mask whose rows and columns differ from its image's."""
    if tuple(mask_shape) != tuple(image_shape):
        raise PixelError(f"SEG is {mask_shape[0]}x{mask_shape[1]}, "
                         f"image is {image_shape[0]}x{image_shape[1]}")


def probe(path: Path) -> tuple[str, str]:
    """One file's outcome: ("ok" | "no-pixels" | "fails", reason). Never raises."""
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return "fails", f"not readable as DICOM ({type(exc).__name__})"
    if not any(keyword in ds for keyword in PIXEL_KEYWORDS):
        return "no-pixels", f"{ds.get('Modality', 'object')} without pixel data"
    if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
        return "fails", "missing SOPClassUID or SOPInstanceUID"
    try:
        stored_pixels(ds)
    except PixelError as exc:
        return "fails", str(exc)
    return "ok", ""
