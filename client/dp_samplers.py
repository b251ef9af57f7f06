"""Faster per-sample gradients for convolutions, on Opacus' grad-sampler hooks.

Opacus computes a convolution's per-sample weight gradients by unfolding the
input (im2col: kernel-size copies of every activation) and one einsum. For the
3x3 convolutions of a U-Net or a DenseNet that unfold is most of the DP overhead.
Here the batch is folded into the channel axis and the weight gradient of a
convolution with `groups = batch x groups` is asked of PyTorch's own convolution
backward (oneDNN on CPU, cuDNN on GPU): sample n's gradient is group n's. Same
numbers as Opacus, up to float summation order; a plain 1x1 convolution (no unfold
needed) is one batched matrix product. ConvTranspose layers, which
Opacus has no sampler for (it falls back to functorch), get the same treatment.
GroupNorm's per-sample affine gradients are one batched dot product instead of a
product tensor and a sum; PReLU (Opacus: functorch) gets a sampler of its own.

`install()` registers these through Opacus' public `register_grad_sampler`; it is
called once by client.training. tests/test_dp_samplers.py checks them against
Opacus' own per-sample gradients and norms.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient, prepare_layer
from opacus.grad_sample.grad_sample_module import GradSampleHooks
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
    GradSampleHooksFastGradientClipping,
)
from opacus.grad_sample.group_norm import compute_group_norm_grad_sample
from opacus.grad_sample.utils import register_grad_sampler
from torch import nn
from torch.nn import functional as F

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _weight_grads(layer: Any, x: torch.Tensor, grad_out: torch.Tensor,
                  transposed: bool) -> torch.Tensor:
    """(N, *weight.shape): each sample's weight gradient, via one grouped backward."""
    n = x.shape[0]
    weight = layer.weight
    folded_weight = grad_out.new_empty(1).expand((n * weight.shape[0], *weight.shape[1:]))
    output_padding = list(layer.output_padding) if transposed else [0]
    grads = torch.ops.aten.convolution_backward(
        grad_out.reshape(1, -1, *grad_out.shape[2:]),
        x.reshape(1, -1, *x.shape[2:]),
        folded_weight,
        None,
        list(layer.stride),
        list(layer.padding),
        list(layer.dilation),
        transposed,
        output_padding,
        n * layer.groups,
        (False, True, False),
    )[1]
    return grads.view(n, *weight.shape)


def _supported(layer: Any) -> bool:
    return (isinstance(layer.padding, tuple)
            and getattr(layer, "padding_mode", "zeros") == "zeros")


def _bias_grads(layer: Any, grad_out: torch.Tensor) -> dict[Any, torch.Tensor]:
    bias = getattr(layer, "bias", None)
    if bias is None or not bias.requires_grad:
        return {}
    return {bias: grad_out.flatten(2).sum(dim=2)}


def conv_grad_sample(layer: Any, activations: list[torch.Tensor],
                     backprops: torch.Tensor) -> dict[Any, torch.Tensor]:
    """Per-sample gradients of a Conv1d/2d/3d: through a grouped backward (kernel > 1), or
    one batched matrix product (a plain 1x1 convolution)."""
    x = activations[0].to(backprops.dtype)
    pointwise = all(k == 1 for k in layer.kernel_size)
    plain_pointwise = (pointwise and layer.groups == 1 and all(s == 1 for s in layer.stride)
                       and all(p == 0 for p in layer.padding))
    if x.shape[0] == 0 or not _supported(layer) or (pointwise and not plain_pointwise):
        return compute_conv_grad_sample(layer, activations, backprops)
    out = _bias_grads(layer, backprops)
    if layer.weight.requires_grad:
        if plain_pointwise:  # (N, out, L) x (N, L, in): each sample's outer-product sum
            n = x.shape[0]
            out[layer.weight] = torch.bmm(
                backprops.reshape(n, backprops.shape[1], -1),
                x.reshape(n, x.shape[1], -1).transpose(1, 2)).view(n, *layer.weight.shape)
        else:
            out[layer.weight] = _weight_grads(layer, x, backprops, transposed=False)
    return out


