"""What a site serves once: a replayed training request is refused (no second ε charge),
evaluations are capped per round, the validation split is the site's own, and the
un-noised training loss stays at the site unless its policy shares it."""

from __future__ import annotations

import json

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from client import site_round
from client.served import ServedLog, split_seed
from common import keys
from common.config import RunConfig
from common.model_signing import load_signing_key, sign_model
from common.models import build_model
from common.weights import pack, plain_state_dict, to_arrays
from tests.inprocess import real_site, signing_keys

pytestmark = pytest.mark.usefixtures("task_identity")
RUN = {"image-size": 32, "local-epochs": 1, "batch-size": 8, "num-rounds": 2,
       "secagg-enabled": False, "augment": False}


def _request(private, kind: str, server_round: int = 1) -> Message:
    arrays = pack(to_arrays(plain_state_dict(build_model(RunConfig.from_mapping(RUN)))))
    purpose = "train" if kind == MessageType.TRAIN else "evaluate"
    signature = sign_model(load_signing_key(private), arrays, 1, server_round, purpose)
    return Message(RecordDict({
        keys.WEIGHTS: ArrayRecord(arrays),
        keys.ROUND: ConfigRecord({keys.SERVER_ROUND: server_round,
                                  keys.MODEL_SIGNATURE: signature})}),
        dst_node_id=1, message_type=kind)


@pytest.fixture
def site(phantom_sites, tmp_path):
    private, public = signing_keys(tmp_path)
    policy = {"require-secure-aggregation": False}
    handle = real_site(1, "hospital-a", phantom_sites["hospital-a"], tmp_path / "work",
                       public, RUN, policy=policy)
    return handle, private, tmp_path / "work"


def test_a_replayed_training_request_is_refused_and_charges_no_second_epsilon(site) -> None:
    handle, private, work = site
    first = handle(_request(private, MessageType.TRAIN))
    assert not first.has_error()
    metrics = first.content.metric_records[keys.METRICS]
    assert keys.EPSILON_TOTAL in metrics
    assert keys.TRAIN_LOSS not in metrics  # un-noised: stays at the site by default
    replay = handle(_request(private, MessageType.TRAIN))
    assert replay.has_error() and replay.error.code == keys.ERROR_POLICY_REFUSED
    assert replay.error.reason.endswith("replayed-round")
    ledger = json.loads((work / site_round.LEDGER_FILE).read_text())
    assert len(ledger["sessions"]) == 1


def test_evaluations_are_capped_per_round(site) -> None:
    handle, private, _ = site
    assert not handle(_request(private, MessageType.EVALUATE)).has_error()
    again = handle(_request(private, MessageType.EVALUATE))
    assert again.error.code == keys.ERROR_POLICY_REFUSED
    assert again.error.reason.endswith("max-evaluations-per-round")
    assert not handle(_request(private, MessageType.EVALUATE, server_round=2)).has_error()


def test_the_server_does_not_choose_the_validation_patients(phantom_sites, tmp_path) -> None:
    """Another seed or val-fraction in the run config holds out the same patients; the
    split follows the site's own secret (another site's secret, another split)."""
    node = {"site-id": "hospital-a", "data-dir": str(phantom_sites["hospital-a"]),
            "work-dir": str(tmp_path / "work"), "epsilon-budget": 10.0}
    cohorts = []
    for run_id, run in enumerate(({**RUN, "seed": 1, "val-fraction": 0.25},
                                  {**RUN, "seed": 99, "val-fraction": 0.9}), start=50):
        setup = site_round._setup(run_id, node, run)
        cohorts.append(sorted(setup.algo.cohort))
    assert cohorts[0] == cohorts[1]
    assert split_seed(tmp_path / "work") != split_seed(tmp_path / "other")
    assert oct((tmp_path / "work" / "site.secret").stat().st_mode & 0o777) == "0o600"


def test_the_served_log_counts_per_run_round_and_purpose(tmp_path) -> None:
    log = ServedLog(tmp_path)
    assert log.claim(1, 1, "evaluate", 2) == 1
    assert log.claim(1, 1, "evaluate", 2) == 2
    assert log.claim(2, 1, "evaluate", 2) == 1  # another run
    with pytest.raises(RuntimeError, match="served 2 time"):
        log.claim(1, 1, "evaluate", 2)
    assert log.claim(1, 1, "train", 1) == 1
