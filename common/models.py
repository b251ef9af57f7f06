"""Model definitions shared by the server (initial weights) and the sites.

Every model is DP-compatible: GroupNorm instead of BatchNorm, no in-place
activations and no in-place residual additions (Opacus' backward hooks refuse a
module output modified in place), checked with Opacus' ModuleValidator.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import torch
from monai.networks.blocks.segresnet_block import ResBlock
from monai.networks.nets import BasicUNet, Classifier, DenseNet121, SegResNet, UNet
from opacus.validators import ModuleValidator

from common.config import Model, Norm, RunConfig, Trainable


class ModelError(ValueError):
    """A model that cannot be built, loaded or trained with DP-SGD."""


class _ResBlockWithoutInplaceAdd(ResBlock):
    """MONAI's SegResNet block with `x = x + identity` instead of `x += identity`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        x = self.conv1(self.act(self.norm1(x)))
        x = self.conv2(self.act(self.norm2(x)))
        return x + identity


def architecture(config: RunConfig) -> tuple[type[torch.nn.Module], dict[str, Any]]:
    """The MONAI network class and its keyword arguments for `config` (JSON-able: a model
    export describes itself with these, so it loads without fedrad)."""
    dims = config.task.spatial_dims
    norm: list[Any] = (["instance", {"affine": True}] if config.norm is Norm.INSTANCE
                       else ["group", {"num_groups": 8}])
    if config.model is Model.UNET:
        return UNet, {"spatial_dims": dims, "in_channels": 1, "out_channels": 1,
                      "channels": [16, 32, 64, 128], "strides": [2, 2, 2],
                      "num_res_units": config.res_units,
                      "norm": norm, "act": ["prelu", {"init": 0.25}]}
    if config.model is Model.BASIC_UNET:
        return BasicUNet, {"spatial_dims": dims, "in_channels": 1, "out_channels": 1,
                           "features": [16, 16, 32, 64, 128, 16], "norm": norm,
                           "act": ["leakyrelu", {"negative_slope": 0.1, "inplace": False}]}
    if config.model is Model.SEGRESNET:
        return SegResNet, {"spatial_dims": dims, "in_channels": 1, "out_channels": 1,
                           "init_filters": 8, "norm": norm, "act": ["relu", {"inplace": False}]}
    if config.model is Model.DENSENET121:
        return DenseNet121, {"spatial_dims": dims, "in_channels": 1,
                             "out_channels": len(config.labels),
                             "norm": ["group", {"num_groups": 16}],
                             "act": ["relu", {"inplace": False}]}
    if config.model is Model.CLASSIFIER:  # small inputs (28-64 px): 4 strided res blocks
        return Classifier, {"in_shape": [1] + [config.image_size] * dims,
                            "classes": len(config.labels), "channels": [16, 32, 64, 128],
                            "strides": [2, 2, 2, 2], "num_res_units": 2,
                            "norm": ["instance", {"affine": True}], "act": "prelu"}
    raise ModelError(f"no model {config.model}")  # pragma: no cover - a closed enum


def build_model(config: RunConfig) -> torch.nn.Module:
    """The network `config.model` for `config.task`, seeded so every party builds the same one."""
    torch.manual_seed(config.seed)
    network, kwargs = architecture(config)
    model = network(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})
    if config.model is Model.SEGRESNET:
        for module in model.modules():
            if type(module) is ResBlock:
                module.__class__ = _ResBlockWithoutInplaceAdd
    check_dp_compatible(model)
    return model


_NORMS = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.modules.instancenorm._InstanceNorm,
          torch.nn.modules.batchnorm._BatchNorm)