def conv_transpose_grad_sample(layer: Any, activations: list[torch.Tensor],
                               backprops: torch.Tensor) -> dict[Any, torch.Tensor]:
    """Per-sample gradients of a ConvTranspose1d/2d/3d through a grouped backward."""
    x = activations[0].to(backprops.dtype)
    weight = layer.weight
    if x.shape[0] == 0:
        out = {weight: torch.zeros_like(weight).unsqueeze(0)}
        bias = getattr(layer, "bias", None)
        if bias is not None and bias.requires_grad:
            out[bias] = torch.zeros_like(bias).unsqueeze(0)
        return out
    if not _supported(layer):  # what Opacus does for a layer it has no sampler for
        if not hasattr(layer, "ft_compute_sample_grad"):
            prepare_layer(layer)
        return ft_compute_per_sample_gradient(layer, activations, backprops)
    out = _bias_grads(layer, backprops)
    if weight.requires_grad:
        out[weight] = _weight_grads(layer, x, backprops, transposed=True)
    return out


def group_norm_grad_sample(layer: Any, activations: list[torch.Tensor],
                           backprops: torch.Tensor) -> dict[Any, torch.Tensor]:
    """Per-sample gradients of a GroupNorm's affine weight and bias.

    Opacus multiplies the normalised input by the output gradient into a new tensor,
    then sums it; here one batched dot product per (sample, channel) does both
    without the intermediate.
    """
    out: dict[Any, torch.Tensor] = {}
    n, c = backprops.shape[:2]
    grads = backprops.reshape(n, c, -1)
    if layer.weight is not None and layer.weight.requires_grad:
        normalised = F.group_norm(activations[0], layer.num_groups, eps=layer.eps)
        out[layer.weight] = torch.einsum("ncl,ncl->nc", normalised.reshape(n, c, -1), grads)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = grads.sum(dim=2)
    return out


def prelu_grad_sample(layer: Any, activations: list[torch.Tensor],
                      backprops: torch.Tensor) -> dict[Any, torch.Tensor]:
    """Per-sample gradients of PReLU's slope(s): the output gradient times the input
    where the input is negative, summed (per channel when the layer has one slope per
    channel). Opacus has no sampler for PReLU and falls back to functorch."""
    weight = layer.weight
    if not weight.requires_grad:
        return {}
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    contribution = torch.where(x < 0, x * backprops, torch.zeros((), dtype=x.dtype))
    if weight.numel() == 1:
        return {weight: contribution.reshape(n, -1).sum(dim=1).reshape(n, *weight.shape)}
    return {weight: contribution.reshape(n, weight.numel(), -1).sum(dim=2)}


def install() -> None:
    """Register the samplers with Opacus (idempotent)."""
    register_grad_sampler(list(_CONV))(conv_grad_sample)
    register_grad_sampler(list(_TRANSPOSED))(conv_transpose_grad_sample)
    register_grad_sampler([nn.GroupNorm])(group_norm_grad_sample)
    register_grad_sampler([nn.PReLU])(prelu_grad_sample)


@contextmanager
def opacus_defaults() -> Iterator[None]:
    """Opacus' own samplers inside the block (bench/dp_overhead.py compares both)."""
    registries = (GradSampleHooks.GRAD_SAMPLERS, GradSampleHooksFastGradientClipping.GRAD_SAMPLERS)
    ours = (*_CONV, *_TRANSPOSED, nn.GroupNorm, nn.PReLU)
    saved = [{k: r[k] for k in ours if k in r} for r in registries]
    for registry in registries:
        for layer_type in ours:
            registry.pop(layer_type, None)
        for layer_type in _CONV:
            registry[layer_type] = compute_conv_grad_sample
        registry[nn.GroupNorm] = compute_group_norm_grad_sample
    try:
        yield
    finally:
        for registry, entries in zip(registries, saved, strict=True):
            for layer_type in ours:
                registry.pop(layer_type, None)
            registry.update(entries)
