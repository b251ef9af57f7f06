"""The hospital's own policy (node config) decides what the site accepts, whatever the
run config asks: refused before anything runs, with a fixed reason, audited. (Masking
parameters that would weaken secure aggregation: tests/test_masking.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client.app import app
from client.errors import SiteRefusal
from client.site_policy import SitePolicy, check_run
from common import keys
from common.config import ConfigError

pytestmark = pytest.mark.usefixtures("task_identity")


def _context(tmp_path, run_config: dict, **policy) -> Context:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    return Context(run_id=5, node_id=1, node_config={
        "site-id": "hospital-a", "data-dir": str(data), "work-dir": str(tmp_path / "work"),
        "epsilon-budget": 10.0, **policy}, state=RecordDict(), run_config=run_config)


def _train_request() -> Message:
    content = RecordDict({keys.WEIGHTS: ArrayRecord([np.zeros(4, np.float32)]),
                          keys.ROUND: ConfigRecord({keys.SERVER_ROUND: 1})})
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def _audit(tmp_path) -> list[dict]:
    path = tmp_path / "work" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_run_config_that_turns_dp_off_is_refused_and_nothing_is_sent(tmp_path) -> None:
    context = _context(tmp_path, {"dp-enabled": False, "secagg-enabled": False})
    reply = app(_train_request(), context)
    assert reply.has_error()
    assert reply.error.code == keys.ERROR_POLICY_REFUSED
    assert reply.error.reason == (f"{keys.REASON_POLICY_REFUSED}: require-dp, "
                                  "require-secure-aggregation")
    assert not reply.has_content()  # no update, no metrics
    entries = _audit(tmp_path)
    assert [e["event"] for e in entries] == ["run-refused-by-policy"]
    assert entries[0]["policy"] == ["require-dp", "require-secure-aggregation"]
    work = tmp_path / "work"
    assert sorted(p.name for p in work.iterdir()) == ["audit.jsonl"]  # no cache, no ledger


def test_a_site_that_allows_a_no_dp_baseline_is_not_refused_by_its_policy(tmp_path) -> None:
    context = _context(tmp_path, {"dp-enabled": False, "secagg-enabled": False},
                       **{"require-dp": False, "require-secure-aggregation": False})
    reply = app(_train_request(), context)
    # past the policy: refused later for the unsigned model, not by policy
    assert reply.error.code == keys.ERROR_MODEL_REFUSED
    assert not any(e["event"] == "run-refused-by-policy" for e in _audit(tmp_path))


@pytest.mark.parametrize(
    ("run_config", "policy", "broken"),
    [
        ({"dp-target-epsilon": 50.0}, {}, ["max-epsilon-per-run"]),
        ({"dp-target-epsilon": 8.0}, {"max-epsilon-per-run": 4.0}, ["max-epsilon-per-run"]),
        ({"dp-delta": 0.5}, {}, ["max-delta"]),
        ({"dp-delta": 1e-6}, {}, []),
        ({"cross-site-validation": True, "secagg-enabled": False},
         {"require-secure-aggregation": False}, ["allow-cross-site"]),
        ({"image-size": 1024}, {}, ["max-image-size"]),
        ({"secagg-min-sites": 2}, {}, ["min-secure-aggregation-sites"]),
        ({"val-fraction": 2.0}, {}, ["run-config"]),  # unparsable: refused, never guessed
        ({}, {}, []),
    ],
)
def test_policy_keys_a_run_breaks(run_config, policy, broken) -> None:
    assert check_run(SitePolicy.from_mapping(policy), run_config) == broken


def test_a_bad_policy_value_names_its_key_and_refuses_everything(tmp_path) -> None:
    with pytest.raises(ConfigError, match="node-config require-dp must be true or false"):
        SitePolicy.from_mapping({"require-dp": "no"})
    with pytest.raises(ConfigError, match="max-delta must be < 1"):
        SitePolicy.from_mapping({"max-delta": 1.0})
    reply = app(_train_request(), _context(tmp_path, {}, **{"max-epsilon-per-run": -1}))
    assert reply.error.code == keys.ERROR_POLICY_REFUSED
    assert reply.error.reason.endswith(": node-config")


def test_the_server_cannot_override_the_policy_through_the_run_config(tmp_path) -> None:
    """Policy keys in a run config are unknown run keys: refused, never applied."""
    run_config = {"dp-enabled": False, "require-dp": False}
    assert check_run(SitePolicy(), run_config) == ["run-config"]


def test_a_server_that_under_declares_its_rounds_cannot_pass_the_per_run_cap(
        phantom_sites, tmp_path) -> None:
    """num-rounds=1 plans σ for one round; every further round spends more. The site's
    max-epsilon-per-run is checked on the ledger's projection, so the round that would
    pass it is refused before training, and the ledger stays at or under the cap."""
    from client import site_round
    from common.config import RunConfig
    from common.models import build_model
    from common.weights import pack, plain_state_dict, to_arrays

    run_config = {"image-size": 32, "num-rounds": 1, "local-epochs": 1, "batch-size": 8,
                  "dp-target-epsilon": 3.0, "augment": False}
    node_config = {"site-id": "hospital-a", "data-dir": str(phantom_sites["hospital-a"]),
                   "work-dir": str(tmp_path / "work"), "epsilon-budget": 100.0,
                   "threads": 1, "max-epsilon-per-run": 4.0}
    arrays = pack(to_arrays(plain_state_dict(build_model(RunConfig.from_mapping(run_config)))))
    spent = []
    with pytest.raises(SiteRefusal) as refusal:
        for server_round in range(1, 6):
            out = site_round.train_outcome(run_id=3, node_config=node_config,
                                           run_config=run_config, global_arrays=arrays,
                                           server_round=server_round, masked=False)
            spent.append(out["metrics"][keys.EPSILON_ROUND])
    assert refusal.value.code == keys.ERROR_POLICY_REFUSED
    assert refusal.value.reason.endswith("max-epsilon-per-run")
    assert len(spent) == 1 and spent[0] == pytest.approx(3.0, abs=0.05)
    assert _audit(tmp_path)[-1]["reason"] == "max-epsilon-per-run"