def trainable_names(model: torch.nn.Module, which: Trainable) -> list[str]:
    """Names of the parameters `which` trains: all; normalisation weights and biases;
    the last layer (the last module with its own parameters); or both of the latter."""
    names = [name for name, _ in model.named_parameters()]
    if which is Trainable.ALL:
        return names
    chosen: set[str] = set()
    if which in {Trainable.NORM_BIAS, Trainable.NORM_BIAS_HEAD}:
        for prefix, module in model.named_modules():
            if isinstance(module, _NORMS):
                chosen |= {f"{prefix}.{n}" if prefix else n
                           for n, _ in module.named_parameters(recurse=False)}
        chosen |= {name for name in names if name.endswith(".bias") or name == "bias"}
    if which in {Trainable.HEAD, Trainable.NORM_BIAS_HEAD}:
        owners = [prefix for prefix, module in model.named_modules()
                  if any(True for _ in module.parameters(recurse=False))]
        head = owners[-1]
        chosen |= {f"{head}.{n}" if head else n
                   for n, _ in model.get_submodule(head).named_parameters(recurse=False)}
    return [name for name in names if name in chosen]


def freeze_except(model: torch.nn.Module, which: Trainable) -> None:
    """requires_grad only on the parameters `which` trains (no gradient, clipping, noise
    or optimiser step reaches the others)."""
    keep = set(trainable_names(model, which))
    for name, param in model.named_parameters():
        param.requires_grad_(name in keep)


def provenance_path(weights: Path) -> Path:
    """Where `fedrad pretrain` writes a prior's provenance: <weights>.json."""
    return weights.with_name(weights.name + ".json")


def prior_provenance(config: RunConfig, weights: Path) -> dict[str, Any] | None:
    """The provenance `fedrad pretrain` wrote beside `weights` (None when there is none),
    once it names this run's architecture and the file's sha256; ModelError if not."""
    path = provenance_path(weights)
    if not path.exists():
        return None
    try:
        provenance: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: not a readable prior provenance ({exc})") from exc
    network, kwargs = architecture(config)
    mine = {"class": f"{network.__module__}.{network.__name__}", "kwargs": kwargs}
    if provenance.get("architecture") != mine:
        raise ModelError(f"init-weights {weights}: made for {provenance.get('architecture')}, "
                         f"but this run's model is {mine}; pretrain with this run's config "
                         "or change its model keys")
    if hashlib.sha256(weights.read_bytes()).hexdigest() != provenance.get("sha256"):
        raise ModelError(f"init-weights {weights}: differs from the sha256 in {path.name}; "
                         "it is not the prior that provenance describes")
    return provenance


def load_pretrained(model: torch.nn.Module, path: Path) -> None:
    """Start from a local weights file (transfer learning); never downloads anything.

    The file is a plain PyTorch state dict (as `fedrad models export` writes). Keys
    whose name and shape match are loaded; the rest (e.g. a classifier head for other
    labels) keep their initial values. Nothing matching at all is an error.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:
        raise ModelError(f"init-weights {path}: cannot be read as a PyTorch state dict "
                         f"({type(exc).__name__})") from exc
    if not isinstance(state, dict):
        raise ModelError(f"init-weights {path}: expected a state dict, got {type(state).__name__}")
    state = {key.removeprefix("_module."): value for key, value in state.items()}
    own = model.state_dict()
    matching = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not matching:
        raise ModelError(f"init-weights {path}: no tensor matches the {type(model).__name__} "
                         "of this run by name and shape; is it the same model?")
    own.update(matching)
    model.load_state_dict(own)


def check_dp_compatible(model: torch.nn.Module) -> None:
    """Raise with every problem Opacus' validator finds, plus in-place operations."""
    problems = [str(error) for error in ModuleValidator.validate(model, strict=False)]
    problems += [
        f"{name}: in-place activation (set inplace=False)"
        for name, module in model.named_modules()
        if getattr(module, "inplace", False)
    ]
    problems += [
        f"{name}: in-place residual addition (MONAI ResBlock; use _ResBlockWithoutInplaceAdd)"
        for name, module in model.named_modules()
        if type(module) is ResBlock
    ]
    if problems:
        raise ModelError("model is not DP-SGD compatible: " + "; ".join(problems))
