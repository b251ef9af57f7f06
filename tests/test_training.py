from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch

from client.dataset import DataSpec, load_site_dataset
from client.ledger import Session, epsilon_of
from client.training import SegmentationAlgo, dp_sampling, plan_noise_multiplier
from common.config import RunConfig
from common.masking import RangeError, quantise
from common.models import ModelError, build_model, check_dp_compatible
from common.weights import UpdateError, check_finite, from_arrays, plain_state_dict, to_arrays


def test_models_are_dp_compatible_and_the_check_bites() -> None:
    check_dp_compatible(build_model(RunConfig.from_mapping({})))
    with pytest.raises(ModelError, match="BatchNorm"):
        check_dp_compatible(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4)))
    with pytest.raises(ModelError, match="in-place activation"):
        check_dp_compatible(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(inplace=True)))


def test_weights_on_the_wire() -> None:
    model = build_model(RunConfig.from_mapping({}))
    wrapped = torch.nn.Module()
    wrapped._module = model  # how Opacus' GradSampleModule nests the model
    state = plain_state_dict(wrapped)
    assert list(state) == list(model.state_dict())
    arrays = to_arrays(state)
    assert all(a.dtype == np.float32 for a in arrays)
    restored = from_arrays(state, arrays)
    assert all(torch.equal(restored[k], state[k]) for k in state)
    with pytest.raises(UpdateError, match="expected shape"):
        from_arrays(state, [np.zeros((1, 1), np.float32)] + arrays[1:])
    with pytest.raises(UpdateError, match="expected 32 arrays, got 31"):
        from_arrays(state, arrays[1:])
    arrays[3][0] = np.nan
    with pytest.raises(UpdateError, match="array 3 holds NaN"):
        check_finite(arrays)


def test_planned_noise_spends_the_target_epsilon() -> None:
    config = RunConfig.from_mapping({"num-rounds": 3, "local-epochs": 2, "batch-size": 8})
    sigma = plan_noise_multiplier(config, num_train=36, delta=1e-5)
    q, per_epoch = dp_sampling(36, 8)
    assert (q, per_epoch) == (0.2, 5)
    sessions = [Session(1, r, sigma, q, 2 * per_epoch) for r in (1, 2, 3)]
    assert epsilon_of(sessions, 1e-5) == pytest.approx(8.0, abs=0.05)
    assert epsilon_of(sessions, 1e-5) <= 8.0 + 1e-6


def test_local_training_learns_and_dp_counts_steps(phantom_sites, tmp_path) -> None:
    torch.set_num_threads(2)
    config = RunConfig.from_mapping({"image-size": 32, "local-epochs": 3, "learning-rate": 0.01,
                                     "batch-size": 3})
    dataset = load_site_dataset(phantom_sites["hospital-a"], tmp_path, DataSpec(image_size=32))
    algo = SegmentationAlgo(config, dataset, torch.device("cpu"))
    assert algo.num_train == 8  # 6 patients, 2 held out, 2 images each
    before = algo.evaluate().metrics["eval-dice"]
    plain = algo.train(server_round=1, noise_multiplier=None)
    after = algo.evaluate().metrics["eval-dice"]
    assert after > before + 0.2, (before, after)
    assert plain.steps == 3 * 3  # 8 images, batch 3 -> 3 batches per epoch
    dp = algo.train(server_round=2, noise_multiplier=1.0)
    assert dp.sample_rate == pytest.approx(1 / 3) and dp.steps == 3 * 3


def test_secagg_range_is_checked_not_clipped() -> None:
    config = RunConfig.from_mapping({}).secagg  # clipping range 8, max weight 1000
    limits = {"clipping_range": config.clipping_range,
              "quantization_range": config.quantization_range, "max_weight": config.max_weight}
    quantise(np.full(3, 100.0, np.float32), 50, **limits)  # weighted peak 5.0: fits
    with pytest.raises(RangeError, match="exceeds secagg-clipping-range"):
        quantise(np.full(3, 200.0, np.float32), 50, **limits)
    with pytest.raises(RangeError, match="secagg-max-weight"):
        quantise(np.zeros(3, np.float32), 1001, **limits)


def test_every_party_builds_the_same_initial_model() -> None:
    config = RunConfig.from_mapping({})
    a, b = plain_state_dict(build_model(config)), plain_state_dict(build_model(config))
    assert isinstance(a, OrderedDict) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_server_that_chose_the_seed_cannot_recompute_the_noise(phantom_sites,
                                                                  tmp_path) -> None:
    """Two DP trainings from identical inputs (run config and seed, global model, data):
    with noise from the run's seed they were identical, so the server could regenerate
    the noise and subtract it. Now they differ by the noise alone: one SGD step on every
    patient (q = 1), so w1 - w2 = lr·(n2 - n1)/P with per-coordinate std lr·σ·C·√2/P,
    P = 4 patients (the noisy sum is averaged over the expected number of patients)."""
    torch.set_num_threads(2)
    config = RunConfig.from_mapping({"image-size": 32, "local-epochs": 1, "batch-size": 8,
                                     "optimizer": "sgd", "learning-rate": 0.1,
                                     "augment": False, "seed": 42})
    dataset = load_site_dataset(phantom_sites["hospital-a"], tmp_path, DataSpec(image_size=32))
    trained = []
    for _ in range(2):
        algo = SegmentationAlgo(config, dataset, torch.device("cpu"))
        assert algo.num_train == 8
        result = algo.train(server_round=1, noise_multiplier=1.0, max_grad_norm=1.0)
        assert result.steps == 1 and result.sample_rate == 1.0
        trained.append(np.concatenate([a.ravel() for a in algo.get_weights()]))
    difference = trained[0] - trained[1]
    assert len(set(algo.cohort)) == 4
    expected = 0.1 * 1.0 * 1.0 * np.sqrt(2) / 4
    assert float(np.std(difference)) == pytest.approx(expected, rel=0.05)
    assert abs(float(np.mean(difference))) < 5 * expected / np.sqrt(difference.size)


def test_dp_training_refuses_an_engine_seeded_from_outside() -> None:
    from opacus import PrivacyEngine

    from client.dp_optimizer import make_private

    model = build_model(RunConfig.from_mapping({"image-size": 32}))
    data = torch.utils.data.TensorDataset(torch.zeros(2, 1, 32, 32), torch.zeros(2, 1, 32, 32))
    with pytest.raises(TypeError, match="SitePrivacyEngine"):
        make_private(PrivacyEngine(accountant="rdp"), model,  # type: ignore[arg-type]
                     torch.optim.SGD(model.parameters(), lr=0.1),
                     torch.utils.data.DataLoader(data, batch_size=2), noise_multiplier=1.0,
                     max_grad_norm=1.0)
