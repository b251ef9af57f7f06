"""The site's SecAgg+ mod: masked stages go to Flower's secaggplus_mod; a plain training
request is accepted only when the run itself turned SecAgg+ off."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from common.secagg import SecAggRequiredError, secagg_mod


def _message(content: RecordDict, kind: str = MessageType.TRAIN) -> Message:
    return Message(content, dst_node_id=1, message_type=kind)


def _context(run_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(),
                   run_config=run_config)


def _answer(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"answered": ConfigRecord({"yes": 1})}), reply_to=msg)


@pytest.mark.parametrize("run_config", [{}, {"secagg-enabled": True}])
def test_a_plain_training_request_is_refused_in_a_secagg_run(run_config, task_identity) -> None:
    with pytest.raises(SecAggRequiredError):
        secagg_mod(_message(RecordDict()), _context(run_config), _answer)


def test_plain_requests_pass_when_the_run_turned_secagg_off(task_identity) -> None:
    reply = secagg_mod(_message(RecordDict()), _context({"secagg-enabled": False}), _answer)
    assert reply.content.config_records["answered"]["yes"] == 1
    evaluate = secagg_mod(_message(RecordDict(), MessageType.EVALUATE), _context({}), _answer)
    assert "answered" in evaluate.content.config_records


def test_masked_stages_go_to_flowers_protocol(task_identity) -> None:
    """A stage out of order is rejected by Flower's own check, so the stage reached it."""
    stage = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({"stage": "unmask"})})
    with pytest.raises(ValueError, match="[Ss]tage"):
        secagg_mod(_message(stage), _context({}), _answer)
