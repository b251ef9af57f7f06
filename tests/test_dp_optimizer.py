"""FusedDPOptimizer takes the same DP-SGD steps as Opacus' DPOptimizer."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPPerLayerOptimizer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.dp_optimizer import FusedDPOptimizer, fuse
from client.dp_weight_grads import skip_weight_grads
from client.training import _noise_only_step
from common.config import RunConfig
from common.models import build_model


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3))


def _train(fused: bool, *, noise: float, clip: float, secure: bool = False,
           skip: bool = False):
    torch.manual_seed(1)
    data = TensorDataset(torch.randn(24, 1, 8, 8) * 4, torch.randn(24, 3))
    model = copy.deepcopy(_model())
    engine = PrivacyEngine(accountant="rdp")
    private, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        data_loader=DataLoader(data, batch_size=8), noise_multiplier=noise,
        max_grad_norm=clip, poisson_sampling=False,
        noise_generator=torch.Generator().manual_seed(7))
    optimizer.secure_mode = secure  # Opacus' float-attack-safe noise (4 draws per value)
    if fused:
        optimizer = fuse(optimizer)
        assert isinstance(optimizer, FusedDPOptimizer)
    if skip:
        skip_weight_grads(private)
    for x, y in loader:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.mse_loss(private(x), y).backward()
        params = list(private.parameters())
        assert all(p.grad_sample is not None for p in params)
        assert all(p.grad is None for p in params) == skip  # autograd skipped them
        optimizer.step()
    _noise_only_step(private, optimizer)  # an empty Poisson batch
    return {k: v.detach().clone() for k, v in private.state_dict().items()}, engine


@pytest.mark.parametrize(("noise", "clip", "secure"),
                         [(0.0, 1e-3, False), (1.0, 0.05, False), (0.7, 0.05, True)])
def test_fused_steps_equal_opacus(noise, clip, secure) -> None:
    theirs, their_engine = _train(False, noise=noise, clip=clip, secure=secure)
    ours, our_engine = _train(True, noise=noise, clip=clip, secure=secure)
    start = _model().state_dict()
    for name, value in theirs.items():
        key = name.removeprefix("_module.")
        assert not torch.equal(value, start[key]), name  # the steps did move the weights
        torch.testing.assert_close(ours[name], value, rtol=1e-5, atol=1e-6, msg=name)
    # The accountant saw the same steps through the carried-over hook.
    assert our_engine.accountant.history == their_engine.accountant.history
    assert sum(n for _, _, n in our_engine.accountant.history) == 4


def test_clipping_bounds_the_step() -> None:
    """No noise, a tiny clip: the step is the mean of the per-sample gradients each scaled
    to norm clip, so its norm is at most clip."""
    clip = 1e-3
    torch.manual_seed(1)
    model = _model()
    engine = PrivacyEngine(accountant="rdp")
    private, optimizer, _ = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(TensorDataset(torch.randn(8, 1, 8, 8), torch.randn(8, 3)),
                               batch_size=8),
        noise_multiplier=0.0, max_grad_norm=clip, poisson_sampling=False)
    optimizer = fuse(optimizer)
    x, y = torch.randn(8, 1, 8, 8) * 10, torch.randn(8, 3) * 10
    optimizer.zero_grad()
    nn.functional.mse_loss(private(x), y).backward()
    params = list(private.parameters())
    norms = torch.stack([torch.stack([p.grad_sample[i].norm() for p in params]).norm()
                         for i in range(8)])
    assert (norms > clip * 10).all()  # every sample is clipped
    factor = clip / (norms + 1e-6)
    expected = [torch.einsum("i,i...", factor, p.grad_sample) / 8 for p in params]
    optimizer.step()
    for p, want in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-9)
    total = torch.stack([p.grad.norm() for p in params]).norm()
    assert float(total) <= clip * (1 + 1e-5)


def test_only_flat_clipping_is_fused() -> None:
    model = _model()
    per_layer = DPPerLayerOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                    noise_multiplier=1.0, max_grad_norm=[1.0] * 8,
                                    expected_batch_size=8)
    with pytest.raises(TypeError, match="DPPerLayerOptimizer"):
        fuse(per_layer)


def test_skipping_the_discarded_weight_gradients_keeps_every_step() -> None:
    with_grads, _ = _train(True, noise=1.0, clip=0.05)
    skipped, engine = _train(True, noise=1.0, clip=0.05, skip=True)
    for name, value in with_grads.items():
        torch.testing.assert_close(skipped[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert sum(n for _, _, n in engine.accountant.history) == 4


@pytest.mark.parametrize(("task", "model"), [("cxr-classify", "densenet121"),
                                             ("lung-seg", "unet"), ("lung-seg", "basicunet"),
                                             ("lung-seg", "segresnet")])
def test_skipping_weight_gradients_on_fedrads_models(task, model) -> None:
    """Per-sample gradients of every MONAI layer fedrad trains are the same with the
    ordinary weight gradients skipped (and the model's input made to need a gradient)."""
    config = RunConfig.from_mapping({"task": task, "model": model, "image-size": 32})
    torch.manual_seed(3)
    x = torch.rand(4, 1, 32, 32)
    samples = []
    for skip in (False, True):
        torch.manual_seed(0)
        net = build_model(config)
        engine = PrivacyEngine(accountant="rdp")
        private, _, _ = engine.make_private(
            module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(x), batch_size=4), noise_multiplier=1.0,
            max_grad_norm=1.0, poisson_sampling=False)
        if skip:
            skip_weight_grads(private)
        private.train()
        private(x).square().mean().backward()
        samples.append({n: p.grad_sample for n, p in private.named_parameters()})
        assert all(p.grad is None for p in private.parameters()) == skip
    assert samples[0].keys() == samples[1].keys()
    for name, value in samples[0].items():
        torch.testing.assert_close(samples[1][name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_skipping_needs_opacus_hooks() -> None:
    with pytest.raises(TypeError, match="GradSampleModule"):
        skip_weight_grads(_model())  # a plain model would never get gradients
