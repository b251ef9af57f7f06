"""Opacus' DP-SGD step with its per-parameter Python loops paid once per step.

Opacus' `DPOptimizer` is correct but walks the parameter list many times per step:
`grad_samples` and `params` are properties that rebuild their lists on every access,
`scale_grad` asks for `accumulated_iterations` (a walk over every parameter) once per
parameter, so a model with P parameter tensors pays O(P^2) attribute lookups per step
(DenseNet121: 364 tensors, ~130 000), and the clipped sum goes through `torch.einsum`
once per tensor. `FusedDPOptimizer` keeps the same arithmetic and the same noise (drawn
by Opacus' own `_generate_noise`, in the same order from the same generator), so a step
gives Opacus' result; it walks the parameters once per stage, sums the clipped
per-sample gradients with a matrix-vector product and scales with one `_foreach_div_`.

`fuse(optimizer)` swaps it in after `PrivacyEngine.make_private`, keeping the
accountant's step hook; `make_private` is fedrad's whole DP-SGD set-up.
tests/test_dp_optimizer.py checks steps against Opacus'.

The randomness that protects privacy (Poisson sampling and the Gaussian noise) comes
from `SitePrivacyEngine`: generators seeded from the operating system's CSPRNG
(`os.urandom`) for every session, and Opacus' `secure_mode` noise (the sum of several
Gaussian draws, which defeats floating-point attacks on the noise). Nothing in a run
config reaches them, so a server that chose the run's `seed` cannot regenerate the
noise and subtract it. Opacus' own secure mode needs torchcsprng (unmaintained, no
wheels for current torch); this engine takes its place with the same code paths.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.optimizers.optimizer import (
    DPOptimizer,
    _check_processed_flag,
    _generate_noise,
    _mark_as_processed,
)
from torch import nn
from torch.utils.data import DataLoader

from client import dp_samplers
from client.dp_weight_grads import skip_weight_grads


def private_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded with 64 bits from the OS CSPRNG: a new stream each call,
    which nobody outside this process can recompute."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(os.urandom(8), "little"))
    return generator


class SitePrivacyEngine(PrivacyEngine):
    """Opacus' PrivacyEngine in secure mode without torchcsprng: Poisson sampling and
    noise from `private_generator`, noise drawn as Opacus' secure mode draws it."""

    def __init__(self, *, accountant: str = "rdp") -> None:
        super().__init__(accountant=accountant, secure_mode=False)
        self.secure_mode = True
        self.secure_rng = private_generator()  # the sampler's: on the CPU

    def _prepare_data_loader(self, data_loader: DataLoader[Any], *, poisson_sampling: bool,
                             **kwargs: Any) -> DataLoader[Any]:
        """Poisson sampling from the private generator (Opacus' code); a loader without
        Poisson sampling keeps its order when that order draws nothing at random (Opacus'
        secure mode would refuse a sampler without a generator)."""
        if not poisson_sampling and not hasattr(data_loader.sampler, "generator"):
            return data_loader
        return super()._prepare_data_loader(  # type: ignore[no-any-return]
            data_loader, poisson_sampling=poisson_sampling, **kwargs)


