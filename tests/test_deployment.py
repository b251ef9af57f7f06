"""The demo path in deployment mode: real SuperLink and SuperNodes on 127.0.0.1, TLS,
node authentication, secure aggregation and DP-SGD, on a tiny generated dataset."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from common.config import RunConfig
from common.models import build_model
from common.weights import plain_state_dict
from fedrad.demo import CONFIGS, SITE_BUDGET, DemoFailed, run_demo
from server.registry import RunFolder
from tests.conftest import find_canaries

ROUNDS = 3
TARGET_EPSILON = 8.0


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy") / "demo"
    # Settings measured in-process on the anatomical phantoms (fedrad.in_memory, the same
    # training code, patient-level DP-SGD with noise from the OS CSPRNG, 2 trainings on
    # 2026-12-01): pooled Dice went 0.133 -> 0.527 and 0.183 -> 0.679 over 3 rounds; the
    # test asks for a rise of 0.15. With 16 patients per site it did not rise at all
    # (0.20 -> 0.16): DP needs patients, and batch 32 of 36 training patients keeps the
    # noise of the mean low.
    overrides = {"num-rounds": ROUNDS, "image-size": 32, "local-epochs": 3, "batch-size": 32,
                 "learning-rate": 0.01, "dp-target-epsilon": TARGET_EPSILON}
    return run_demo(out, data=None, config_file=CONFIGS / "demo.toml", overrides=overrides,
                    patients=48, say=print)


@pytest.mark.deployment
def test_every_round_completed_with_every_site(demo) -> None:
    assert [row["server_round"] for row in demo.rounds] == list(range(1, ROUNDS + 1))
    for row in demo.rounds:
        assert row["secagg"] is True
        assert row["sites_expected"] == row["sites_trained"] == 3
        assert sorted(row["sites"]) == ["hospital-a", "hospital-b", "hospital-c"]
        assert all(site["status"] == "ok" for site in row["sites"].values())
        assert row["failures"] == []
    registry = json.loads((demo.run_dir / "registry.json").read_text())
    assert registry["status"] == "completed"


@pytest.mark.deployment
def test_every_message_ran_from_the_sites_warm_launcher(demo) -> None:
    """Each site's SuperNode runs in process isolation; its launcher claimed every message
    and every ClientApp exited cleanly. One exchange per round: the run's key advert
    (once), one training request per round (carrying the previous round's evaluation),
    and the last round's evaluation."""
    for site in ["hospital-a", "hospital-b", "hospital-c"]:
        logs = demo.out / "sites" / site / "work" / "logs"
        launcher = (logs / "launcher.log").read_text()
        assert launcher.count("ClientApp done in") == ROUNDS + 2, site
        assert "exited with" not in launcher
        supernode = (logs / "supernode.log").read_text()
        assert supernode.count("Sent successfully") == ROUNDS + 2, site
    assert [row["exchanges"] for row in demo.rounds] == [2] + [1] * (ROUNDS - 2) + [2]


@pytest.mark.deployment
def test_the_global_model_changed_every_round(demo) -> None:
    config = RunConfig.from_mapping(json.loads((demo.run_dir / "config.json").read_text()))
    states = [plain_state_dict(build_model(config))]
    registry = json.loads((demo.run_dir / "registry.json").read_text())
    for rnd in range(1, ROUNDS + 1):
        path = demo.run_dir / "checkpoints" / f"round-{rnd:03d}.pt.enc"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == \
            registry["checkpoints"][str(rnd)]["sha256"]
        with pytest.raises(Exception):  # noqa: B017 - encrypted at rest: not a torch file
            torch.load(path, weights_only=True)
        states.append(RunFolder(demo.run_dir).load_checkpoint(rnd))
    for previous, current in zip(states, states[1:], strict=False):
        moved = sum(float((current[k] - previous[k]).abs().sum()) for k in current)
        assert moved > 1e-3
    assert all(row["update_norm"] > 0 for row in demo.rounds)


@pytest.mark.deployment
def test_dice_improves(demo) -> None:
    first, last = demo.rounds[0]["pooled_score"], demo.rounds[-1]["pooled_score"]
    assert last > first + 0.15, (first, last)


@pytest.mark.deployment
def test_epsilon_per_site_is_spent_and_within_budget(demo) -> None:
    for site in ["hospital-a", "hospital-b", "hospital-c"]:
        spent = [row["sites"][site]["train"]["epsilon-total"] for row in demo.rounds]
        assert 0 < spent[0] < spent[-1]
        assert spent == sorted(spent)
        assert spent[-1] <= TARGET_EPSILON + 1e-6  # the planned σ spends the target exactly
        assert spent[-1] <= SITE_BUDGET
    epsilon = json.loads((demo.run_dir / "epsilon.json").read_text())
    assert set(epsilon) == {"hospital-a", "hospital-b", "hospital-c"}


@pytest.mark.deployment
def test_no_canary_leaves_a_site(demo) -> None:
    # The scanner finds the canaries where they belong: in the hospitals' own files.
    assert find_canaries([demo.out / "data"])
    server_side = [
        demo.server_home,  # SuperLink state and log, run folder, checkpoints, report, audit
        demo.out / "logs" / "server.log",
        demo.out / "logs" / "serverapp.log",
    ]
    assert (demo.server_home / "state.db").is_file()
    assert (demo.server_home / "superlink.log").stat().st_size > 0
    assert find_canaries(server_side) == []


@pytest.mark.deployment
def test_report_is_written(demo) -> None:
    html = demo.report.read_text()
    assert html.count("data:image/png;base64,") == 3  # score, participation, ε
    for chart in ("per site per round", "participation", "privacy spent"):
        assert chart in html
    assert "training loss" not in html  # not DP-noised: the sites' policy keeps it
    assert "completed" in html and f"{ROUNDS} of {ROUNDS} rounds" in html


@pytest.mark.deployment
def test_a_site_over_budget_refuses_and_the_run_stops_below_the_secure_set(tmp_path) -> None:
    """hospital-c's own budget (1.0) is below what one round spends: it refuses, and is
    recorded as refused (not merely dropped), spending nothing. The two others are below
    secagg-min-sites = 3 (and the sites' own min-secure-aggregation-sites): a sum of two
    tells each the other's update, so no recovery is attempted, and the run stops with a
    message naming the site. The refusal reason is a fixed sentence without data."""
    out = tmp_path / "demo"
    overrides = {"num-rounds": 2, "image-size": 32, "local-epochs": 1, "batch-size": 8,
                 "dp-target-epsilon": TARGET_EPSILON}
    with pytest.raises(DemoFailed, match="finished:failed"):
        run_demo(out, data=None, config_file=CONFIGS / "demo.toml", overrides=overrides,
                 patients=8, say=print, budgets={"hospital-c": 1.0})
    (metrics,) = out.rglob("metrics.jsonl")
    (row,) = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert row["sites"]["hospital-c"]["status"] == "refused-privacy-budget"
    assert row["sites_trained"] == 2 and row["pooled_score"] != row["pooled_score"]  # nan
    for site in ("hospital-a", "hospital-b"):
        assert row["sites"][site]["status"] == "ok"
    log = (out / "logs" / "serverapp.log").read_text()
    assert "fewer than secagg-min-sites=3" in log and "'hospital-c'" in log
    ledger = out / "sites" / "hospital-c" / "work" / "privacy-ledger.json"
    if ledger.exists():  # the site spent nothing: no session was ever recorded
        assert not json.loads(ledger.read_text())["sessions"]


@pytest.mark.deployment
def test_audit_logs_on_both_sides_are_intact_and_complete(demo) -> None:
    from common.audit import Head, verify

    server_log = demo.server_home / "audit.jsonl"
    registry = json.loads((demo.run_dir / "registry.json").read_text())
    head = verify(server_log, expected=Head(registry["audit"]["entries"],
                                            registry["audit"]["last_hash"]))
    events = [json.loads(line)["event"] for line in server_log.read_text().splitlines()]
    assert events[:4] == ["site-registered"] * 3 + ["server-started"]
    assert events[4] == "run-started" and events[-1] == "run-finished"
    assert events.count("round-completed") == events.count("checkpoint-saved") == ROUNDS
    assert events.count("global-model-sent") == ROUNDS and head.entries == len(events)
    checkpoints = [json.loads(line) for line in server_log.read_text().splitlines()
                   if '"checkpoint-saved"' in line]
    assert [c["sha256"] for c in checkpoints] == [
        registry["checkpoints"][str(r)]["sha256"] for r in range(1, ROUNDS + 1)]
    for site in ("hospital-a", "hospital-b", "hospital-c"):
        site_log = demo.out / "sites" / site / "work" / "audit.jsonl"
        verify(site_log)
        assert json.loads(site_log.read_text().splitlines()[0])["event"] == "site-started"
        sent = [json.loads(line) for line in site_log.read_text().splitlines()
                if '"update-sent"' in line]
        assert [e["round"] for e in sent] == list(range(1, ROUNDS + 1))
        assert all(e["bytes"] > 0 and len(e["sha256"]) == 64 for e in sent)
    assert find_canaries([server_log]) == []
