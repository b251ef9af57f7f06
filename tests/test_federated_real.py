"""Federated lung segmentation on the real chest X-ray sites, DP-SGD on at every site.

The sites, their data and their training are the product's own (site ingestion,
SegmentationAlgo, planned noise, the privacy ledger's accounting); only the transport
is left out: weights move in memory and are averaged with FedAvg's weighting
(examples per site). The deployment test covers the transport with real processes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.dataset import DataSpec, load_site_dataset
from client.ledger import Session, epsilon_of
from client.training import SegmentationAlgo, default_delta, plan_noise_multiplier
from common.config import RunConfig

ROUNDS = 4
# What this test does not claim: quality. Measured on 2026-12-01 (this machine), the
# untrained UNet already scores pooled Dice 0.385 on these validation patients, and five
# trainings with patient-level DP-SGD at ε 8 ended at 0.329-0.441 after 4 rounds (one
# went 0.337 -> 0.234 -> 0.271 -> 0.329). At ε 8 on hospital-sized data the shipped
# recipe does not beat its starting point: that is issue 19's problem (DP that keeps
# utility), measured in bench/, not a threshold to tune here. This test checks that the
# real sites train under DP and account exactly for what they spend.


def test_federated_lung_segmentation_on_real_sites_with_dp(cxr_root, tmp_path) -> None:
    torch.set_num_threads(2)
    config = RunConfig.from_mapping({"image-size": 128, "num-rounds": ROUNDS,
                                     "local-epochs": 2, "learning-rate": 0.01,
                                     "batch-size": 8, "dp-target-epsilon": 8.0})
    sites = {}
    for folder in sorted(p for p in cxr_root.iterdir() if p.is_dir()):
        dataset = load_site_dataset(folder, tmp_path / folder.name,
                                    DataSpec(image_size=config.image_size))
        sites[folder.name] = SegmentationAlgo(config, dataset, torch.device("cpu"))
    sigmas = {name: plan_noise_multiplier(config, num_train=algo.num_train,
                                          delta=default_delta(algo.num_train))
              for name, algo in sites.items()}
    global_weights = next(iter(sites.values())).get_weights()
    sessions: dict[str, list[Session]] = {name: [] for name in sites}
    pooled = []
    for server_round in range(1, ROUNDS + 1):
        updates, counts = [], []
        for name, algo in sites.items():
            algo.set_weights(global_weights)
            result = algo.train(server_round=server_round, noise_multiplier=sigmas[name])
            sessions[name].append(Session(1, server_round, sigmas[name], result.sample_rate,
                                          result.steps))
            updates.append(algo.get_weights())
            counts.append(result.num_examples)
        global_weights = [np.average(np.stack(layer), axis=0, weights=counts)
                          for layer in zip(*updates, strict=True)]
        dice, examples = [], []
        for algo in sites.values():
            algo.set_weights(global_weights)
            evaluation = algo.evaluate()
            dice.append(evaluation.metrics["eval-dice"])
            examples.append(evaluation.num_examples)
        pooled.append(float(np.average(dice, weights=examples)))
    print("pooled Dice per round:", [round(d, 3) for d in pooled])
    assert all(0.0 < d < 1.0 for d in pooled)  # a real score every round, never NaN
    assert len(set(pooled)) == ROUNDS  # the global model moved every round
    for name, algo in sites.items():  # every site spent its planned ε, not more
        spent = epsilon_of(sessions[name], default_delta(algo.num_train))
        assert spent == pytest.approx(8.0, abs=0.1) and spent <= 8.0 + 1e-6
