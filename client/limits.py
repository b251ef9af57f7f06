"""How much one file may cost a site: the bounds that keep a hostile export from ending
a scan or exhausting memory. Every reader of site data checks these before the work:

- a Deflated DICOM dataset may inflate to at most MAX_INFLATED_BYTES (a 1 MB file can
  inflate to 1 GiB; pydicom inflates it whole, so the bound is checked first by a
  streaming inflate that stops at the limit);
- an image's Rows x Columns x Frames x SamplesPerPixel may be at most MAX_PIXEL_VALUES,
  checked from the header before any decoder allocates its output;
- a gzip-compressed NIfTI file may inflate to at most MAX_INFLATED_BYTES, and a NIfTI
  image may hold at most MAX_PIXEL_VALUES voxels (its header, before its data is read);
- a decoder failure of any kind, a Rust decoder's panic included (pyo3's PanicException
  derives from BaseException, so `except Exception` misses it), is one bad file.

A file over a bound is skipped with its reason; nothing else is affected.
"""

from __future__ import annotations

import struct
import zlib

MAX_INFLATED_BYTES = 512 * 1024 * 1024
MAX_PIXEL_VALUES = 1 << 27  # e.g. 11585 x 11585, or 512 frames of 512 x 512
DEFLATED = "1.2.840.10008.1.2.1.99"
_CHUNK = 1 << 20
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}


class LimitExceeded(ValueError):
    """A file would cost more than the site allows one file."""


def decoder_failure(exc: BaseException) -> bool:
    """Whether `exc` is a decoder failing on one file (and not the process being asked to
    stop): every Exception, and a Rust decoder's panic."""
    if isinstance(exc, KeyboardInterrupt | SystemExit | GeneratorExit):
        return False
    return True


def _meta_end(data: bytes) -> tuple[int, str]:
    """Where a Part-10 file's meta group ends and its transfer syntax (explicit VR LE)."""
    if data[128:132] != b"DICM":
        return 0, ""
    offset, syntax = 132, ""
    while offset + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, offset)
        if group != 0x0002:
            break
        vr = data[offset + 4:offset + 6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<I", data, offset + 8)
            start = offset + 12
        else:
            (length,) = struct.unpack_from("<H", data, offset + 6)
            start = offset + 8
        if element == 0x0010:
            syntax = data[start:start + length].rstrip(b"\0 ").decode("ascii", "replace")
        offset = start + length
    return offset, syntax


def check_deflated(data: bytes, limit: int = MAX_INFLATED_BYTES) -> None:
    """Refuse a Deflated Explicit VR dataset that would inflate past `limit`."""
    end, syntax = _meta_end(data)
    if syntax != DEFLATED:
        return
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total, view = 0, memoryview(data)[end:]
    try:
        for start in range(0, len(view), _CHUNK):
            chunk: bytes = bytes(view[start:start + _CHUNK])
            while chunk:
                out = inflater.decompress(chunk, _CHUNK)
                total += len(out)
                if total > limit:
                    raise LimitExceeded(f"deflated dataset inflates past {limit >> 20} MiB "
                                        "(a decompression bomb); skipped")
                chunk = inflater.unconsumed_tail
    except zlib.error:
        return  # corrupt: pydicom reports it as an unreadable file


def gunzip(data: bytes, limit: int = MAX_INFLATED_BYTES) -> bytes:
    """gzip.decompress with a bound on the output (multi-member files included)."""
    out = bytearray()
    while data:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        chunk = data
        while chunk:
            out += inflater.decompress(chunk, _CHUNK)
            if len(out) > limit:
                raise LimitExceeded(f"gzip data inflates past {limit >> 20} MiB (a "
                                    "decompression bomb); skipped")
            chunk = inflater.unconsumed_tail
        if not inflater.eof:
            raise zlib.error("truncated gzip data")
        data = inflater.unused_data
    return bytes(out)


def check_pixel_values(rows: int, columns: int, frames: int, samples: int) -> None:
    """Refuse an image whose decoded size the header puts past MAX_PIXEL_VALUES."""
    values = rows * columns * max(frames, 1) * max(samples, 1)
    if rows <= 0 or columns <= 0:
        raise LimitExceeded(f"Rows x Columns {rows} x {columns} is not an image")
    if values > MAX_PIXEL_VALUES:
        raise LimitExceeded(
            f"Rows x Columns x Frames x Samples = {rows} x {columns} x {frames} x {samples} "
            f"exceeds the site's limit of {MAX_PIXEL_VALUES} values per file")


def check_voxels(shape: tuple[int, ...]) -> None:
    """Refuse a NIfTI image whose header puts it past MAX_PIXEL_VALUES voxels."""
    values = 1
    for size in shape:
        values *= max(int(size), 1)
    if values > MAX_PIXEL_VALUES:
        raise LimitExceeded(f"NIfTI image of shape {tuple(shape)} exceeds the site's limit "
                            f"of {MAX_PIXEL_VALUES} voxels")
