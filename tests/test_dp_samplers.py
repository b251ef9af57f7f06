"""fedrad's convolution grad samplers against Opacus' own per-sample gradients."""

from __future__ import annotations

import pytest
import torch
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.group_norm import compute_group_norm_grad_sample
from torch import nn
from torch.func import functional_call, grad, vmap

from client.dp_samplers import (
    conv_grad_sample,
    conv_transpose_grad_sample,
    group_norm_grad_sample,
    prelu_grad_sample,
)

CONVS = [
    nn.Conv2d(3, 5, 3, padding=1),
    nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False),
    nn.Conv2d(4, 6, 5, dilation=2, padding=3),
    nn.Conv2d(4, 6, 3, groups=2, padding=1),
    nn.Conv2d(4, 6, 1),  # pointwise: one batched matrix product
    nn.Conv3d(4, 6, 1, bias=False),
    nn.Conv2d(4, 6, 1, stride=2),  # strided pointwise: Opacus' own sampler
    nn.Conv3d(2, 3, 3, padding=1),
    nn.Conv1d(2, 3, 3, padding=1),
]
TRANSPOSED = [
    nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1),
    nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2),
    nn.ConvTranspose3d(2, 3, 3, stride=2, padding=1, output_padding=1),
]


def _inputs(layer: nn.Module, n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    dims = {nn.Conv1d: 1, nn.Conv3d: 3, nn.ConvTranspose3d: 3}.get(type(layer), 2)
    x = torch.randn(n, layer.in_channels, *([9] * dims))
    grad_out = torch.randn_like(layer(x))
    return x, grad_out


def _functorch_per_sample(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor):
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(p, xi, gi):
        return (functional_call(layer, p, (xi[None],))[0] * gi).sum()

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, grad_out)


@pytest.mark.parametrize("layer", CONVS, ids=repr)
def test_conv_samples_equal_opacus(layer) -> None:
    x, grad_out = _inputs(layer)
    ours = conv_grad_sample(layer, [x], grad_out)
    theirs = compute_conv_grad_sample(layer, [x], grad_out)
    assert set(ours) == set(theirs)
    for param in theirs:
        torch.testing.assert_close(ours[param], theirs[param], rtol=1e-4, atol=1e-5)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in ours.values()]).norm(dim=0)
    expected = torch.stack([g.flatten(1).norm(dim=1) for g in theirs.values()]).norm(dim=0)
    torch.testing.assert_close(norms, expected, rtol=1e-5, atol=1e-6)  # per-sample norms


@pytest.mark.parametrize("layer", TRANSPOSED, ids=repr)
def test_conv_transpose_samples_equal_functorch(layer) -> None:
    x, grad_out = _inputs(layer)
    ours = conv_transpose_grad_sample(layer, [x], grad_out)
    reference = _functorch_per_sample(layer, x, grad_out)
    for name, param in layer.named_parameters():
        torch.testing.assert_close(ours[param], reference[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layer", [nn.GroupNorm(4, 8), nn.GroupNorm(2, 6), nn.GroupNorm(1, 3)],
                         ids=repr)
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_group_norm_samples_equal_opacus(layer, dims) -> None:
    torch.manual_seed(1)
    with torch.no_grad():  # not the identity affine it starts with
        layer.weight.normal_()
        layer.bias.normal_()
    x = torch.randn(5, layer.num_channels, *([7] * dims)) * 3 + 1
    grad_out = torch.randn_like(layer(x))
    ours = group_norm_grad_sample(layer, [x], grad_out)
    theirs = compute_group_norm_grad_sample(layer, [x], grad_out)
    assert set(ours) == set(theirs) == {layer.weight, layer.bias}
    for param in theirs:
        torch.testing.assert_close(ours[param], theirs[param], rtol=1e-5, atol=1e-5)
    reference = _functorch_per_sample(layer, x, grad_out)
    torch.testing.assert_close(ours[layer.weight], reference["weight"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layer", [nn.PReLU(), nn.PReLU(6)], ids=repr)
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_prelu_samples_equal_functorch(layer, dims) -> None:
    torch.manual_seed(2)
    with torch.no_grad():
        layer.weight.uniform_(0.1, 0.4)
    x = torch.randn(5, 6, *([5] * dims))
    grad_out = torch.randn_like(layer(x))
    ours = prelu_grad_sample(layer, [x], grad_out)
    reference = _functorch_per_sample(layer, x, grad_out)
    assert ours[layer.weight].shape == (5, *layer.weight.shape)
    torch.testing.assert_close(ours[layer.weight], reference["weight"], rtol=1e-5, atol=1e-5)


def test_empty_batch_gives_zero_samples() -> None:
    layer = TRANSPOSED[0]
    x = torch.zeros(0, 4, 9, 9)
    out = conv_transpose_grad_sample(layer, [x], torch.zeros(0, 3, 18, 18))
    assert out[layer.weight].shape == (1, *layer.weight.shape) and not out[layer.weight].any()


def test_opacus_defaults_are_restored_around_a_block() -> None:
    from opacus.grad_sample.grad_sample_module import GradSampleHooks

    from client import dp_samplers

    dp_samplers.install()
    assert GradSampleHooks.GRAD_SAMPLERS[nn.Conv2d] is conv_grad_sample
    with dp_samplers.opacus_defaults():
        assert GradSampleHooks.GRAD_SAMPLERS[nn.Conv2d] is compute_conv_grad_sample
        assert nn.ConvTranspose2d not in GradSampleHooks.GRAD_SAMPLERS
        assert GradSampleHooks.GRAD_SAMPLERS[nn.GroupNorm] is compute_group_norm_grad_sample
        assert nn.PReLU not in GradSampleHooks.GRAD_SAMPLERS
    assert GradSampleHooks.GRAD_SAMPLERS[nn.Conv2d] is conv_grad_sample
    assert GradSampleHooks.GRAD_SAMPLERS[nn.ConvTranspose2d] is conv_transpose_grad_sample
    assert GradSampleHooks.GRAD_SAMPLERS[nn.GroupNorm] is group_norm_grad_sample
    assert GradSampleHooks.GRAD_SAMPLERS[nn.PReLU] is prelu_grad_sample
