"""DP-SGD as properties (as Opacus' own tests), on fedrad's own DP set-up
(client.dp_optimizer.make_private: fedrad's samplers, fused step, weight gradients
skipped): no noise and no clipping equals plain training step for step; clipped
per-sample gradients have norm <= C; every model of every task builds DP-compatible and
takes a DP step."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss
from monai.networks.blocks.segresnet_block import ResBlock
from torch.utils.data import DataLoader, TensorDataset

from client.dp_optimizer import SitePrivacyEngine, make_private
from common.config import RunConfig
from common.models import ModelError, build_model, check_dp_compatible

CASES = {  # id: run config, input shape (one sample), target shape (one sample)
    "unet-2d": ({"task": "lung-seg", "model": "unet"}, (1, 32, 32), (1, 32, 32)),
    "basicunet-2d": ({"task": "lung-seg", "model": "basicunet"}, (1, 32, 32), (1, 32, 32)),
    "segresnet-2d": ({"task": "lung-seg", "model": "segresnet"}, (1, 32, 32), (1, 32, 32)),
    "unet-3d": ({"task": "volume-seg", "model": "unet"}, (1, 16, 16, 16), (1, 16, 16, 16)),
    "segresnet-3d": ({"task": "volume-seg", "model": "segresnet"}, (1, 16, 16, 16),
                     (1, 16, 16, 16)),
    "densenet121": ({"task": "cxr-classify", "model": "densenet121"}, (1, 32, 32), (2,)),
    "unet-res-instance": ({"task": "lung-seg", "model": "unet", "unet-res-units": 2,
                           "norm": "instance"}, (1, 32, 32), (1, 32, 32)),
    "classifier": ({"task": "cxr-classify", "model": "classifier", "image-size": 32},
                   (1, 32, 32), (2,)),
}


def _data(case: str, n: int, seed: int = 0) -> tuple[RunConfig, TensorDataset, torch.nn.Module]:
    raw, x_shape, y_shape = CASES[case]
    config = RunConfig.from_mapping(raw)
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand((n, *x_shape), generator=generator)
    targets = (torch.rand((n, *y_shape), generator=generator) > 0.5).float()
    loss = DiceCELoss(sigmoid=True) if config.task.is_segmentation \
        else torch.nn.BCEWithLogitsLoss()
    return config, TensorDataset(images, targets), loss


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_model_is_dp_compatible_and_takes_a_dp_step(case) -> None:
    config, data, loss_fn = _data(case, 4)
    model = build_model(config)
    before = [p.detach().clone() for p in model.parameters()]
    engine = SitePrivacyEngine(accountant="rdp")
    model, optimizer, loader = make_private(
        engine, model, torch.optim.SGD(model.parameters(), lr=0.1),
        DataLoader(data, batch_size=4), noise_multiplier=1.0, max_grad_norm=1.0,
        poisson_sampling=False)
    for images, targets in loader:
        optimizer.zero_grad()
        loss_fn(model(images), targets).backward()
        optimizer.step()
    moved = [not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters(),
                                                               strict=True)]
    assert all(moved)  # noise reaches every parameter: every layer has per-sample grads


def test_segresnet_without_our_fix_is_refused() -> None:
    model = build_model(RunConfig.from_mapping({"model": "segresnet"}))
    broken = copy.deepcopy(model)
    for module in broken.modules():
        if isinstance(module, ResBlock):
            module.__class__ = ResBlock  # MONAI's own block: `x += identity`
    with pytest.raises(ModelError, match="in-place residual addition"):
        check_dp_compatible(broken)


def test_models_refused_for_the_wrong_task() -> None:
    from common.config import ConfigError

    with pytest.raises(ConfigError,
                       match="model must be 'densenet121' or 'classifier' for task cxr-class"):
        RunConfig.from_mapping({"task": "cxr-classify", "model": "unet"})
    with pytest.raises(ConfigError, match="for task lung-seg"):
        RunConfig.from_mapping({"task": "lung-seg", "model": "densenet121"})


@pytest.mark.parametrize("case", ["unet-2d", "segresnet-2d", "densenet121",
                                  "unet-res-instance", "classifier"])
def test_no_noise_and_no_clipping_equals_plain_training(case) -> None:
    """Step for step, same seed, same batches: the DP machinery adds nothing but DP."""
    config, data, loss_fn = _data(case, 12, seed=1)
    plain = build_model(config)
    private = copy.deepcopy(plain)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.05)
    engine = SitePrivacyEngine(accountant="rdp")
    private, private_opt, private_loader = make_private(
        engine, private, torch.optim.SGD(private.parameters(), lr=0.05),
        DataLoader(data, batch_size=4), noise_multiplier=0.0, max_grad_norm=1e9,
        poisson_sampling=False)
    for (x, y), (px, py) in zip(DataLoader(data, batch_size=4), private_loader, strict=True):
        assert torch.equal(x, px)
        plain_opt.zero_grad()
        loss_fn(plain(x), y).backward()
        plain_opt.step()
        private_opt.zero_grad()
        loss_fn(private(px), py).backward()
        private_opt.step()
        for a, b in zip(plain.parameters(), private.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["unet-2d", "densenet121"])
def test_clipped_per_sample_gradients_have_norm_at_most_c(case) -> None:
    """One sample per step and no noise: the applied gradient is that sample's clipped
    gradient, so its norm is min(C, unclipped norm); with inputs that give large
    gradients it is exactly C."""
    clip = 0.05
    config, data, loss_fn = _data(case, 3, seed=2)
    for images, targets in DataLoader(data, batch_size=1):
        model = build_model(config)
        reference = copy.deepcopy(model)
        loss_fn(reference(images), targets).backward()
        unclipped = torch.sqrt(sum((p.grad ** 2).sum() for p in reference.parameters()))
        engine = SitePrivacyEngine(accountant="rdp")
        model, optimizer, _ = make_private(
            engine, model, torch.optim.SGD(model.parameters(), lr=1.0),
            DataLoader(TensorDataset(images, targets), batch_size=1),
            noise_multiplier=0.0, max_grad_norm=clip, poisson_sampling=False)
        optimizer.zero_grad()
        loss_fn(model(images), targets).backward()
        optimizer.pre_step()  # clip per sample, (no) noise, scale: what step() applies
        applied = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()))
        assert unclipped > clip  # clipping is active for this sample
        assert float(applied) <= clip * (1 + 1e-4)
        assert float(applied) == pytest.approx(clip, rel=1e-3)


def test_a_patient_with_many_images_moves_the_sum_by_at_most_c() -> None:
    """Clipping per record where the record is a patient: three images of one patient
    contribute their summed gradient clipped to C (not 3·C, as per-image clipping
    would allow), and a patient with one image is clipped as before."""
    clip = 0.05
    config, data, loss_fn = _data("unet-2d", 4, seed=3)
    images, targets = data.tensors
    applied = {}
    for name, groups in (("per-image", torch.tensor([0, 1, 2, 3])),
                         ("per-patient", torch.tensor([7, 7, 7, 9]))):
        model = build_model(config)
        engine = SitePrivacyEngine(accountant="rdp")
        model, optimizer, _ = make_private(
            engine, model, torch.optim.SGD(model.parameters(), lr=1.0),
            DataLoader(data, batch_size=4), noise_multiplier=0.0, max_grad_norm=clip,
            poisson_sampling=False)
        optimizer.groups = groups
        optimizer.zero_grad()
        loss_fn(model(images), targets).backward()
        optimizer.pre_step()
        # pre_step divides by the expected batch size (4): undo it to see the clipped sum
        applied[name] = 4 * float(torch.sqrt(sum((p.grad ** 2).sum()
                                                 for p in model.parameters())))
    assert applied["per-image"] > 2.5 * clip  # four records each clipped to C
    assert applied["per-patient"] <= 2 * clip * (1 + 1e-4)  # two patients
    assert applied["per-patient"] < applied["per-image"]


def test_patient_sampling_keeps_a_patients_images_together_at_rate_q() -> None:
    from client.dp_optimizer import private_generator
    from client.patient_sampling import PatientPoissonSampler

    groups = np.repeat(np.arange(200), 3)  # 200 patients, 3 images each
    sampler = PatientPoissonSampler(groups, steps=4, generator=private_generator())
    drawn = []
    for _ in range(50):
        for batch in sampler:
            patients = groups[batch]
            counts = np.bincount(patients, minlength=200)
            assert set(counts.tolist()) <= {0, 3}  # all of a patient's images, or none
            drawn.append(int((counts > 0).sum()))
    assert np.mean(drawn) == pytest.approx(200 / 4, rel=0.05)
