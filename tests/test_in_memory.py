"""fedrad.in_memory, the benchmarks' federation: every training starts from the run's
seeded initial model, whatever the sites' models hold from earlier work in the process."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from client.dataset import SiteDataset
from client.training import SegmentationAlgo
from common import keys
from common.config import RunConfig, Trainable
from common.models import build_model, trainable_names
from common.weights import plain_state_dict, to_arrays
from fedrad.in_memory import pooled_score, train_federated


def _site(seed: int) -> SiteDataset:
    rng = np.random.default_rng(seed)
    masks = (rng.random((8, 1, 32, 32)) > 0.6).astype(np.uint8)
    return SiteDataset(images=masks.astype(np.float32) * 0.7, targets=masks,
                       groups=np.arange(8), content_hash="", phi_values=frozenset(),
                       skipped=(), patients=tuple(f"p{i}" for i in range(8)))


def test_a_federation_starts_from_the_seeded_model_not_from_leftovers() -> None:
    config = RunConfig.from_mapping({"image-size": 32, "num-rounds": 1, "dp-enabled": False,
                                     "secagg-enabled": False, "learning-rate": 1e-12,
                                     "augment": False, "min-sites": 2})
    sites = {name: SegmentationAlgo(config, _site(i), torch.device("cpu"))
             for i, name in enumerate(("a", "b"))}
    untrained = to_arrays(plain_state_dict(build_model(config)))
    expected = pooled_score(sites, untrained, keys.EVAL_DICE)
    leftovers = [np.full_like(a, 0.5) for a in untrained]  # e.g. a pooled run's weights
    assert pooled_score(sites, leftovers, keys.EVAL_DICE) != expected
    curve = train_federated(config, sites)  # lr ~0: the global model stays where it began
    assert curve.scores[0] == expected
    other_seed = dataclasses.replace(config, seed=config.seed + 1)
    assert pooled_score(sites, to_arrays(plain_state_dict(build_model(other_seed))),
                        keys.EVAL_DICE) != expected


def test_a_federation_trains_with_its_own_config_not_the_one_the_sites_were_loaded_with(
        ) -> None:
    loaded = RunConfig.from_mapping({"image-size": 32, "num-rounds": 1, "dp-enabled": False,
                                     "secagg-enabled": False, "augment": False,
                                     "min-sites": 2})
    sites = {name: SegmentationAlgo(loaded, _site(i), torch.device("cpu"))
             for i, name in enumerate(("a", "b"))}
    head_only = dataclasses.replace(loaded, dp=dataclasses.replace(
        loaded.dp, trainable=Trainable.HEAD))
    train_federated(head_only, sites)
    start = build_model(loaded).state_dict()
    after = next(iter(sites.values())).model.state_dict()
    head = set(trainable_names(build_model(loaded), Trainable.HEAD))
    assert all(torch.equal(start[n], after[n]) for n in start if n not in head)
    assert any(not torch.equal(start[n], after[n]) for n in head)