class FusedDPOptimizer(DPOptimizer):
    """`DPOptimizer` (flat, non-distributed clipping) with fused per-parameter stages.

    `groups` (one record id per sample of the next step, set by the training loop)
    makes the record a group of samples: each group's summed gradient is clipped to C,
    so one patient with several images counts once (client.patient_sampling)."""

    groups: torch.Tensor | None = None

    def _grad_samples(self, params: list[nn.Parameter]) -> list[torch.Tensor]:
        return [self._get_flat_grad_sample(p) for p in params]

    def _clip_factors(self, samples: list[torch.Tensor], n: int) -> torch.Tensor:
        """Each sample's clipping factor: C / ||its record's gradient||, at most 1."""
        device = samples[0].device
        if self.groups is None:
            norms = torch.stack([torch.linalg.vector_norm(g.reshape(n, -1), dim=1)
                                 .to(device) for g in samples], dim=1)
            total = torch.linalg.vector_norm(norms, dim=1)
            return (self.max_grad_norm / (total + 1e-6)).clamp(max=1.0)
        if len(self.groups) != n:
            raise ValueError(f"{len(self.groups)} record ids for a batch of {n} samples")
        _, inverse = torch.unique(self.groups.to(device), return_inverse=True)
        count = int(inverse.max()) + 1
        squares = torch.zeros(count, device=device)
        for sample in samples:
            flat = sample.reshape(n, -1)
            summed = torch.zeros((count, flat.shape[1]), device=device, dtype=flat.dtype)
            summed.index_add_(0, inverse, flat)
            squares += (summed.float() ** 2).sum(dim=1)
        per_record = (self.max_grad_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0)
        return per_record[inverse]

    def clip_and_accumulate(self) -> None:
        params = self.params
        samples = self._grad_samples(params)
        n = len(samples[0])
        if n == 0:  # an empty Poisson batch: nothing to clip, noise only
            factor = torch.zeros((0,), device=samples[0].device)
        else:
            factor = self._clip_factors(samples, n)
        for p, sample in zip(params, samples, strict=True):
            _check_processed_flag(p.grad_sample)
            sample = sample.to(p.dtype)
            weights = factor.to(device=sample.device, dtype=p.dtype)
            grad = (weights @ sample.reshape(n, p.numel())).view(p.shape)
            if p.summed_grad is not None:
                p.summed_grad += grad
            else:
                p.summed_grad = grad
            _mark_as_processed(p.grad_sample)

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noise = _generate_noise(std=std, reference=p.summed_grad,
                                    generator=self.generator, secure_mode=self.secure_mode)
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)

    def scale_grad(self) -> None:
        if self.loss_reduction == "mean":
            assert self.expected_batch_size is not None  # DPOptimizer refuses otherwise
            divisor = self.expected_batch_size * self.accumulated_iterations  # one walk
            torch._foreach_div_([p.grad for p in self.params if p.grad is not None],
                                float(divisor))

    def pre_step(self, closure: Callable[[], float] | None = None) -> bool:
        if not self.params:  # no trainable parameters: a plain optimizer
            return True
        return bool(super().pre_step(closure))


def make_private(engine: SitePrivacyEngine, model: nn.Module, optimizer: torch.optim.Optimizer,
                 loader: DataLoader[Any], *, noise_multiplier: float, max_grad_norm: float,
                 poisson_sampling: bool = True
                 ) -> tuple[GradSampleModule, FusedDPOptimizer, DataLoader[Any]]:
    """fedrad's DP-SGD set-up: Opacus' `make_private` (hooks, flat clipping) with
    fedrad's samplers, the fused step and autograd's discarded weight gradients skipped.
    What client.training trains with and what the DP property tests check.
    Only a `SitePrivacyEngine` is accepted: a plain PrivacyEngine would draw from torch's
    global generator, which a run config seeds."""
    if not isinstance(engine, SitePrivacyEngine):
        raise TypeError("make_private needs a SitePrivacyEngine (DP randomness from the OS "
                        f"CSPRNG), not {type(engine).__name__}")
    dp_samplers.install()
    private, dp_optimizer, private_loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader,
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        poisson_sampling=poisson_sampling, grad_sample_mode="hooks")
    assert isinstance(private, GradSampleModule)
    skip_weight_grads(private)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    noise = engine.secure_rng if device.type == "cpu" else private_generator(device)
    return private, fuse(dp_optimizer, generator=noise), private_loader


def fuse(optimizer: DPOptimizer, *, generator: torch.Generator | None = None
         ) -> FusedDPOptimizer:
    """The same DP step as `optimizer` (made by `PrivacyEngine.make_private` with flat
    clipping), fused; the accountant's step hook carries over. `generator` replaces the
    optimizer's noise generator (one on the model's device)."""
    if type(optimizer) is not DPOptimizer:
        raise TypeError(f"fuse() takes Opacus' flat-clipping DPOptimizer, not "
                        f"{type(optimizer).__name__}")
    fused = FusedDPOptimizer(
        optimizer.original_optimizer, noise_multiplier=optimizer.noise_multiplier,
        max_grad_norm=optimizer.max_grad_norm,
        expected_batch_size=optimizer.expected_batch_size,
        loss_reduction=optimizer.loss_reduction,
        generator=generator if generator is not None else optimizer.generator,
        secure_mode=optimizer.secure_mode)
    if optimizer.step_hook is not None:
        fused.attach_step_hook(optimizer.step_hook)
    return fused
