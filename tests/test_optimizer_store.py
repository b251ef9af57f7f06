"""optimizer-state = kept on a site's disk (client.optimizer_store): the moments after a
round come back before the next, a resumed round gets those of the round it resumes
after, and old rounds and runs are pruned."""

from __future__ import annotations

import stat

import numpy as np
import torch

from client import optimizer_store
from client.dataset import SiteDataset
from client.training import SegmentationAlgo
from common.config import RunConfig


def _state(step: int) -> dict:
    return {"state": {0: {"step": torch.tensor(float(step)), "exp_avg": torch.ones(3) * step}},
            "param_groups": [{"lr": 0.01, "betas": (0.9, 0.999), "params": [0]}]}


def test_the_latest_round_before_the_asked_one_comes_back(tmp_path) -> None:
    assert optimizer_store.load(tmp_path, "7", 1) is None
    for server_round in (1, 2, 3, 4):
        optimizer_store.save(tmp_path, "7", server_round, _state(server_round))
    folder = tmp_path / optimizer_store.FOLDER / "run-7"
    assert sorted(p.name for p in folder.iterdir()) == ["round-2.pt", "round-3.pt",
                                                        "round-4.pt"]
    assert stat.S_IMODE((folder / "round-4.pt").stat().st_mode) == 0o600
    assert float(optimizer_store.load(tmp_path, "7", 5)["state"][0]["step"]) == 4
    # a run resumed after its round-3 checkpoint trains round 4 again: round 3's moments
    assert float(optimizer_store.load(tmp_path, "7", 4)["state"][0]["step"]) == 3
    assert optimizer_store.load(tmp_path, "7", 2) is None  # round 1 was pruned


def test_only_the_most_recent_runs_are_kept(tmp_path) -> None:
    for run in range(1, optimizer_store.KEPT_RUNS + 3):
        optimizer_store.save(tmp_path, str(run), 1, _state(1))
    kept = sorted(p.name for p in (tmp_path / optimizer_store.FOLDER).iterdir())
    assert len(kept) == optimizer_store.KEPT_RUNS and "run-1" not in kept


def test_a_site_restarted_between_rounds_continues_its_adam_moments(tmp_path) -> None:
    """A new process (a new algo) that loads the saved moments steps on from them: its
    next round's weights equal those of the algo that never stopped."""
    rng = np.random.default_rng(0)
    masks = (rng.random((12, 1, 32, 32)) > 0.6).astype(np.uint8)
    data = SiteDataset(images=masks.astype(np.float32) * 0.7, targets=masks,
                       groups=np.arange(12), content_hash="", phi_values=frozenset(),
                       skipped=(), patients=tuple(f"p{i}" for i in range(12)))
    config = RunConfig.from_mapping({"image-size": 32, "optimizer-state": "kept",
                                     "dp-enabled": False, "batch-size": 4})
    steady = SegmentationAlgo(config, data, torch.device("cpu"))
    steady.train(server_round=1, noise_multiplier=None)
    optimizer_store.save(tmp_path, "3", 1, steady.optimizer_state)
    weights = steady.get_weights()
    restarted = SegmentationAlgo(config, data, torch.device("cpu"))
    restarted.set_weights(weights)
    restarted.optimizer_state = optimizer_store.load(tmp_path, "3", 2)
    forgetful = SegmentationAlgo(config, data, torch.device("cpu"))
    forgetful.set_weights(weights)
    for algo in (steady, restarted, forgetful):
        algo.train(server_round=2, noise_multiplier=None)
    for a, b in zip(steady.get_weights(), restarted.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in
               zip(steady.get_weights(), forgetful.get_weights(), strict=True))
