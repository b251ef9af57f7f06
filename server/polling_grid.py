"""A Grid whose `send_and_receive` polls for replies every 0.2 s instead of every 3 s.

Flower 1.42's HTTP grid sleeps a fixed 3 s between pulls in `send_and_receive`; every
exchange would pay it. This wrapper implements the same contract on the Grid's public
`push_messages` / `pull_messages` and delegates everything else.

It also remembers the error code of every error reply it pulls, per node, so a site's
refusal is recorded with its reason.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

POLL_SECONDS = 0.2
PULL_CHUNK = 4  # replies pulled per request: bounds how many are held at once


class PollingGrid(Grid):  # type: ignore[misc]
    """Delegates to `grid`; only the reply polling interval differs."""

    def __init__(self, grid: Grid, interval: float = POLL_SECONDS) -> None:
        if not interval > 0:
            raise ValueError(f"poll interval must be > 0, got {interval}")
        self._grid = grid
        self._interval = interval
        self._error_codes: dict[int, int] = {}

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
            time.sleep(self._interval)
