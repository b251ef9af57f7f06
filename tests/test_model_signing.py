"""Signed global models: the server signs, the site verifies before loading and refuses
anything else with a fixed reason."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.errors import SiteRefusal
from client.messages import handle_evaluate
from common import keys, pki
from common.model_signing import (
    ModelSignatureError,
    load_signing_key,
    load_verify_key,
    sign_model,
    verify_model,
)


@pytest.fixture
def consortium_keys(tmp_path):
    private, public = pki.create_signing_key(tmp_path)
    return load_signing_key(private), public


def _arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=5).astype(np.float32)]


def test_only_the_signed_model_for_this_run_round_and_purpose_verifies(consortium_keys,
                                                                       tmp_path) -> None:
    signer, public = consortium_keys
    verifier = load_verify_key(public)
    arrays = _arrays()
    signature = sign_model(signer, arrays, 9, 2, "train")
    verify_model(verifier, arrays, 9, 2, "train", signature)
    altered = [a.copy() for a in arrays]
    altered[1][0] += 1e-3
    cases = [
        (altered, 9, 2, "train", signature),  # weights changed
        (arrays[::-1], 9, 2, "train", signature),  # reordered
        ([arrays[0].reshape(3, 4), arrays[1]], 9, 2, "train", signature),  # reshaped
        ([a.astype(np.float64) for a in arrays], 9, 2, "train", signature),  # retyped
        (arrays, 10, 2, "train", signature),  # replayed into another run
        (arrays, 9, 3, "train", signature),  # ... or another round
        (arrays, 9, 2, "evaluate", signature),  # ... or for another purpose
        (arrays, 9, 2, "train", None),  # unsigned
    ]
    for case in cases:
        with pytest.raises(ModelSignatureError):
            verify_model(verifier, *case)
    (tmp_path / "other").mkdir()
    other_private, _ = pki.create_signing_key(tmp_path / "other")
    foreign = sign_model(load_signing_key(other_private), arrays, 9, 2, "train")
    with pytest.raises(ModelSignatureError, match="does not verify"):
        verify_model(verifier, arrays, 9, 2, "train", foreign)


def _evaluate_message(arrays, signature) -> Message:
    config = {keys.SERVER_ROUND: 1}
    if signature is not None:
        config[keys.MODEL_SIGNATURE] = signature
    return Message(RecordDict({keys.WEIGHTS: ArrayRecord(arrays),
                               keys.ROUND: ConfigRecord(config)}),
                   dst_node_id=1, message_type="evaluate")


@pytest.mark.parametrize("node_config_key, signed", [(True, False), (False, True)])
def test_a_site_refuses_unsigned_models_or_without_its_key(consortium_keys, tmp_path,
                                                           node_config_key, signed,
                                                           task_identity) -> None:
    signer, public = consortium_keys
    arrays = _arrays()
    signature = sign_model(signer, arrays, 3, 1, "evaluate") if signed else None
    node_config = {"work-dir": str(tmp_path / "work")}
    if node_config_key:
        node_config["model-verify-key"] = str(public)
    context = Context(run_id=3, node_id=1, node_config=node_config, state=RecordDict(),
                      run_config={})
    with pytest.raises(SiteRefusal) as refusal:
        handle_evaluate(_evaluate_message(arrays, signature), context)
    assert refusal.value.code == keys.ERROR_MODEL_REFUSED
    assert refusal.value.reason == keys.REASON_MODEL_REFUSED
