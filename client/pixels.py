"""Turn stored DICOM pixel values into one convention: float32, 0..1, brighter = denser."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut

from client.header import fast_pixels, first_number, text, uint16
from client.intensity import to_unit_range
from client.limits import (
    LimitExceeded,
    check_pixel_values,
    check_voxels,
    decoder_failure,
    gunzip,
)


class PixelError(ValueError):
    """Pixel data that cannot be decoded or does not make sense."""


PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _read(path: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001 - truncated and corrupt files raise many types
        raise PixelError(f"file cannot be read ({type(exc).__name__})") from exc


def _check_bits(ds: pydicom.Dataset) -> int:
    try:
        bits_stored = uint16(ds, 0x00280101) or 0
        bits_allocated = uint16(ds, 0x00280100) or 0
    except (ValueError, TypeError) as exc:
        raise PixelError("BitsAllocated/BitsStored cannot be read") from exc
    if bits_allocated not in (1, 8, 16, 32, 64) or not 0 < bits_stored <= bits_allocated:
        raise PixelError(
            f"unsupported BitsAllocated/BitsStored {bits_allocated}/{bits_stored}"
        )
    return bits_stored


def _check_size(ds: pydicom.Dataset) -> None:
    """The decoded size the header declares, bounded before any decoder allocates it."""
    try:
        rows, columns = uint16(ds, 0x00280010) or 0, uint16(ds, 0x00280011) or 0
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = uint16(ds, 0x00280002) or 1
        check_pixel_values(rows, columns, frames, samples)
    except LimitExceeded as exc:
        raise PixelError(str(exc)) from exc
    except (ValueError, TypeError) as exc:
        raise PixelError("Rows/Columns/NumberOfFrames/SamplesPerPixel cannot be read") from exc


def stored_pixels(ds: pydicom.Dataset) -> np.ndarray:
    """Decode the stored values of every frame; a failure says which decoder is missing.

    A decoder's failure of any kind, a Rust decoder's panic included, is a PixelError of
    this one file (client.limits)."""
    if not any(keyword in ds for keyword in PIXEL_KEYWORDS):
        raise PixelError("object has no pixel data")
    _check_size(ds)
    try:
        array = fast_pixels(ds)
    except BaseException as exc:  # noqa: BLE001 - pydicom's ordinary path below says why
        if not decoder_failure(exc):
            raise
        array = None
    if array is not None:
        return array
    try:
        return np.asarray(ds.pixel_array)
    except BaseException as exc:  # noqa: BLE001 - decoder errors (and panics) of many types
        if not decoder_failure(exc):
            raise
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
    photometric = text(ds, 0x00280004)
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise PixelError(
            f"expected a grayscale image, got PhotometricInterpretation {photometric!r}"
        )
    stored = stored_pixels(ds)
    if stored.ndim != 2:
        raise PixelError(f"expected one 2D frame, got array of shape {stored.shape}")
    try:
        slope = first_number(ds, 0x00281053)
        intercept = first_number(ds, 0x00281052)
        signed = uint16(ds, 0x00280103) == 1
    except (ValueError, TypeError) as exc:
        raise PixelError("RescaleSlope/RescaleIntercept/PixelRepresentation cannot be read") \
            from exc
    center = first_number(ds, 0x00281050) if voi_window else None
    width = first_number(ds, 0x00281051) if voi_window else None
    if center is not None and width is not None and width < 1:
        raise PixelError(f"WindowWidth must be >= 1, got {width}")
    lut = ds if "ModalityLUTSequence" in ds else None
    return to_unit_range(stored, bits_stored=bits_stored, photometric=photometric,
                         slope=slope, intercept=intercept, signed=signed,
                         window=(center, width) if center is not None and width is not None
                         else None, modality_lut=lut)


def seg_pixels(ds: pydicom.Dataset) -> np.ndarray:
    """A one-frame binary SEG's mask (frames merged) as uint8."""
    mask = stored_pixels(ds)
    if mask.ndim == 3:
        mask = mask.max(axis=0)
    return (mask > 0).astype(np.uint8)


def nifti_mask(path: Path) -> np.ndarray:
    """A 2D mask a site keeps as NIfTI (.nii or .nii.gz), as rows x columns uint8.

    NIfTI voxel axes (i, j) are the image's (column, row), as ITK, MONAI and
    dcm2niix write a 2D DICOM image; a third axis of length 1 is allowed.
    """
    import nibabel as nib

    try:
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gunzip(data)
        image = nib.Nifti1Image.from_bytes(data)
        check_voxels(image.header.get_data_shape())
        array = np.asarray(image.dataobj)
    except LimitExceeded as exc:
        raise PixelError(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - nibabel and gzip raise many types
        raise PixelError(f"NIfTI mask cannot be read ({type(exc).__name__}); expected a "
                         "NIfTI-1 file, optionally gzip-compressed") from exc
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim != 2:
        raise PixelError(f"expected a 2D NIfTI mask (i=column, j=row), got shape {array.shape}")
    return (array.T > 0).astype(np.uint8)


def check_geometry(mask_shape: tuple[int, ...], image_shape: tuple[int, ...]) -> None:
    """Refuse a mask whose rows and columns differ from its image's."""
    if tuple(mask_shape) != tuple(image_shape):
        raise PixelError(f"mask is {mask_shape[0]}x{mask_shape[1]}, "
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


@lru_cache(maxsize=64)
def _area_taps(n_in: int, n_out: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input index, weight) per tap: output cell i averages input cells
    floor(i*n_in/n_out) .. ceil((i+1)*n_in/n_out) - 1, as torch's adaptive pooling."""
    cells = np.arange(n_out)
    start, stop = (cells * n_in) // n_out, -((-(cells + 1) * n_in) // n_out)
    width = stop - start
    return [
        (np.minimum(start + k, n_in - 1), np.where(k < width, 1.0 / width, 0.0).astype(np.float32))
        for k in range(int(width.max()))
    ]


def _area_rows(values: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros((size, values.shape[1]), np.float32)
    for index, weight in _area_taps(values.shape[0], size):
        out += values[index] * weight[:, None]
    return out


def resize_area(image: np.ndarray, size: int) -> np.ndarray:
    """Area (box-average) resize of a 2D image to size x size; equals torch's mode="area".

    A few weighted gathers per axis (each output cell covers at most
    ceil(n_in/size) + 1 inputs): no BLAS, no threads, cheap in ingestion workers.
    """
    return _area_rows(_area_rows(image.astype(np.float32, copy=False), size).T, size).T.copy()


def resize_nearest(mask: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of a 2D mask; equals torch's mode="nearest"."""
    rows, cols = mask.shape
    return mask[(np.arange(size) * rows) // size][:, (np.arange(size) * cols) // size]
