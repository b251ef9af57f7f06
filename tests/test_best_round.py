"""Best-round selection and early stopping with the real ServerApp and real ClientApps in
one process (tests/inprocess.py). The sites train for real; what they report of their
validation Dice is scripted (a fake of what the outside world sends), so the run's best
round is known in advance and is not the last."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import Message, MetricRecord

from common import keys
from fedrad.evaluation import load_model
from fedrad.model_registry import ModelRegistryError, describe, export, resolve
from server.registry import RunFolder
from server.report import write_report
from tests.inprocess import (
    BASELINE_POLICY,
    InProcessGrid,
    Site,
    real_site,
    run_server,
    signing_keys,
)

pytestmark = pytest.mark.usefixtures("task_identity")
CONFIG = {"task": "lung-seg", "image-size": 32, "num-rounds": 5, "min-sites": 3,
          "local-epochs": 1, "batch-size": 4, "dp-enabled": False, "secagg-enabled": False,
          "round-timeout": 60.0, "val-fraction": 0.3}
DICE = {1: 0.40, 2: 0.80, 3: 0.55, 4: 0.60, 5: 0.70}  # round → reported Dice: best is 2


def scripted(site: Site) -> Site:
    """A site whose reported validation Dice for round r is DICE[r]."""
    def handle(message: Message) -> Message | None:
        config = message.content.config_records[keys.ROUND]
        reply = site(message)
        if reply is None or reply.has_error():
            return reply
        if keys.EVALUATION in reply.content.metric_records:  # carried: the previous round
            record, evaluated = keys.EVALUATION, int(config[keys.EVALUATE_ROUND])
        elif message.metadata.message_type == "evaluate":
            record, evaluated = keys.METRICS, int(config[keys.SERVER_ROUND])
        else:
            return reply
        metrics = dict(reply.content.metric_records[record])
        metrics[keys.EVAL_DICE] = DICE[evaluated]
        reply.content.metric_records[record] = MetricRecord(metrics)
        return reply
    return handle


def _run(tmp_path, phantom_sites, monkeypatch, settings: dict):
    private, public = signing_keys(tmp_path)
    config = {**CONFIG, **settings}
    sites = {node: scripted(real_site(node, name, phantom_sites[name], tmp_path / name,
                                      public, config, policy=BASELINE_POLICY))
             for node, name in enumerate(sorted(phantom_sites), start=1)}
    home = tmp_path / "server"
    run_dir = run_server(InProcessGrid(sites), config, home, private, monkeypatch)
    return home, RunFolder(run_dir), private


def test_the_best_round_not_the_last_is_what_run_best_exports(
        tmp_path, phantom_sites, monkeypatch) -> None:
    home, run, private = _run(tmp_path, phantom_sites, monkeypatch, {})
    rows = run.rounds()
    assert [r["pooled_score"] for r in rows] == pytest.approx(list(DICE.values()))
    registry = run.read_json("registry.json")
    assert registry["best"] == {"round": 2, "metric": keys.EVAL_DICE,
                                "score": pytest.approx(0.8)}
    assert resolve(home, "1:best")[1].server_round == 2
    assert resolve(home, "1")[1].server_round == 5
    from common.model_signing import load_signing_key

    out = export(home, "1:best", tmp_path / "export", load_signing_key(private))
    description = json.loads((out / "model.json").read_text())
    assert description["round"] == 2 and description["best_round"] == 2
    assert description["checkpoint_sha256"] == registry["checkpoints"]["2"]["sha256"]
    exported = torch.load(out / "model.pt", weights_only=True)
    for name, tensor in run.load_checkpoint(2).items():
        assert torch.equal(exported[name], tensor)
    last = run.load_checkpoint(5)
    assert any(not torch.equal(exported[n], last[n]) for n in last)  # not the last model
    assert describe(run, resolve(home, "1:5")[1])["best_round"] == 2
    assert not run.read_json("registry.json").get("stopped_early")


def test_evaluate_and_the_report_state_the_ratio_to_a_recorded_pooled_baseline(
        tmp_path, phantom_sites, monkeypatch) -> None:
    home, run, _ = _run(tmp_path, phantom_sites, monkeypatch, {"num-rounds": 3})
    assert load_model("1:best", server_home=home, verify_key=None).baseline_ratio() is None
    assert "of the pooled baseline" not in write_report(run).read_text()
    run.record_pooled_baseline(keys.EVAL_DICE, 0.9, "bench/pooled_baseline.py")
    ratio = load_model("1:best", server_home=home, verify_key=None).baseline_ratio()
    assert ratio is not None and ratio["ratio"] == pytest.approx(0.8 / 0.9)
    last = load_model("1:3", server_home=home, verify_key=None).baseline_ratio()
    assert last is not None and last["ratio"] == pytest.approx(0.55 / 0.9)
    text = write_report(run).read_text()
    assert "1:best</b> = round 2" in text and "0.889 of the pooled baseline" in text


def test_early_stopping_ends_the_run_once_patience_rounds_bring_nothing_better(
        tmp_path, phantom_sites, monkeypatch) -> None:
    _, run, _ = _run(tmp_path, phantom_sites, monkeypatch,
                     {"num-rounds": 5, "early-stop-patience": 1})
    rows = run.rounds()
    # round 3 (0.55) is no better than round 2: recorded while round 4 trains, so the
    # run evaluates round 4 and stops there, one round before num-rounds
    assert [r["server_round"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["pooled_score"] == pytest.approx(DICE[4])
    registry = run.read_json("registry.json")
    assert registry["status"] == "completed"
    assert registry["stopped_early"] == {"after_round": 3, "best_round": 2, "patience": 1}
    assert sorted(int(r) for r in registry["checkpoints"]) == [1, 2, 3, 4]
    assert registry["best"]["round"] == 2


def test_a_run_with_no_evaluated_round_has_no_best_and_says_so(tmp_path) -> None:
    home = tmp_path / "server"
    run = RunFolder.create(home, 7, {"task": "lung-seg"})
    run.save_checkpoint(1, torch.nn.Linear(2, 1).state_dict())
    assert run.tag_best(1, keys.EVAL_DICE, float("nan")) == 0
    with pytest.raises(ModelRegistryError, match="no evaluated round yet"):
        resolve(home, "7:best")
    assert resolve(home, "7")[1].server_round == 1
