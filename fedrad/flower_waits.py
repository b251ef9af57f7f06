"""Flower's fixed waits, shortened where fedrad runs Flower's own code (one place for all).

Flower 1.42 waits in fixed steps that none of its settings reach, and with one exchange
per round they are most of a round's overhead:

- the SuperNode loop (`flwr/supernode/start_client_internal.py`) sleeps 3 s after every
  pull that found no message, and waits for the ClientApp's reply in 0.5 s steps: a site
  that has just replied pulls, finds nothing yet (the server waits for the slowest site)
  and then sleeps 3 s past the moment the next request is there;
- every object pull (`flwr/supercore/inflatable/inflatable_utils.py` `pull_objects`) backs
  off 1 s, 2 s, 4 s ... up to 10 s while an object is not there yet, and a message is
  listed before its objects are: the SuperNode lists a request to its ClientApp while it
  still pulls the model, and the SuperLink lists a reply while the site still uploads it,
  so the ClientApp and the ServerApp each lose whole seconds per message.

`shorten_loop_waits` maps the SuperNode loop's two fixed sleeps to `IDLE_POLL_S` and
`REPLY_POLL_S`; `shorten_object_pulls` makes a module's object pulls start at
`PULL_FIRST_BACKOFF_S` and cap at `PULL_BACKOFF_CAP_S`. Both check first that Flower's
code is the one they were written for, and change nothing otherwise (a Flower upgrade can
slow a federation down, never break it). The cost: more polls of local or Fleet APIs
while waiting (one every `IDLE_POLL_S` per idle site).
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from types import ModuleType, SimpleNamespace
from typing import Any

IDLE_POLL_S = 0.25  # instead of 3 s after a pull that found no message
REPLY_POLL_S = 0.05  # instead of 0.5 s while the ClientApp's reply is on its way
PULL_FIRST_BACKOFF_S = 0.02  # instead of 1 s before an object pull is retried
PULL_BACKOFF_CAP_S = 0.5  # instead of 10 s
_FLOWER_IDLE_S, _FLOWER_REPLY_S = 3, 0.5
_LOOP_WAITS = ("time.sleep(3)", "time.sleep(0.5)")
_BACKOFF_ARGS = ("initial_backoff", "backoff_cap")


def _sleep(seconds: float) -> None:
    if seconds == _FLOWER_IDLE_S:
        seconds = IDLE_POLL_S
    elif seconds == _FLOWER_REPLY_S:
        seconds = REPLY_POLL_S
    time.sleep(seconds)


def shorten_loop_waits(module: ModuleType) -> bool:
    """Replace `module`'s `time` by one whose sleep maps Flower's two fixed waits to
    ours; False (nothing changed) when its source holds any other sleep or lacks one."""
    source = inspect.getsource(module)
    counts = [source.count(wait) for wait in _LOOP_WAITS]
    if 0 in counts or source.count("time.sleep(") != sum(counts):
        return False
    clock = SimpleNamespace(**{name: getattr(time, name) for name in dir(time)
                               if not name.startswith("_")})
    clock.sleep = _sleep
    module.time = clock  # type: ignore[attr-defined]
    return True


def shorten_object_pulls(module: ModuleType, name: str) -> bool:
    """Make `module.<name>` (Flower's `pull_objects` or `pull_and_inflate_object_from_tree`,
    as that module imported it) back off from PULL_FIRST_BACKOFF_S up to
    PULL_BACKOFF_CAP_S unless its caller says otherwise; False when it takes no such
    arguments (nothing changed)."""
    pull: Callable[..., Any] | None = getattr(module, name, None)
    if pull is None or getattr(pull, "_fedrad_short", False):
        return pull is not None
    if not set(_BACKOFF_ARGS) <= set(inspect.signature(pull).parameters):
        return False

    @functools.wraps(pull)
    def shorter(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("initial_backoff", PULL_FIRST_BACKOFF_S)
        kwargs.setdefault("backoff_cap", PULL_BACKOFF_CAP_S)
        return pull(*args, **kwargs)

    shorter._fedrad_short = True  # type: ignore[attr-defined]
    setattr(module, name, shorter)
    return True
