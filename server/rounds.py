"""The message exchanges of one round: training (masked or plain), which also carries the
previous round's evaluation, and the last round's evaluation."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from common import keys, masking
from common.config import RunConfig
from common.weights import numpy_views
from server.aggregation import REJECTED_MALFORMED, SiteUpdate, UpdatePool
from server.masked_sum import MaskedSum, Roster, masking_fields, recover
from server.polling_grid import PollingGrid

NO_REPLY = "no-reply"  # the status of a site whose reply never came
DROPPED_IN_RECOVERY = "dropped-in-recovery"  # answered the round, not its recovery

LOG = logging.getLogger("fedrad.server")
_KNOWN_ERRORS = {
    keys.ERROR_BUDGET_REFUSED: keys.STATUS_REFUSED_BUDGET,
    keys.ERROR_MODEL_REFUSED: "refused-model-signature",
    keys.ERROR_POLICY_REFUSED: keys.STATUS_REFUSED_POLICY,
    keys.ERROR_SITE_FAILED: "failed",
    keys.ERROR_REKEY: "refused-rekey",
}


@dataclass
class Replies:
    """Per-node numbers and status of one exchange."""

    metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    site_ids: dict[int, str] = field(default_factory=dict)
    statuses: dict[int, str] = field(default_factory=dict)
    update: list[np.ndarray] | None = None  # masked: the mean update, all the server sees
    exchanges: int = 0  # data-dependent message exchanges this took


def _status_of_error(code: int) -> str:
    """A fixed word for an error reply; the reason text itself is never stored."""
    return _KNOWN_ERRORS.get(code, f"error-{code}")


def _request(global_arrays: list[np.ndarray], server_round: int, signature: bytes,
             evaluate_previous: bool = False) -> RecordDict:
    round_config: dict[str, Any] = {keys.SERVER_ROUND: server_round,
                                            keys.MODEL_SIGNATURE: signature}
    if evaluate_previous:  # the model is round r's global: evaluated, then trained from
        round_config[keys.EVALUATE_ROUND] = server_round - 1
    return RecordDict({
        keys.WEIGHTS: ArrayRecord([np.asarray(a, dtype=np.float32) for a in global_arrays]),
        keys.ROUND: ConfigRecord(round_config),
    })


def _numbers(values: Any) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if keys.is_allowed_metric(k)}


def _collect(replies: list[Message], out: Replies, node_ids: list[int]) -> None:
    for reply in replies:
        node = reply.metadata.src_node_id
        if node not in node_ids:  # e.g. the SuperLink's own error for an offline node
            continue
        if reply.has_error():
            out.statuses[node] = _status_of_error(reply.error.code)
            continue
        try:
            metrics = _numbers(reply.content.metric_records[keys.METRICS])
            site_id = str(reply.content.config_records[keys.SITE][keys.SITE_ID])
        except (KeyError, TypeError, ValueError):  # not what a fedrad site sends
            out.statuses[node] = REJECTED_MALFORMED
            continue
        out.metrics[node], out.site_ids[node] = metrics, site_id
        out.statuses[node] = keys.STATUS_OK


def _release(record: ArrayRecord | None) -> None:
    """Drop the reply's own references to its update's bytes.

    A pulled Flower Message sits in a reference cycle (its RecordDict and the typed views
    of it refer to each other), so it is freed only by a full garbage collection, which
    a process holding torch's and Flower's objects runs rarely: until then every folded
    reply kept its update alive, about a dozen models' worth at 30-100 sites. Emptying
    the ArrayRecord lets reference counting free the bytes at once; numpy views the pool
    keeps (a rule that needs every update) still hold theirs.
    """
    if record is not None:
        record.clear()


def _release_answered(request: RecordDict, out: Replies) -> None:
    """Free the round's request (a model's worth) once every site has answered it; its
    Messages are reference cycles too. With a site unanswered a copy may still be on its
    way in Flower's in-process simulation, so the request is left to the collector."""
    if NO_REPLY not in out.statuses.values():
        _release(request.array_records[keys.WEIGHTS])


def _carried(reply: Message, out: Replies) -> None:
    """The previous round's evaluation a training reply carries, if any."""
    node = reply.metadata.src_node_id
    if reply.has_error() or keys.EVALUATION not in reply.content.metric_records:
        return
    try:
        out.metrics[node] = _numbers(reply.content.metric_records[keys.EVALUATION])
        out.site_ids[node] = str(reply.content.config_records[keys.SITE][keys.SITE_ID])
    except (KeyError, TypeError, ValueError):
        return
    out.statuses[node] = keys.STATUS_OK


