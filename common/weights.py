"""Model weights on the wire: plain state dicts as ordered float32 arrays, sent packed
as one contiguous float32 vector (`pack` / `unpack`).

Flower moves every array of a record as its own object (and each in 5 MB chunks), so a
DenseNet121's 364 arrays cost hundreds of object transfers per message; one vector costs
a handful. Both sides know the layout: it is the run's model, built from the run config.
"""

from __future__ import annotations

import io
import math
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

OPACUS_PREFIX = "_module."


class UpdateError(ValueError):
    """An update that must not be sent or applied."""


def plain_state_dict(model: torch.nn.Module) -> OrderedDict[str, torch.Tensor]:
    """The model's state dict without Opacus' `_module.` prefix (the one place it is stripped)."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in model.state_dict().items():
        out[key.removeprefix(OPACUS_PREFIX)] = value.detach().cpu()
    return out


def to_arrays(state: OrderedDict[str, torch.Tensor]) -> list[np.ndarray]:
    """State dict -> float32 arrays in the state dict's order."""
    return [value.numpy().astype(np.float32, copy=True) for value in state.values()]


def from_arrays(template: OrderedDict[str, torch.Tensor],
                arrays: list[np.ndarray]) -> OrderedDict[str, torch.Tensor]:
    """Arrays (in `template`'s order) -> a state dict; shapes must match."""
    if len(arrays) != len(template):
        raise UpdateError(f"expected {len(template)} arrays, got {len(arrays)}")
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (key, ref), array in zip(template.items(), arrays, strict=True):
        if tuple(array.shape) != tuple(ref.shape):
            raise UpdateError(f"{key}: expected shape {tuple(ref.shape)}, got {array.shape}")
        out[key] = torch.from_numpy(np.asarray(array, dtype=np.float32).copy())
    return out


def pack(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Arrays → the wire form: a list holding one flat float32 vector."""
    if not arrays:
        return [np.zeros(0, dtype=np.float32)]
    return [np.concatenate([np.asarray(a, dtype=np.float32).ravel() for a in arrays])]


def unpack(wire: list[np.ndarray], like: list[np.ndarray]) -> list[np.ndarray]:
    """The wire form → arrays shaped as `like` (the run's model); refuses a mismatch."""
    if len(wire) != 1 or wire[0].ndim != 1:
        raise UpdateError(f"expected one packed vector, got {len(wire)} arrays")
    sizes = [int(a.size) for a in like]
    if wire[0].size != sum(sizes):
        raise UpdateError(f"packed model has {wire[0].size} values, the run's model has "
                          f"{sum(sizes)}; sites and server must run the same model config")
    offsets = np.cumsum([0, *sizes])
    return [np.asarray(wire[0][start:end], dtype=np.float32).reshape(a.shape).copy()
            for start, end, a in zip(offsets[:-1], offsets[1:], like, strict=True)]


_NUMPY_STYPE = "numpy.ndarray"  # Flower's Array serialisation: the bytes of an .npy file


def numpy_view(array: Array) -> np.ndarray:
    """`Array.numpy()` without its copy: a read-only view into the Array's own .npy bytes.

    The header is read with numpy's own .npy reader; object arrays are refused, as
    `np.load(..., allow_pickle=False)` refuses them."""
    if array.stype != _NUMPY_STYPE:
        raise UpdateError(f"array serialised as {array.stype!r}, expected {_NUMPY_STYPE!r}")
    data = array.data
    stream = io.BytesIO(data)
    major, _ = np.lib.format.read_magic(stream)
    read_header = (np.lib.format.read_array_header_1_0 if major == 1
                   else np.lib.format.read_array_header_2_0)
    shape, fortran_order, dtype = read_header(stream)
    if dtype.hasobject:
        raise UpdateError("an array of Python objects cannot be read without pickle; refused")
    flat = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=stream.tell())
    return flat.reshape(shape, order="F" if fortran_order else "C")


def numpy_views(record: ArrayRecord) -> list[np.ndarray]:
    """Every array of `record` as `numpy_view`s, in order."""
    return [numpy_view(array) for array in record.values()]


CHUNK = 1 << 20  # values per slice: a temporary is at most 8 MB, never model-sized


def chunks(array: np.ndarray) -> Iterator[slice]:
    """Slices of `array.reshape(-1)` of CHUNK values each."""
    size = int(array.size)
    return (slice(start, min(start + CHUNK, size)) for start in range(0, size, CHUNK))


def all_finite(array: np.ndarray) -> bool:
    flat = array.reshape(-1)
    return all(bool(np.isfinite(flat[part]).all()) for part in chunks(flat))


def check_finite(arrays: list[np.ndarray]) -> None:
    """Refuse arrays holding NaN or Inf."""
    for index, array in enumerate(arrays):
        if not all_finite(array):
            raise UpdateError(f"array {index} holds NaN or Inf; refusing it")


def subtract(a: list[np.ndarray], b: list[np.ndarray]) -> list[np.ndarray]:
    """a - b, element-wise per array."""
    return [x - y for x, y in zip(a, b, strict=True)]


def add(a: list[np.ndarray], b: list[np.ndarray]) -> list[np.ndarray]:
    """a + b, element-wise per array."""
    return [(x + y).astype(np.float32) for x, y in zip(a, b, strict=True)]


def global_norm(arrays: list[np.ndarray], minus: list[np.ndarray] | None = None) -> float:
    """L2 norm over all arrays (of `arrays - minus`, when given), summed in float64 slice
    by slice."""
    total = 0.0
    for index, array in enumerate(arrays):
        flat = array.reshape(-1)
        other = None if minus is None else minus[index].reshape(-1)
        for part in chunks(flat):
            values = flat[part].astype(np.float64)
            if other is not None:
                values -= other[part]
            total += float(np.dot(values, values))
    return float(np.sqrt(total))
