"""Skip the weight gradients DP-SGD throws away.

With Opacus' hooks every trainable layer's per-sample gradients are computed from its
input and output gradient, and the optimizer replaces `p.grad` by their clipped, noised
sum. PyTorch's autograd still computes the ordinary weight gradient of every layer
first (for a convolution as costly as the per-sample ones), and Opacus never reads it.

`skip_weight_grads(model)` makes each layer run its forward with detached copies of its
own parameters, so autograd computes input gradients only; the parameters themselves
are put back before Opacus' activation hook looks at the layer, and Opacus' backward
hooks still see every layer's output gradient (the model's input is made to require a
gradient, so the whole graph still exists). `p.grad` is then None until the DP step
writes the noised sum. Only for a model wrapped by Opacus' GradSampleModule in hooks
mode: nothing else would give its parameters a gradient. tests/test_dp_optimizer.py
checks that a step is unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from opacus import GradSampleModule
from torch import nn
from torch.utils.hooks import RemovableHandle


def _own_trainable(layer: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in layer.named_parameters(recurse=False) if p.requires_grad}


def _input_needs_grad(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    if not (module.training and torch.is_grad_enabled()):
        return None
    return tuple(a.detach().requires_grad_(True)
                 if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def skip_weight_grads(model: GradSampleModule) -> list[RemovableHandle]:
    """Install the hooks on `model` (a GradSampleModule); returns their handles."""
    if not isinstance(model, GradSampleModule):
        raise TypeError(f"skip_weight_grads needs Opacus' GradSampleModule (its hooks give "
                        f"the parameters their gradients), not {type(model).__name__}")
    handles = [model.register_forward_pre_hook(_input_needs_grad)]
    for layer in model.modules():
        own = _own_trainable(layer)
        if not own or layer is model:
            continue

        def detach(layer: nn.Module, args: tuple[Any, ...],
                   own: dict[str, nn.Parameter] = own) -> None:
            if layer.training and torch.is_grad_enabled():
                for name, param in own.items():
                    layer._parameters[name] = param.detach()  # type: ignore[assignment]

        def restore(layer: nn.Module, args: tuple[Any, ...], output: Any,
                    own: dict[str, nn.Parameter] = own) -> None:
            for name, param in own.items():
                layer._parameters[name] = param

        handles.append(layer.register_forward_pre_hook(detach))
        # Before Opacus' own forward hook, which skips a layer without trainable parameters.
        handles.append(layer.register_forward_hook(restore, prepend=True, always_call=True))
    return handles
