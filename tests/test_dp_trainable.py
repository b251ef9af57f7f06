"""dp-trainable: only the selected parameters get gradients, clipping, noise and steps;
the rest leave a site's training bit-identical to the model it received."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from client.dataset import SiteDataset
from client.dp_optimizer import SitePrivacyEngine, make_private
from client.training import SegmentationAlgo, _noise_only_step
from common.config import RunConfig, Trainable
from common.models import build_model, freeze_except, trainable_names


def _site(n: int = 16, size: int = 32) -> SiteDataset:
    rng = np.random.default_rng(0)
    masks = (rng.random((n, 1, size, size)) > 0.6).astype(np.uint8)
    return SiteDataset(images=masks.astype(np.float32) * 0.7 + 0.1, targets=masks,
                       groups=np.arange(n), content_hash="", phi_values=frozenset(),
                       skipped=(), patients=tuple(f"p{i}" for i in range(n)))


@pytest.mark.parametrize("which", [Trainable.NORM_BIAS, Trainable.HEAD,
                                   Trainable.NORM_BIAS_HEAD])
def test_frozen_parameters_are_bit_identical_after_dp_training(which) -> None:
    config = RunConfig.from_mapping({"image-size": 32, "dp-trainable": which.value,
                                     "batch-size": 4, "local-epochs": 2})
    algo = SegmentationAlgo(config, _site(), torch.device("cpu"))
    before = {k: v.clone() for k, v in algo.model.state_dict().items()}
    algo.train(server_round=1, noise_multiplier=1.0)
    after = algo.model.state_dict()
    chosen = set(trainable_names(algo.model, which))
    params = {name for name, _ in algo.model.named_parameters()}
    assert chosen and chosen < params
    for name in params - chosen:
        assert torch.equal(before[name], after[name]), name
    assert all(not torch.equal(before[n], after[n]) for n in chosen)  # noise reached them


def test_the_noise_reaches_only_the_selected_parameters_at_the_planned_std() -> None:
    """One noise-only DP step (an empty Poisson draw) with SGD at lr 1: each trained
    parameter moves by N(0, (σ·C / expected batch)²), each frozen one not at all."""
    sigma, clip, batch = 2.0, 0.5, 4.0
    config = RunConfig.from_mapping({"task": "cxr-classify", "model": "densenet121",
                                     "image-size": 32, "dp-trainable": "norm-bias"})
    model = build_model(config)
    freeze_except(model, config.dp.trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    data = TensorDataset(torch.rand(8, 1, 32, 32), torch.rand(8, 2))
    private, dp_optimizer, _ = make_private(
        SitePrivacyEngine(accountant="rdp"), model, optimizer, DataLoader(data, batch_size=4),
        noise_multiplier=sigma, max_grad_norm=clip, poisson_sampling=False)
    dp_optimizer.expected_batch_size = batch
    dp_optimizer.groups = torch.zeros(0, dtype=torch.long)
    _noise_only_step(private, dp_optimizer)
    chosen = set(trainable_names(model, Trainable.NORM_BIAS))
    moved = []
    for name, param in model.named_parameters():
        delta = (param.detach() - before[name]).reshape(-1)
        if name in chosen:
            moved.append(delta)
        else:
            assert torch.count_nonzero(delta) == 0, name
    noise = torch.cat(moved)
    expected = sigma * clip / batch
    # ~84k draws: the sample std is within 2 % of the true one far beyond 5 sigma
    assert len(noise) > 50_000
    assert abs(float(noise.std()) / expected - 1) < 0.02
    assert abs(float(noise.mean())) < 5 * expected / len(noise) ** 0.5
