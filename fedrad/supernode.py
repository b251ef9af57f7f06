"""`flower-supernode` with its fixed waits shortened: the site's SuperNode entry point.

Flower 1.42's SuperNode sleeps a fixed 3 s whenever a pull finds no message and waits for
the ClientApp's reply and its objects in fixed 0.5 s steps
(`flwr/supernode/start_client_internal.py`); none of it is configurable. With one
exchange per round a site that has just replied pulls, finds nothing yet (the server is
still waiting for the slowest site), and then sleeps 3 s past the moment the next request
is there: most of a round's overhead. This entry point runs Flower's own CLI unchanged,
with those waits in that one module replaced: an idle pull is repeated after
`IDLE_POLL_S` and a reply is looked for every `REPLY_POLL_S`. Every other sleep passes
through. The cost is more pull requests to the Fleet API while a site is idle (one every
`IDLE_POLL_S` per site).

The change is made only when the module's source still holds exactly the waits it was
written against (checked at start); otherwise Flower's own waits stay and a warning says
so, so a Flower upgrade can slow a federation down but never break it.
"""

from __future__ import annotations

import inspect
import logging
import sys
import time
from types import ModuleType, SimpleNamespace

IDLE_POLL_S = 0.25  # instead of 3 s after a pull that found no message
REPLY_POLL_S = 0.05  # instead of 0.5 s while the ClientApp's reply is on its way
_FLOWER_IDLE_S, _FLOWER_REPLY_S = 3, 0.5
_EXPECTED = ("time.sleep(3)", "time.sleep(0.5)")
LOG = logging.getLogger("fedrad.supernode")


def _sleep(seconds: float) -> None:
    if seconds == _FLOWER_IDLE_S:
        seconds = IDLE_POLL_S
    elif seconds == _FLOWER_REPLY_S:
        seconds = REPLY_POLL_S
    time.sleep(seconds)


def tune(module: ModuleType) -> bool:
    """Replace `module`'s `time` by one whose sleep maps Flower's two fixed waits to
    ours; False (nothing changed) when its source is not what this was written for."""
    source = inspect.getsource(module)
    if not all(wait in source for wait in _EXPECTED) or "time.sleep(" not in source:
        return False
    if source.count("time.sleep(") != sum(source.count(wait) for wait in _EXPECTED):
        return False  # a wait this does not know: leave the module as it is
    clock = SimpleNamespace(**{name: getattr(time, name) for name in dir(time)
                               if not name.startswith("_")})
    clock.sleep = _sleep
    module.time = clock  # type: ignore[attr-defined]
    return True


def main() -> None:
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    if not tune(start_client_internal):
        print("fedrad.supernode: WARNING: flwr's SuperNode loop is not the one this was "
              "written for; running with Flower's own 3 s idle wait", file=sys.stderr,
              flush=True)
    flower_supernode()


if __name__ == "__main__":
    main()
