"""Model weights on the wire: plain state dicts as ordered float32 arrays."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

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


def check_finite(arrays: list[np.ndarray]) -> None:
    """Refuse arrays holding NaN or Inf."""
    for index, array in enumerate(arrays):
        if not np.isfinite(array).all():
            raise UpdateError(f"array {index} holds NaN or Inf; refusing it")


def subtract(a: list[np.ndarray], b: list[np.ndarray]) -> list[np.ndarray]:
    """a - b, element-wise per array."""
    return [x - y for x, y in zip(a, b, strict=True)]


def add(a: list[np.ndarray], b: list[np.ndarray]) -> list[np.ndarray]:
    """a + b, element-wise per array."""
    return [(x + y).astype(np.float32) for x, y in zip(a, b, strict=True)]


def global_norm(arrays: list[np.ndarray]) -> float:
    """L2 norm over all arrays."""
    return float(np.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays)))
