"""The shipped lung-segmentation recipe (configs/cxr-lung-seg.toml) on the three real CXR
sites, a few rounds in one process (fedrad.in_memory: the sites' own SegmentationAlgo and
the server's FedAvg), without DP: the deliberate no-DP baseline a site's policy must
allow. bench/recipe_quality.py runs all 40 rounds against the pooled baseline.

Measured on 2026-12-01 (this machine, seed 42, 5 rounds x 2 local epochs): the recipe
reaches pooled validation Dice 0.885 (0.532, 0.547, 0.711, 0.852, 0.885 by round); the
recipe shipped before it (plain GroupNorm UNet, lr 0.01, a fresh Adam each round,
intensity-only augmentation) reached 0.792 in the same rounds (0.643 ... 0.792). The
threshold sits between the two: above the old recipe, with a margin for the machine.
"""

from __future__ import annotations

from pathlib import Path

import torch

from common.config import RunConfig
from fedrad.in_memory import load_sites, train_federated
from fedrad.runs import load_run_config

ROUNDS = 5
# The config ships its DP recipe (a phantom prior, lr 0.01, 10 rounds); without DP the
# recipe is issue 18's, from scratch at lr 0.003 (what the figures above measured).
NO_DP_RECIPE = {"init-weights": "", "learning-rate": 0.003}
REPO = Path(__file__).resolve().parents[1]


def test_the_shipped_recipe_learns_the_real_lungs_in_five_rounds(cxr_root, tmp_path) -> None:
    torch.set_num_threads(2)
    config = RunConfig.from_mapping(load_run_config(
        REPO / "configs" / "cxr-lung-seg.toml",
        {"num-rounds": ROUNDS, "dp-enabled": False, "secagg-enabled": False, "seed": 42,
         **NO_DP_RECIPE}))
    sites = load_sites(config, cxr_root, tmp_path)
    curve = train_federated(config, sites)
    print(f"pooled validation Dice per round: {[round(s, 3) for s in curve.scores]}")
    assert curve.best > 0.84
    assert curve.scores[-1] > curve.scores[0] + 0.1  # it learned, not started there
