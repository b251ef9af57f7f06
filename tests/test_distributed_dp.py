"""dp-mode = "distributed" (client.distributed_dp): each of K sites adds σ/√K to one clipped
gradient at the global weights; the FedAvg of their updates is the secure sum, whose noise
is σ. Refused without secure aggregation, in the clear, in too small a sum, and by a site
whose policy does not trust the other sites' noise."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from client import distributed_dp, secure_sum, site_round
from client.dataset import SiteDataset
from client.errors import SiteRefusal
from client.ledger import Session, epsilon_of
from client.site_policy import SitePolicy
from client.training import SegmentationAlgo, plan_noise_multiplier
from common import keys
from common.config import ConfigError, RunConfig
from common.models import build_model
from common.weights import pack, plain_state_dict, subtract, to_arrays
from tests.test_masking import RUN, _consortium, _fields, _masked_round, _roster, _updates

DISTRIBUTED = {"dp-mode": "distributed", "dp-sample-rate": 1.0, "secagg-min-sites": 3,
               "image-size": 32, "augment": False, "num-rounds": 5}


def _site(patients: int, seed: int, size: int = 32) -> SiteDataset:
    rng = np.random.default_rng(seed)
    masks = (rng.random((patients, 1, size, size)) > 0.6).astype(np.uint8)
    return SiteDataset(images=masks.astype(np.float32) * 0.7 + 0.1, targets=masks,
                       groups=np.arange(patients), content_hash="", phi_values=frozenset(),
                       skipped=(), patients=tuple(f"p{i}" for i in range(patients)))


def _update(algo: SegmentationAlgo, start: list[np.ndarray], noise: float) -> np.ndarray:
    algo.set_weights(start)
    result = algo.train(server_round=1, noise_multiplier=noise)
    assert (result.steps, result.sample_rate) == (1, 1.0)  # one step, every patient drawn
    return np.concatenate([a.ravel() for a in subtract(algo.get_weights(), start)])


def test_each_site_adds_its_share_and_the_weighted_mean_carries_sigma() -> None:
    """At q = 1 the clipped gradient is deterministic, so a site's noise is its noisy update
    minus its noise-free one. With lr 1: update = -(G + noise)/P at each site; FedAvg with
    weight P gives -(ΣG + Σnoise)/ΣP, whose noise has std σ·C/ΣP."""
    config = RunConfig.from_mapping({**DISTRIBUTED, "learning-rate": 1.0,
                                     "dp-max-grad-norm": 0.5})
    sigma, clip, k = 2.0, 0.5, distributed_dp.sites_sharing(config)
    own = sigma * distributed_dp.share(config)
    assert own == pytest.approx(sigma / math.sqrt(3))
    start = to_arrays(plain_state_dict(build_model(config)))
    noises, weights = [], []
    for seed, patients in enumerate((6, 9, 12)):
        algo = SegmentationAlgo(config, _site(patients, seed), torch.device("cpu"),
                                split=(0.25, seed))
        clean = _update(algo, start, 0.0)
        noisy = _update(algo, start, own)
        train_patients = len(algo.cohort)
        noise = -(noisy - clean) * train_patients  # the noise the site added to its sum
        assert abs(float(noise.std()) / (own * clip) - 1) < 0.02  # σ/√K, not σ
        noises.append(noise)
        weights.append(distributed_dp.fedavg_weight(config, examples=algo.num_train,
                                                    patients=train_patients))
    assert len(noises[0]) > 50_000 and len(noises) == k
    total = np.sum(noises, axis=0)
    assert abs(float(total.std()) / (sigma * clip) - 1) < 0.02  # the sum carries σ
    # the FedAvg of the updates is the secure sum over ΣP (the weights are the patients)
    mean_noise = np.average([-n / w for n, w in zip(noises, weights, strict=True)], axis=0,
                            weights=weights)
    assert abs(float(mean_noise.std()) / (sigma * clip / sum(weights)) - 1) < 0.02


def test_sigma_is_planned_from_the_run_alone_for_the_sum() -> None:
    """Every site plans the same σ, whatever its size or δ; ε of the sum is the target."""
    config = RunConfig.from_mapping({**DISTRIBUTED, "dp-sample-rate": 0.5})
    sigmas = {plan_noise_multiplier(config, num_train=n, delta=d)
              for n, d in ((10, 1e-5), (400, 1e-7))}
    assert len(sigmas) == 1
    (sigma,) = sigmas
    sessions = [Session(1, r, sigma, 0.5, 1) for r in range(1, 6)]
    assert epsilon_of(sessions, 1e-5) == pytest.approx(8.0, abs=0.05)


def test_the_ledger_records_the_sums_guarantee_and_the_sites_own_floor(
        phantom_sites, tmp_path) -> None:
    run_config = {**DISTRIBUTED, "batch-size": 8}
    config = RunConfig.from_mapping(run_config)
    node_config = {"site-id": "hospital-a", "data-dir": str(phantom_sites["hospital-a"]),
                   "work-dir": str(tmp_path / "work"), "epsilon-budget": 50.0,
                   "threads": 1}
    arrays = pack(to_arrays(plain_state_dict(build_model(config))))
    out = {}
    for server_round in (1, 2):
        out = site_round.train_outcome(run_id=5, node_config=node_config,
                                       run_config=run_config, global_arrays=arrays,
                                       server_round=server_round, masked=True)
    metrics = out["metrics"]
    sigma = metrics[keys.NOISE_MULTIPLIER]
    ledger = json.loads((tmp_path / "work" / site_round.LEDGER_FILE).read_text())
    sessions = [Session(**{k: v for k, v in s.items() if k != "cohort"})
                for s in ledger["sessions"]]
    assert [(s.noise_multiplier, s.floor_noise_multiplier, s.sample_rate, s.steps)
            for s in sessions] == [(sigma, pytest.approx(sigma / math.sqrt(3)), 1.0, 1)] * 2
    delta = ledger["delta"]
    assert metrics[keys.EPSILON_ROUND] == pytest.approx(epsilon_of(sessions, delta))
    assert metrics[keys.EPSILON_FLOOR] == pytest.approx(epsilon_of(sessions, delta,
                                                                   floor=True))
    assert metrics[keys.EPSILON_FLOOR] > 1.5 * metrics[keys.EPSILON_ROUND]  # σ/√3 alone


def test_what_a_site_sends_carries_its_share_of_sigma_not_all_of_it(
        phantom_sites, tmp_path) -> None:
    """Through the site's own round code: two rounds from the same global weights at
    q = 1 differ only by their noise, so the difference of the two (dequantised) masked
    updates has std √2·lr·(σ/√K)·C / (q·P), P the site's FedAvg weight."""
    from common.masking import dequantise

    run_config = {**DISTRIBUTED, "batch-size": 8, "learning-rate": 1.0}
    config = RunConfig.from_mapping(run_config)
    node_config = {"site-id": "hospital-a", "data-dir": str(phantom_sites["hospital-a"]),
                   "work-dir": str(tmp_path / "work"), "epsilon-budget": 50.0,
                   "threads": 1}
    arrays = pack(to_arrays(plain_state_dict(build_model(config))))
    sent, sigma = [], 0.0
    for server_round in (1, 2):
        out = site_round.train_outcome(run_id=7, node_config=node_config,
                                       run_config=run_config, global_arrays=arrays,
                                       server_round=server_round, masked=True)
        update, weight = dequantise(out["quantised"],
                                    clipping_range=config.secagg.clipping_range,
                                    quantization_range=config.secagg.quantization_range,
                                    max_weight=config.secagg.max_weight)
        sent.append(update.astype(np.float64))
        sigma = out["metrics"][keys.NOISE_MULTIPLIER]
    share = sigma / math.sqrt(3) * config.dp.max_grad_norm / weight  # lr 1, q 1
    difference = sent[1] - sent[0]
    assert len(difference) > 50_000
    assert abs(float(difference.std()) / (math.sqrt(2) * share) - 1) < 0.03


