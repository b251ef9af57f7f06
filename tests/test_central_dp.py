"""Central (site-level) DP: config checks, the noise the server adds, the ε it reports,
and the site-side clipping the mechanism relies on."""

from __future__ import annotations

import numpy as np
import pytest
from opacus.accountants.analysis import rdp as rdp_analysis

from common.config import ConfigError, RunConfig
from common.weights import global_norm
from server.central_dp import CentralDP


@pytest.mark.parametrize("raw, match", [
    ({"central-dp-noise-multiplier": 0.0}, "central-dp-noise-multiplier must be > 0"),
    ({"central-dp-clipping-norm": -1.0}, "central-dp-clipping-norm must be > 0"),
    ({"central-dp-delta": 1.0}, r"central-dp-delta must be in \(0, 1\)"),
])
def test_bad_central_dp_settings_refuse_to_run(raw, match) -> None:
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_mapping({"central-dp-enabled": True, **raw})
    RunConfig.from_mapping(raw)  # the same values are ignored while central DP is off


def test_measured_noise_matches_the_formula() -> None:
    settings = RunConfig.from_mapping({"central-dp-enabled": True,
                                       "central-dp-noise-multiplier": 1.2,
                                       "central-dp-clipping-norm": 0.5}).central_dp
    central = CentralDP(settings)
    aggregate = [np.zeros((400, 500), np.float32), np.zeros(1000, np.float32)]
    central.privatise(aggregate, contributors=4)
    measured = float(np.concatenate([a.ravel() for a in aggregate]).std())
    assert central.noise_std(4) == pytest.approx(1.2 * 0.5 / 4)
    assert measured == pytest.approx(1.2 * 0.5 / 4, rel=0.01)
    assert aggregate[0].dtype == np.float32


def test_epsilon_is_the_gaussian_mechanism_composed_over_rounds() -> None:
    settings = RunConfig.from_mapping({"central-dp-enabled": True,
                                       "central-dp-noise-multiplier": 2.0,
                                       "central-dp-delta": 1e-5}).central_dp
    central = CentralDP(settings)
    assert central.epsilon() == 0.0
    spent = []
    for _ in range(3):
        central.privatise([np.zeros(10, np.float32)], contributors=3)
        spent.append(central.epsilon())
    assert spent[0] < spent[1] < spent[2]
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = rdp_analysis.compute_rdp(q=1.0, noise_multiplier=2.0, steps=3, orders=orders)
    expected, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    assert spent[2] == pytest.approx(float(expected), rel=1e-6)


def test_site_updates_are_clipped_and_weighted_uniformly(phantom_sites, tmp_path) -> None:
    """Through the site's own round code: with central DP on, the update leaving the site
    has norm <= C and FedAvg weight 1; with it off, the same round's update is larger."""
    from client.site_round import train_outcome
    from common.models import build_model
    from common.weights import pack, plain_state_dict, to_arrays

    run_config = {"image-size": 32, "local-epochs": 1, "batch-size": 8, "augment": False,
                  "central-dp-enabled": True, "central-dp-clipping-norm": 0.01}
    global_arrays = pack(to_arrays(plain_state_dict(build_model(
        RunConfig.from_mapping(run_config)))))
    outcomes = {}
    for enabled in (True, False):
        node_config = {"site-id": "hospital-a", "data-dir": str(phantom_sites["hospital-a"]),
                       "work-dir": str(tmp_path / f"work-{enabled}"), "epsilon-budget": 20.0}
        outcomes[enabled] = train_outcome(
            run_id=1, node_config=node_config,
            run_config={**run_config, "central-dp-enabled": enabled},
            global_arrays=global_arrays, server_round=1, masked=False)
    clipped, plain = outcomes[True], outcomes[False]
    assert global_norm(clipped["update"]) == pytest.approx(0.01, rel=1e-3)
    assert global_norm(plain["update"]) > 0.05
    assert clipped["weight"] == 1 and plain["weight"] == 8  # its 8 training images
