"""fedrad.supernode: Flower's SuperNode loop with its fixed 3 s idle wait and 0.5 s reply
steps shortened, and only those; a loop it does not recognise is left alone."""

from __future__ import annotations

import importlib
import time

import fedrad.supernode as supernode


def test_flowers_two_fixed_waits_are_shortened_and_no_other() -> None:
    from flwr.supernode import start_client_internal

    module = importlib.reload(start_client_internal)  # a fresh copy, with its own `time`
    try:
        assert supernode.tune(module)
        slept: list[float] = []
        real = time.sleep
        time.sleep = slept.append  # type: ignore[assignment]
        try:
            for seconds in (3, 0.5, 7.0):
                module.time.sleep(seconds)
        finally:
            time.sleep = real
        assert slept == [supernode.IDLE_POLL_S, supernode.REPLY_POLL_S, 7.0]
        assert module.time.monotonic() > 0  # everything else is the real module
    finally:
        importlib.reload(start_client_internal)


def test_a_loop_it_was_not_written_for_is_left_unchanged(tmp_path, monkeypatch) -> None:
    source = ("import time\n\ndef loop():\n    time.sleep(3)\n    time.sleep(0.5)\n"
              "    time.sleep(2)\n")
    path = tmp_path / "other_loop.py"
    path.write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("other_loop")
    assert not supernode.tune(module)
    assert module.time is time