def test_a_server_asking_for_a_distributed_update_in_the_clear_is_refused(
        phantom_sites, tmp_path) -> None:
    """The attack: an unmasked request in a distributed-DP run would get one site's
    update with only its σ/√K share of noise. Refused before training; nothing charged."""
    run_config = {**DISTRIBUTED, "batch-size": 8}
    node_config = {"site-id": "hospital-a", "data-dir": str(phantom_sites["hospital-a"]),
                   "work-dir": str(tmp_path / "work"), "epsilon-budget": 50.0}
    arrays = pack(to_arrays(plain_state_dict(build_model(RunConfig.from_mapping(run_config)))))
    with pytest.raises(SiteRefusal) as refusal:
        site_round.train_outcome(run_id=6, node_config=node_config, run_config=run_config,
                                 global_arrays=arrays, server_round=1, masked=False)
    assert refusal.value.reason.endswith("dp-mode")
    assert not (tmp_path / "work" / site_round.LEDGER_FILE).exists()


def test_a_masked_sum_with_fewer_sites_than_the_noise_shares_is_refused(tmp_path) -> None:
    """The attack: a set (or a recovery) of 3 when σ is shared by 4 leaves σ·√(3/4) on the
    sum. The site's own minimum (2 here) would allow it; distributed DP does not."""
    configs = _consortium(tmp_path, 4)
    for config in configs.values():
        config["min-secure-aggregation-sites"] = 2
    roster = _roster(configs)
    run = {"dp-mode": "distributed", "secagg-min-sites": 4, "min-sites": 4}
    three = sorted(configs)[:3]
    with pytest.raises(SiteRefusal):
        secure_sum.plan(configs[101], run, run_id=RUN, node_id=101, server_round=1,
                        fields=_fields(roster, three))
    secure_sum.plan(configs[101], {}, run_id=RUN, node_id=101, server_round=1,
                    fields=_fields(roster, three))  # local DP: the site's minimum holds
    updates, weights = _updates(configs)
    _masked_round(configs, roster, updates, weights, answering=three)
    with pytest.raises(SiteRefusal):
        secure_sum.recover(configs[101], run, run_id=RUN, node_id=101, server_round=1,
                           fields={"participants": three, "attempt": 1})
    audit = (tmp_path / "work" / "site-1" / "audit.jsonl").read_text()
    assert audit.count("fewer than the 4 sites whose noise shares") == 2


