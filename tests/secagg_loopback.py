"""A loopback Grid for SecAgg+ as fedrad runs it: every stage of Flower's workflow is
delivered to sites in this process (Flower's secaggplus_mod behind our site mod); only a
site's update is a fixed number. Used by tests/test_secagg_protocol.py and
bench/secagg_overhead.py."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.serverapp import Grid
from flwr.supercore.run import Run

import common.secagg as secagg

SEEN_BY_SERVER: dict[int, list[np.ndarray]] = {}  # each site's upload of its update


class LoopbackGrid(Grid):
    """Delivers each message to a site function in this process; a site that returns
    None has dropped out (no reply, as a dead link gives)."""

    def __init__(self, sites: dict[int, Callable[[Message], Message | None]]) -> None:
        self.sites = sites
        self._run = Run.create_empty(run_id=1)
        self.bytes_to: dict[int, int] = dict.fromkeys(sites, 0)  # serialised, per site
        self.bytes_from: dict[int, int] = dict.fromkeys(sites, 0)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, *args, **kwargs) -> Message:  # the workflow builds its own
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.sites)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for sent in messages:
            # A copy per site, as the wire gives: the workflow shares one content
            # object between messages and the site mod pops keys from it.
            message = copy.deepcopy(sent)
            message.metadata.__dict__["_message_id"] = message.object_id
            node = message.metadata.dst_node_id
            self.bytes_to[node] += wire_bytes(message)
            reply = self.sites[node](message)
            if reply is not None:
                self.bytes_from[node] += wire_bytes(reply)
                replies.append(reply)
        return replies


def site(node: int, update: list[np.ndarray], examples: int,
          drop_at: str | None) -> Callable[[Message], Message | None]:
    context = Context(run_id=1, node_id=node, node_config={}, state=RecordDict(),
                      run_config={})

    def train(msg: Message, ctx: Context) -> Message:
        return secagg.pack_legacy_reply(msg, update, examples, {"site-id": f"s{node}"})

    def handle(msg: Message) -> Message | None:
        stage = msg.content.config_records[RECORD_KEY_CONFIGS]["stage"]
        if stage == drop_at:
            return None
        reply = secagg.secagg_mod(msg, context, train)
        reply.metadata.__dict__["_src_node_id"] = node
        if stage == "collect_masked_vectors":
            SEEN_BY_SERVER[node] = [bytes_to_ndarray(b) for b in reply.content.config_records[
                RECORD_KEY_CONFIGS]["masked_params"]]
        return reply

    return handle


def wire_bytes(message: Message) -> int:
    """The size of a message's content as Flower serialises it."""
    from flwr.common.serde import recorddict_to_proto

    return len(recorddict_to_proto(message.content).SerializeToString())
