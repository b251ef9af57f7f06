"""A Grid whose `send_and_receive` polls for replies every 0.2 s instead of every 3 s.

Flower 1.42's HTTP grid sleeps a fixed 3 s between pulls in `send_and_receive`; each
SecAgg+ stage and each evaluation pays it. This wrapper implements the same contract on
the Grid's public `push_messages` / `pull_messages` and delegates everything else, so the
ServerApp and Flower's own SecAgg+ workflow use it unchanged. (The SuperNode's idle poll
is fixed inside Flower and is not ours to change.)

It also remembers the error code of every error reply it pulls, per node: Flower's
SecAgg+ workflow drops a node whose reply is an error without saying why, and a site
that refuses to train for its privacy budget must be recorded as such.

And it can push messages aside (`push_aside`): they go out at once, and their replies are
collected while the server waits on the next exchange. A round's evaluation is sent this
way, so each site finds the next round's first message queued right after evaluating.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

POLL_SECONDS = 0.2
PULL_CHUNK = 4  # replies pulled per request: bounds how many are held at once


@dataclass
class _Aside:
    """Messages pushed aside: their replies are pulled while the server waits on others."""

    pending: list[str]
    deadline: float
    on_done: Callable[[list[Message]], None]
    replies: list[Message]


class PollingGrid(Grid):  # type: ignore[misc]
    """Delegates to `grid`; the reply polling interval differs, and messages can be
    pushed aside to be collected during later waits (`push_aside`)."""

    def __init__(self, grid: Grid, interval: float = POLL_SECONDS) -> None:
        if not interval > 0:
            raise ValueError(f"poll interval must be > 0, got {interval}")
        self._grid = grid
        self._interval = interval
        self._error_codes: dict[int, int] = {}
        self._aside: list[_Aside] = []

    def take_error_codes(self) -> dict[int, int]:
        """Node id -> error code of the error replies pulled since the last call."""
        codes, self._error_codes = self._error_codes, {}
        return codes

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        for reply in replies:
            if reply.has_error():
                self._error_codes[reply.metadata.src_node_id] = int(reply.error.code)
        return replies

    def push_aside(self, messages: Iterable[Message], *, timeout: float,
                   on_done: Callable[[list[Message]], None]) -> None:
        """Push `messages` now and return at once. Their replies are pulled during the
        waits that follow (`stream`, `send_and_receive`, `settle`); `on_done(replies)`
        runs, in that wait, once every reply is in or `timeout` has passed.

        A site takes its messages in order, so one pushed aside just before the next
        exchange's keeps the site from idling between the two (Flower's SuperNode sleeps
        3 s whenever it finds nothing to do).
        """
        pending = list(self.push_messages(messages))
        self._aside.append(_Aside(pending, time.monotonic() + timeout, on_done, []))
        self._poll_aside()

    def settle(self, *, wait: bool = True) -> None:
        """Wait until every set pushed aside is done and its `on_done` has run; with
        `wait=False` (a run that is failing) pull once and end each set with the
        replies it has."""
        while self._aside:
            self._poll_aside(now=not wait)
            if self._aside:
                time.sleep(self._interval)

    def _poll_aside(self, *, now: bool = False) -> None:
        while self._aside:  # in push order: an earlier set finishes first
            aside = self._aside[0]
            if aside.pending:
                for reply in self._grid.pull_messages(list(aside.pending)):
                    aside.pending.remove(reply.metadata.reply_to_message_id)
                    aside.replies.append(reply)
            if aside.pending and time.monotonic() < aside.deadline and not now:
                return
            self._aside.pop(0)
            aside.on_done(aside.replies)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Push, then pull every `interval` until all replies are in or `timeout` passes."""
        return list(self.stream(messages, timeout=timeout))

    def stream(self, messages: Iterable[Message], *, timeout: float | None = None,
               chunk: int = PULL_CHUNK, window: int = 0) -> Iterator[Message]:
        """As send_and_receive, but yields each reply as it is pulled, pulling at most
        `chunk` at a time: a caller that folds and drops replies holds `chunk` of them.

        With `window` > 0 at most that many messages are out at once and the next is
        pushed as a reply comes in, so the messages waiting in the SuperLink (and, in
        Flower's simulation engine, in this process) stay at `window` however many sites
        there are. A message not yet pushed at `timeout` is never sent.
        """
        queue = list(messages)
        window = window or len(queue)
        pending = list(self.push_messages(queue[:window]))
        queue = queue[window:]
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            asked = list(pending)
            for start in range(0, len(asked), chunk):
                for reply in self.pull_messages(asked[start:start + chunk]):
                    pending.remove(reply.metadata.reply_to_message_id)
                    if queue and (deadline is None or time.monotonic() < deadline):
                        pending += self.push_messages(queue[:1])
                        del queue[:1]
                    yield reply
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            self._poll_aside()
            time.sleep(self._interval)