@pytest.mark.parametrize("change, why", [
    ({"secagg-enabled": False}, "secure aggregation"),
    ({"dp-enabled": False}, "dp-enabled"),
    ({"local-epochs": 2}, "local-epochs"),
    ({"optimizer-state": "kept"}, "optimizer-state"),
    ({"central-dp-enabled": True}, "central-dp"),
    ({"dp-sample-rate": 0.0}, "dp-sample-rate"),
])
def test_distributed_mode_is_refused_where_it_would_not_hold(change, why) -> None:
    with pytest.raises(ConfigError, match=why):
        RunConfig.from_mapping({**DISTRIBUTED, **change})


def test_a_site_refuses_distributed_dp_unless_its_policy_trusts_the_others_noise() -> None:
    config = RunConfig.from_mapping(DISTRIBUTED)
    assert "trust-distributed-noise" in SitePolicy().violations(config)
    trusting = SitePolicy.from_mapping({"trust-distributed-noise": True})
    assert trusting.violations(config) == []
    assert "trust-distributed-noise=true" in trusting.insecure_settings()


def test_the_report_places_the_run_on_the_recorded_utility_curve(tmp_path) -> None:
    """bench/dp_utility.py --record puts its curve in the run's registry; the report shows
    it, bold at this run's settings, with the measured ratio named."""
    import sys
    from pathlib import Path

    from server.registry import RunFolder
    from server.report import write_report

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from dp_utility import Row, curve_points

    config = RunConfig.from_mapping({**DISTRIBUTED, "init-weights": "prior.pt"}).to_mapping()
    run = RunFolder.create(tmp_path / "server", 9, config)
    assert "No utility-vs-ε curve is recorded" in write_report(run).read_text()
    rows = [Row(1, "distributed", "prior", "all", 8.0, 0.72, 0.90),
            Row(2, "distributed", "prior", "all", 8.0, 0.75, 0.92),
            Row(1, "local", "prior", "all", 8.0, 0.60, 0.90),
            Row(1, "local", "prior", "all", None, 0.88, 0.90)]
    points = curve_points(rows)
    assert len(points) == 3
    run.record_dp_curve(points, "bench/dp_utility.py, seeds 1,2")
    text = write_report(run).read_text()
    low, high = 0.72 / 0.90, 0.75 / 0.92
    assert f"measured at {min(low, high):.3f}-{max(low, high):.3f} of pooled" in text
    assert text.count("font-weight:bold") == 1 and "no DP" in text
