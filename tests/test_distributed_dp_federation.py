"""Distributed DP in real processes: the demo's federation (SuperLink, three SuperNodes,
TLS, node auth, secure aggregation) with dp-mode = "distributed" and sites whose policy
trusts the other sites' noise. Each site adds σ/√3 to one gradient per round; its ledger
charges the secure sum's σ and records its own floor; the report states which is which."""

from __future__ import annotations

import json
import math

import pytest

from client.ledger import Session, epsilon_of
from client.site_round import LEDGER_FILE
from fedrad.demo import CONFIGS, run_demo

ROUNDS = 2
SITES = ["hospital-a", "hospital-b", "hospital-c"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed") / "demo"
    overrides = {"num-rounds": ROUNDS, "image-size": 32, "local-epochs": 1,
                 "optimizer-state": "fresh", "dp-mode": "distributed",
                 "dp-sample-rate": 1.0, "learning-rate": 0.5, "dp-target-epsilon": 8.0}
    return run_demo(out, data=None, config_file=CONFIGS / "demo.toml", overrides=overrides,
                    patients=12, say=print, site_policy={"trust-distributed-noise": True})


@pytest.mark.deployment
def test_every_round_is_a_masked_sum_of_every_sites_noisy_gradient(demo) -> None:
    assert [row["server_round"] for row in demo.rounds] == list(range(1, ROUNDS + 1))
    for row in demo.rounds:
        assert row["secagg"] is True and row["sites_trained"] == 3
        assert all(site["status"] == "ok" for site in row["sites"].values())
        assert row["update_norm"] > 0


@pytest.mark.deployment
def test_each_sites_ledger_charges_the_sum_and_records_its_own_floor(demo) -> None:
    sigmas = set()
    for site in SITES:
        ledger = json.loads((demo.out / "sites" / site / "work" / LEDGER_FILE).read_text())
        sessions = [Session(**{k: v for k, v in s.items() if k != "cohort"})
                    for s in ledger["sessions"]]
        assert len(sessions) == ROUNDS
        for session in sessions:
            assert (session.steps, session.sample_rate) == (1, 1.0)
            assert session.floor_noise_multiplier == pytest.approx(
                session.noise_multiplier / math.sqrt(3))
            sigmas.add(session.noise_multiplier)
        train = demo.rounds[-1]["sites"][site]["train"]
        assert train["epsilon-run"] == pytest.approx(epsilon_of(sessions, ledger["delta"]))
        assert train["epsilon-run"] <= 8.0 + 1e-6
        assert train["epsilon-run-own-noise"] == pytest.approx(
            epsilon_of(sessions, ledger["delta"], floor=True))
        assert train["epsilon-run-own-noise"] > train["epsilon-run"]
    assert len(sigmas) == 1  # every site planned the same σ from the run config


@pytest.mark.deployment
def test_the_report_says_which_guarantee_is_which(demo) -> None:
    html = demo.report.read_text()
    assert "Distributed DP" in html and "ε (own share), this run" in html
    floor = demo.rounds[-1]["sites"]["hospital-a"]["train"]["epsilon-run-own-noise"]
    assert f"{floor:.3f}" in html
