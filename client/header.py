"""The few header values ingestion needs, read straight from the raw elements.

pydicom converts an element the first time it is accessed, and its
`pixel_array` looks up some forty of them per file; on small chest X-rays that
bookkeeping costs more than the decoding itself. Here the handful of values
ingestion uses are read once from the raw bytes (US, IS, DS, CS, UI: fixed,
simple encodings) and handed to pydicom's own decoders as explicit options.
Anything unusual (big-endian data, a multi-frame encapsulated object, float
pixels) returns None and the caller takes pydicom's ordinary path instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.pixels import get_decoder
from pydicom.uid import UID

_PIXEL_DATA = 0x7FE00010
_NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}
_SINGLE_FRAGMENT_PER_FRAME = {"1.2.840.10008.1.2.5"}  # RLE: one fragment per frame by rule


def text(ds: pydicom.Dataset, tag: int, encoding: str = "latin-1") -> str:
    """A string element's whole value ('' when absent), without pydicom's conversion."""
    elem = ds.get_item(tag)
    if elem is None:
        return ""
    value = elem.value
    if isinstance(value, bytes):
        return value.decode(encoding, errors="replace").strip(" \x00")
    return "" if value is None else str(value)


def uint16(ds: pydicom.Dataset, tag: int) -> int | None:
    """An US element's first value, or None when absent or empty."""
    elem = ds.get_item(tag)
    if elem is None:
        return None
    value = elem.value
    if isinstance(elem, RawDataElement):
        if not value or len(value) < 2:
            return None
        return int.from_bytes(value[:2], "little" if elem.is_little_endian else "big")
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return int(value[0]) if len(value) else None
    return None if value is None or value == "" else int(value)


def first_number(ds: pydicom.Dataset, tag: int) -> float | None:
    """The first value of an IS/DS element (e.g. RescaleSlope, WindowCenter), or None."""
    elem = ds.get_item(tag)
    if elem is None:
        return None
    value = elem.value
    if isinstance(value, bytes):
        head = value.decode("ascii", errors="replace").split("\\")[0].strip(" \x00")
        return float(head) if head else None
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return float(value[0]) if len(value) else None
    return None if value is None or value == "" else float(value)


@dataclass(frozen=True)
class PixelModule:
    """The Image Pixel module values a decoder needs."""

    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    photometric: str
    number_of_frames: int
    planar_configuration: int

    @classmethod
    def read(cls, ds: pydicom.Dataset) -> PixelModule | None:
        """The module from raw elements, or None when a value is missing or malformed."""
        try:
            values = [uint16(ds, tag) for tag in (0x00280010, 0x00280011, 0x00280002,
                                                  0x00280100, 0x00280101, 0x00280103)]
            frames = first_number(ds, 0x00280008)
        except (ValueError, TypeError):
            return None
        if any(value is None for value in values):
            return None
        rows, columns, samples, allocated, stored, representation = (int(v) for v in values)  # type: ignore[arg-type]
        return cls(rows, columns, samples, allocated, stored, representation,
                   text(ds, 0x00280004), int(frames or 1), uint16(ds, 0x00280006) or 0)


def fast_pixels(ds: pydicom.Dataset) -> np.ndarray | None:
    """Stored values through pydicom's decoder with explicit options, or None.

    None means "take pydicom's ordinary path": the object is unusual, or this
    shortcut could not be sure of it. Decoder errors propagate as they would from
    `ds.pixel_array`.
    """
    meta = getattr(ds, "file_meta", None)
    syntax = text(meta, 0x00020010) if meta is not None else ""
    module = PixelModule.read(ds)
    pixel = ds.get_item(_PIXEL_DATA)
    if module is None or pixel is None or not isinstance(pixel.value, bytes):
        return None
    if ds.original_encoding[1] is not True:  # big-endian or unknown encoding
        return None
    encapsulated = syntax not in _NATIVE
    if encapsulated and module.number_of_frames > 1 and syntax not in _SINGLE_FRAGMENT_PER_FRAME:
        return None  # frame boundaries need the offset tables pydicom reads
    options: dict[str, Any] = {
        "rows": module.rows,
        "columns": module.columns,
        "samples_per_pixel": module.samples_per_pixel,
        "bits_allocated": module.bits_allocated,
        "bits_stored": module.bits_stored,
        "pixel_representation": module.pixel_representation,
        "photometric_interpretation": module.photometric,
        "number_of_frames": module.number_of_frames,
        "pixel_keyword": "PixelData",
    }
    if module.samples_per_pixel > 1:
        options["planar_configuration"] = module.planar_configuration
    array, _ = get_decoder(UID(syntax)).as_array(pixel.value, **options)
    return array


_REFERENCED_SOP_INSTANCE_UID = b"\x08\x00\x55\x11"  # (0008,1155), little endian


def first_referenced_instance(ds: pydicom.Dataset) -> str | None:
    """ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
    from the sequence's raw bytes, or None (the caller then asks pydicom).

    Parsing a sequence through pydicom costs more than decoding a small SEG's
    pixels. The sequence holds only UIDs (ASCII), so the tag's bytes cannot occur
    inside a value; the VR and length are checked before the value is used.
    """
    elem = ds.get_item(0x00081115)
    if not isinstance(elem, RawDataElement) or not isinstance(elem.value, bytes):
        return None
    if not elem.is_little_endian:
        return None
    value = elem.value
    at = value.find(_REFERENCED_SOP_INSTANCE_UID)
    if at < 0:
        return None
    if elem.is_implicit_VR:
        start, length = at + 8, int.from_bytes(value[at + 4:at + 8], "little")
    elif value[at + 4:at + 6] == b"UI":
        start, length = at + 8, int.from_bytes(value[at + 6:at + 8], "little")
    else:
        return None
    uid = value[start:start + length]
    if len(uid) != length or not length or length > 64:
        return None
    text_value = uid.decode("ascii", errors="replace").strip(" \x00")
    return text_value if set(text_value) <= set("0123456789.") else None
