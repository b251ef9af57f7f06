"""From Flower messages to plain round inputs and back; light (no torch).

The computation itself (client.site_round) runs in the site worker when one is
listening (client.worker: imports paid once, data and model warm), otherwise in this
`flwr-clientapp` process.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client import worker
from client.errors import model_refusal, policy_refusal
from client.served import AlreadyServed, ServedLog
from client.site_policy import SitePolicy
from common import keys
from common.model_signing import ModelSignatureError, load_verify_key, verify_model
from common.secagg import is_legacy_train, pack_legacy_reply, unpack_legacy_train

LOG = logging.getLogger("fedrad.client")
MAX_CROSS_SITE_MODELS = 32  # evaluations a cross-site round may add (allow-cross-site)
VERIFY_KEY = "model-verify-key"  # node config: the consortium's signing.pub from the kit


def _server_round(config_values: Any) -> int:
    value = config_values[keys.SERVER_ROUND]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{keys.SERVER_ROUND} must be a positive integer")
    return value


def _compute(kind: str, context: Context, request: dict[str, Any]) -> dict[str, Any]:
    request = {**request, "run_id": int(context.run_id),
               "node_config": dict(context.node_config),
               "run_config": dict(context.run_config)}
    work_dir = Path(str(context.node_config.get("work-dir", ""))).expanduser()
    try:
        return worker.call(work_dir, kind, request)  # type: ignore[no-any-return]
    except worker.WorkerUnavailable:
        from client import site_round

        compute = site_round.train_outcome if kind == "train" else site_round.evaluate_outcome
        return compute(**request)


def _verified(context: Context, arrays: list[np.ndarray], server_round: int, purpose: str,
              signature: object) -> list[np.ndarray]:
    """The global model, once its consortium signature verifies; refused otherwise."""
    path = context.node_config.get(VERIFY_KEY)
    try:
        if not path:
            raise ModelSignatureError(f"node config has no {VERIFY_KEY}")
        verify_model(load_verify_key(Path(str(path)).expanduser()), arrays,
                     int(context.run_id), server_round, purpose, signature)
    except ModelSignatureError as exc:
        LOG.warning("round %d: global model refused: %s", server_round, exc)
        raise model_refusal() from exc
    return arrays


def _inputs(msg: Message, context: Context, purpose: str, legacy: bool
            ) -> tuple[list[np.ndarray], int]:
    """The verified global model and the round of a train or evaluate message."""
    round_config: Mapping[str, Any]
    if legacy:
        global_arrays, round_config = unpack_legacy_train(msg)
    else:
        global_arrays = msg.content.array_records[keys.WEIGHTS].to_numpy_ndarrays()
        round_config = msg.content.config_records[keys.ROUND]
    server_round = _server_round(round_config)
    return _verified(context, global_arrays, server_round, purpose,
                     round_config.get(keys.MODEL_SIGNATURE)), server_round


def _claim(context: Context, server_round: int, purpose: str) -> None:
    """Refuse a replayed training request and evaluations past the site's per-round cap,
    before any compute (client.served)."""
    policy = SitePolicy.from_mapping(context.node_config)
    limit = 1 if purpose == "train" else policy.max_evaluations_per_round
    if purpose != "train" and policy.allow_cross_site \
            and context.run_config.get("cross-site-validation") is True:
        limit += MAX_CROSS_SITE_MODELS  # the last round's local models, one per site
    work_dir = Path(str(context.node_config.get("work-dir", ""))).expanduser()
    try:
        ServedLog(work_dir).claim(int(context.run_id), server_round, purpose, limit)
    except AlreadyServed as exc:
        LOG.warning("round %d: refused: %s", server_round, exc)
        raise policy_refusal(["replayed-round" if purpose == "train"
                              else "max-evaluations-per-round"]) from exc


def handle_train(msg: Message, context: Context) -> Message:
    """Train locally with DP-SGD and reply with (local - global) and metrics."""
    legacy = is_legacy_train(msg)
    global_arrays, server_round = _inputs(msg, context, "train", legacy)
    _claim(context, server_round, "train")
    out = _compute("train", context, {"global_arrays": global_arrays,
                                      "server_round": server_round, "legacy": legacy})
    if legacy:
        return pack_legacy_reply(msg, out["update"], out["weight"],
                                 {**out["metrics"], keys.SITE_ID: out["site_id"]})
    content = RecordDict({  # the same records the PHI guard passed in site_round
        keys.UPDATE: ArrayRecord([np.asarray(a) for a in out["update"]]),  # run's dtype
        keys.METRICS: MetricRecord(out["metrics"]),
        keys.SITE: ConfigRecord({keys.SITE_ID: out["site_id"], keys.STATUS: keys.STATUS_OK}),
    })
    return Message(content, reply_to=msg)


def handle_evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the site's held-out patients."""
    global_arrays, server_round = _inputs(msg, context, "evaluate", legacy=False)
    _claim(context, server_round, "evaluate")
    out = _compute("evaluate", context, {"global_arrays": global_arrays,
                                         "server_round": server_round})
    content = RecordDict({
        keys.METRICS: MetricRecord(out["metrics"]),
        keys.SITE: ConfigRecord({keys.SITE_ID: out["site_id"], keys.STATUS: keys.STATUS_OK}),
    })
    return Message(content, reply_to=msg)
