"""From Flower messages to plain round inputs and back; light (no torch).

The computation itself (client.site_round) runs in the site worker when one is
listening (client.worker: imports paid once, data and model warm), otherwise in this
`flwr-clientapp` process.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client import secure_sum, worker
from client.errors import model_refusal, policy_refusal
from client.served import AlreadyServed, ServedLog
from client.site_policy import SitePolicy
from common import keys
from common.model_signing import ModelSignatureError, load_verify_key, verify_model

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


def _inputs(msg: Message, context: Context, purpose: str) -> tuple[list[np.ndarray], int]:
    """The verified global model and the round of a train or evaluate message."""
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


def _site(site_id: object) -> ConfigRecord:
    return ConfigRecord({keys.SITE_ID: str(site_id), keys.STATUS: keys.STATUS_OK})


def _carried_evaluation(msg: Message, context: Context, global_arrays: list[np.ndarray],
                        server_round: int) -> dict[str, Any] | None:
    """The previous round's model (the one this request trains from), evaluated first,
    when the request asks for it: one exchange carries round r's evaluation and round
    r+1's training."""
    asked = msg.content.config_records[keys.ROUND].get(keys.EVALUATE_ROUND)
    if asked is None:
        return None
    if isinstance(asked, bool) or not isinstance(asked, int) or asked != server_round - 1:
        raise ValueError(f"{keys.EVALUATE_ROUND} {asked!r} of a round-{server_round} request")
    _claim(context, asked, "evaluate")
    return _compute("evaluate", context, {"global_arrays": global_arrays,
                                          "server_round": asked})


def _secagg_required(context: Context) -> bool:
    return context.run_config.get("secagg-enabled", True) is not False


def handle_train(msg: Message, context: Context) -> Message:
    """Evaluate the model first if asked, train locally with DP-SGD, and reply with the
    update (masked under secure aggregation) and both sets of metrics."""
    global_arrays, server_round = _inputs(msg, context, "train")
    fields = msg.content.config_records.get(keys.MASKING)
    if fields is None and _secagg_required(context):
        LOG.warning("round %d: a plain training request in a secure-aggregation run",
                    server_round)
        raise policy_refusal(["secure-aggregation"])
    chosen = None if fields is None else secure_sum.plan(  # refused before any compute
        context.node_config, context.run_config, run_id=int(context.run_id),
        node_id=int(context.node_id), server_round=server_round, fields=fields)
    _claim(context, server_round, "train")
    evaluation = _carried_evaluation(msg, context, global_arrays, server_round)
    out = _compute("train", context, {"global_arrays": global_arrays,
                                      "server_round": server_round,
                                      "masked": chosen is not None})
    content = RecordDict({  # the same records the PHI guard passed in site_round
        keys.METRICS: MetricRecord(out["metrics"]),
        keys.SITE: _site(out["site_id"]),
    })
    if chosen is not None:
        content[keys.MASKED] = ArrayRecord([secure_sum.mask(context.node_config, chosen,
                                                            out["quantised"])])
    else:
        content[keys.UPDATE] = ArrayRecord([np.asarray(a) for a in out["update"]])
    if evaluation is not None:
        content[keys.EVALUATION] = MetricRecord(evaluation["metrics"])
    return Message(content, reply_to=msg)


def handle_evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the site's held-out patients."""
    global_arrays, server_round = _inputs(msg, context, "evaluate")
    _claim(context, server_round, "evaluate")
    out = _compute("evaluate", context, {"global_arrays": global_arrays,
                                         "server_round": server_round})
    content = RecordDict({keys.METRICS: MetricRecord(out["metrics"]),
                          keys.SITE: _site(out["site_id"])})
    return Message(content, reply_to=msg)


def handle_query(msg: Message, context: Context) -> Message:
    """Secure aggregation's two side exchanges: the run's key advert (once per run), and
    the one recovery of a round a site dropped out of (client.secure_sum)."""
    config = msg.content.config_records[keys.ROUND]
    stage = config.get(keys.STAGE)
    site = _site(context.node_config.get("site-id", ""))
    if stage == keys.STAGE_ADVERTISE:
        advert = secure_sum.advertise(context.node_config, int(context.run_id),
                                      int(context.node_id))
        return Message(RecordDict({keys.ADVERT: ConfigRecord(advert), keys.SITE: site}),
                       reply_to=msg)
    if stage == keys.STAGE_RECOVER:
        server_round = _server_round(config)
        masked = secure_sum.recover(context.node_config, context.run_config,
                                    run_id=int(context.run_id),
                                    node_id=int(context.node_id), server_round=server_round,
                                    fields=msg.content.config_records.get(keys.MASKING, {}))
        return Message(RecordDict({keys.MASKED: ArrayRecord([masked]), keys.SITE: site}),
                       reply_to=msg)
    raise ValueError(f"unknown query stage {stage!r}")
