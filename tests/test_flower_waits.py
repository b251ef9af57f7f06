"""fedrad.flower_waits: Flower's fixed waits shortened (the SuperNode loop's 3 s idle wait
and 0.5 s reply steps, the 1-10 s backoff of object pulls), and only those; Flower code it
does not recognise is left alone."""

from __future__ import annotations

import importlib
import time
import types

from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

import fedrad.flower_waits as waits


def test_the_supernode_loops_two_fixed_waits_are_shortened_and_no_other() -> None:
    from flwr.supernode import start_client_internal

    module = importlib.reload(start_client_internal)  # a fresh copy, with its own `time`
    try:
        assert waits.shorten_loop_waits(module)
        slept: list[float] = []
        real = time.sleep
        time.sleep = slept.append  # type: ignore[assignment]
        try:
            for seconds in (3, 0.5, 7.0):
                module.time.sleep(seconds)
        finally:
            time.sleep = real
        assert slept == [waits.IDLE_POLL_S, waits.REPLY_POLL_S, 7.0]
        assert module.time.monotonic() > 0  # everything else is the real module
    finally:
        importlib.reload(start_client_internal)


def test_a_loop_it_was_not_written_for_is_left_unchanged(tmp_path, monkeypatch) -> None:
    (tmp_path / "other_loop.py").write_text(
        "import time\n\ndef loop():\n    time.sleep(3)\n    time.sleep(0.5)\n"
        "    time.sleep(2)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("other_loop")
    assert not waits.shorten_loop_waits(module)
    assert module.time is time


def _late(ready_after: int):
    """A pull function whose object is there from the `ready_after`-th try on."""
    tries = {"n": 0}

    def pull(object_id: str) -> bytes:
        tries["n"] += 1
        if tries["n"] <= ready_after:
            raise ObjectUnavailableError(object_id)
        return b"content"

    return pull


def test_an_object_that_arrives_late_is_pulled_without_whole_second_waits() -> None:
    """Flower's own backoff waits 1 s then 2 s for an object that is there on the third
    try; shortened, the same pull takes a few hundredths of a second."""
    module = types.SimpleNamespace(pull_objects=inflatable_utils.pull_objects)
    start = time.monotonic()
    assert module.pull_objects(["a"], _late(2)) == {"a": b"content"}
    flower = time.monotonic() - start
    assert waits.shorten_object_pulls(module, "pull_objects")  # type: ignore[arg-type]
    start = time.monotonic()
    assert module.pull_objects(["a"], _late(2)) == {"a": b"content"}
    ours = time.monotonic() - start
    assert flower >= 2.0 and ours < 0.3, (flower, ours)
    assert waits.shorten_object_pulls(module, "pull_objects")  # type: ignore[arg-type]
    assert module.pull_objects.__wrapped__ is inflatable_utils.pull_objects  # wrapped once


def test_a_pull_without_backoff_arguments_is_left_unchanged() -> None:
    def pull(object_ids, fn):
        return {}

    module = types.SimpleNamespace(pull_objects=pull)
    assert not waits.shorten_object_pulls(module, "pull_objects")  # type: ignore[arg-type]
    assert module.pull_objects is pull
