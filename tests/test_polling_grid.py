"""PollingGrid keeps Grid's send_and_receive contract with a short poll."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from server.polling_grid import PollingGrid


class FakeGrid:
    """Replies become available `delay` seconds after the push (what a SuperLink does)."""

    def __init__(self, delay: float, never: set[str] | None = None,
                 errors: dict[str, int] | None = None) -> None:
        self.delay, self.never, self.pulls = delay, never or set(), 0
        self.errors = errors or {}  # message id -> error code of its reply
        self.pushed_at = 0.0

    def push_messages(self, messages):
        self.pushed_at = time.monotonic()
        return [f"id-{m}" for m in messages]

    def pull_messages(self, ids):
        self.pulls += 1
        if time.monotonic() - self.pushed_at < self.delay:
            return []
        return [self._reply(i) for i in ids if i not in self.never]

    def _reply(self, message_id: str) -> SimpleNamespace:
        code = self.errors.get(message_id)
        return SimpleNamespace(
            metadata=SimpleNamespace(reply_to_message_id=message_id,
                                     src_node_id=int(message_id.removeprefix("id-"))),
            has_error=lambda: code is not None, error=SimpleNamespace(code=code))


def test_replies_arrive_within_one_short_interval() -> None:
    fake = FakeGrid(delay=0.5)
    start = time.monotonic()
    replies = list(PollingGrid(fake, interval=0.05).send_and_receive([1, 2, 3], timeout=10))
    elapsed = time.monotonic() - start
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["id-1", "id-2", "id-3"]
    assert 0.5 <= elapsed < 0.8  # Flower's own loop would take 3 s here
    assert fake.pulls > 5


def test_timeout_returns_what_arrived() -> None:
    fake = FakeGrid(delay=0.0, never={"id-2"})
    start = time.monotonic()
    replies = list(PollingGrid(fake, interval=0.05).send_and_receive([1, 2], timeout=0.3))
    assert [r.metadata.reply_to_message_id for r in replies] == ["id-1"]
    assert 0.3 <= time.monotonic() - start < 0.6


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="poll interval must be > 0"):
        PollingGrid(FakeGrid(0.0), interval=0)


def test_error_codes_are_remembered_per_node_until_taken() -> None:
    fake = FakeGrid(delay=0.0, errors={"id-2": 1002})
    grid = PollingGrid(fake, interval=0.05)
    replies = list(grid.send_and_receive([1, 2, 3], timeout=5))
    assert len(replies) == 3
    assert grid.take_error_codes() == {2: 1002}
    assert grid.take_error_codes() == {}


def test_stream_pulls_at_most_a_chunk_and_yields_before_the_rest_is_pulled() -> None:
    class Counting(FakeGrid):
        def __init__(self) -> None:
            super().__init__(delay=0.0)
            self.asked: list[int] = []

        def pull_messages(self, ids):
            self.asked.append(len(list(ids)))
            return super().pull_messages(ids)

    fake = Counting()
    stream = PollingGrid(fake, interval=0.05).stream(list(range(1, 11)), timeout=5, chunk=3)
    first = next(stream)
    assert first.metadata.reply_to_message_id == "id-1" and fake.asked == [3]
    rest = list(stream)
    assert len(rest) == 9 and max(fake.asked) <= 3 and len(fake.asked) == 4  # 3+3+3+1


def test_a_window_keeps_at_most_that_many_messages_out_and_sends_every_one() -> None:
    class Tracking(FakeGrid):
        def __init__(self) -> None:
            super().__init__(delay=0.0)
            self.out: set[str] = set()
            self.most_out = 0
            self.order: list[str] = []

        def push_messages(self, messages):
            ids = list(super().push_messages(messages))
            self.out |= set(ids)
            self.most_out = max(self.most_out, len(self.out))
            return ids

        def pull_messages(self, ids):
            replies = list(super().pull_messages(ids))
            for reply in replies:
                self.out.discard(reply.metadata.reply_to_message_id)
                self.order.append(reply.metadata.reply_to_message_id)
            return replies

    for window, most in ((2, 2), (1, 1), (0, 7)):
        fake = Tracking()
        replies = list(PollingGrid(fake, interval=0.01).stream(list(range(1, 8)), timeout=5,
                                                               window=window))
        assert sorted(r.metadata.src_node_id for r in replies) == list(range(1, 8))
        assert fake.most_out == most, window
    assert fake.order == [f"id-{i}" for i in range(1, 8)]


def test_a_window_stops_sending_at_the_timeout() -> None:
    fake = FakeGrid(delay=0.0, never={"id-1"})  # site 1 never answers and holds the window
    start = time.monotonic()
    replies = list(PollingGrid(fake, interval=0.05).stream([1, 2, 3], timeout=0.3, window=1))
    assert replies == [] and 0.3 <= time.monotonic() - start < 0.6