def train_round(grid: PollingGrid, context: Context, config: RunConfig, *, server_round: int,
                global_arrays: list[np.ndarray], node_ids: list[int], signature: bytes,
                pool: UpdatePool, roster: Roster | None, evaluate_previous: bool = False
                ) -> tuple[Replies, Replies]:
    """Ask every node to train (first evaluating the model it is sent, when
    `evaluate_previous`). Masked (`roster`): the sum of the masked replies, with one
    recovery among the survivors if some site did not answer; otherwise each update goes
    to `pool` as it arrives (screened; a rejection becomes the site's status). Returns the
    training replies and the carried evaluation replies."""
    out, carried = Replies(), Replies()
    request = _request(global_arrays, server_round, signature, evaluate_previous)
    participants = list(node_ids)
    total = None
    if roster is not None:
        out.exchanges += any(n not in roster.adverts for n in node_ids)  # key adverts
        out.statuses.update(roster.refresh(grid, node_ids, config.round_timeout))
        participants = [n for n in node_ids if n in roster.adverts]
        masking.check_set_size(len(participants), config.secagg.quantization_range,
                               config.secagg.max_weight)
        request[keys.MASKING] = masking_fields(roster, participants, 0)
        total = MaskedSum(sum(int(a.size) for a in global_arrays) + 1)
    messages = [Message(request, dst_node_id=node, message_type=MessageType.TRAIN,
                        group_id=str(server_round)) for node in participants]
    out.exchanges += 1
    for reply in grid.stream(messages, timeout=config.round_timeout,
                             window=config.faults.max_in_flight):
        _collect([reply], out, participants)
        node = reply.metadata.src_node_id
        if node in participants:
            _carried(reply, carried)
        if out.statuses.get(node) != keys.STATUS_OK:
            if roster is not None and out.statuses.get(node) == "refused-rekey":
                roster.forget(node)  # it advertises again next round
            continue
        if total is not None:
            if not total.add(node, reply.content.array_records.get(keys.MASKED)):
                out.statuses[node] = REJECTED_MALFORMED
            _release(reply.content.array_records.get(keys.MASKED))
            continue
        record = reply.content.array_records.get(keys.UPDATE)
        del reply
        try:  # views into the reply's own bytes: folding it copies nothing
            arrays = ([_float_view(a) for a in numpy_views(record)]
                      if record is not None else [])
        except (ValueError, TypeError):  # not float .npy arrays: not what a site sends
            out.statuses[node] = REJECTED_MALFORMED
            continue
        finally:
            _release(record)
        rejected = pool.add(SiteUpdate(node, arrays, out.metrics[node].get(
            keys.NUM_EXAMPLES, 0.0)))
        del arrays  # the pool keeps what it needs (a running sum, or the views)
        if rejected is not None:
            out.statuses[node] = rejected
    for node in participants:
        out.statuses.setdefault(node, NO_REPLY)
        if evaluate_previous:
            carried.statuses.setdefault(node, NO_REPLY)
    _release_answered(request, out)
    if total is not None:
        _masked_aggregate(grid, config, server_round, total, participants, out)
    return out, carried


def _masked_aggregate(grid: PollingGrid, config: RunConfig, server_round: int,
                      total: MaskedSum, participants: list[int], out: Replies) -> None:
    """The mean update once the masks cancel: at once when every site answered, after
    one recovery among the survivors when some did not, never below secagg-min-sites."""
    survivors = sorted(total.nodes)
    if survivors == sorted(participants):
        out.update = total.mean(config.secagg)
        return
    if len(survivors) < config.secagg.min_sites:
        LOG.warning("round %d: %d site(s) answered, fewer than secagg-min-sites=%d: no "
                    "aggregate", server_round, len(survivors), config.secagg.min_sites)
        return

    def on_error(node: int, reply: Message) -> None:
        out.statuses[node] = _status_of_error(reply.error.code)

    out.exchanges += 1
    again = recover(grid, survivors=survivors, server_round=server_round,
                    length=int(total.total.size), timeout=config.round_timeout,
                    on_error=on_error)
    for node in set(survivors) - set(again.nodes):
        if out.statuses.get(node) == keys.STATUS_OK:
            out.statuses[node] = DROPPED_IN_RECOVERY
    if sorted(again.nodes) == survivors:
        out.update = again.mean(config.secagg)


_UPDATE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


def _float_view(array: np.ndarray) -> np.ndarray:
    """An update array as float32 (float16 travels too); any other dtype (integers,
    structured or object arrays) is refused as malformed."""
    if array.dtype not in _UPDATE_DTYPES:
        raise TypeError(f"update array of dtype {array.dtype}")
    return np.asarray(array, dtype=np.float32)


def _evaluation(server_round: int, global_arrays: list[np.ndarray], node_ids: list[int],
                signature: bytes) -> tuple[list[Message], Callable[[list[Message]], Replies]]:
    """The evaluation requests, and how their replies become a Replies."""
    request = _request(global_arrays, server_round, signature)  # one copy for all sites
    messages = [Message(request, dst_node_id=node, message_type=MessageType.EVALUATE,
                        group_id=str(server_round)) for node in node_ids]

    def collect(replies: list[Message]) -> Replies:
        out = Replies()
        _collect(replies, out, node_ids)
        for node in node_ids:
            out.statuses.setdefault(node, NO_REPLY)
        _release_answered(request, out)
        return out

    return messages, collect


def evaluate_round(grid: PollingGrid, config: RunConfig, *, server_round: int,
                   global_arrays: list[np.ndarray], node_ids: list[int],
                   signature: bytes) -> Replies:
    """Evaluate the global model at every node on its held-out patients."""
    messages, collect = _evaluation(server_round, global_arrays, node_ids, signature)
    return collect(list(grid.stream(messages, timeout=config.round_timeout,
                                    window=config.faults.max_in_flight)))
