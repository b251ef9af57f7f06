"""PollingGrid keeps Grid's send_and_receive contract with a short poll."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from server.polling_grid import PollingGrid


class FakeGrid:
    """Replies become available `delay` seconds after the push (what a SuperLink does)."""

    def __init__(self, delay: float, never: set[str] | None = None) -> None:
        self.delay, self.never, self.pulls = delay, never or set(), 0
        self.pushed_at = 0.0

    def push_messages(self, messages):
        self.pushed_at = time.monotonic()
        return [f"id-{m}" for m in messages]

    def pull_messages(self, ids):
        self.pulls += 1
        if time.monotonic() - self.pushed_at < self.delay:
            return []
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i))
                for i in ids if i not in self.never]


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
