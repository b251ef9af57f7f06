"""Model definitions shared by the server (initial weights) and the sites.

Every model is DP-compatible: GroupNorm instead of BatchNorm and no in-place
activations, checked with Opacus' ModuleValidator.
"""

from __future__ import annotations

import torch
from monai.networks.nets import UNet
from opacus.validators import ModuleValidator

from common.config import RunConfig, Task


class ModelError(ValueError):
    """A model that cannot be trained with DP-SGD."""


def build_model(config: RunConfig) -> torch.nn.Module:
    """The network for `config.task`, seeded so every party builds the same one."""
    torch.manual_seed(config.seed)
    if config.task is Task.LUNG_SEG:
        model: torch.nn.Module = UNet(
            spatial_dims=2,
            in_channels=1,
            out_channels=1,
            channels=(16, 32, 64, 128),
            strides=(2, 2, 2),
            num_res_units=0,
            norm=("group", {"num_groups": 8}),
            act=("prelu", {"init": 0.25}),
        )
    else:  # pragma: no cover - Task is a closed enum
        raise ModelError(f"no model for task {config.task}")
    check_dp_compatible(model)
    return model


def check_dp_compatible(model: torch.nn.Module) -> None:
    """Raise with every problem Opacus' validator finds, plus in-place activations."""
    problems = [str(error) for error in ModuleValidator.validate(model, strict=False)]
    problems += [
        f"{name}: in-place activation (set inplace=False)"
        for name, module in model.named_modules()
        if getattr(module, "inplace", False)
    ]
    if problems:
        raise ModelError("model is not DP-SGD compatible: " + "; ".join(problems))
