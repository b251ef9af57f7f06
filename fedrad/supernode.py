"""`flower-supernode` with Flower's fixed waits shortened (fedrad.flower_waits): the entry
point `fedrad site start` runs for each site's SuperNode. Flower's own CLI, unchanged
otherwise; if its loop is not the one the shortening was written for, Flower's waits stay
and a warning says so."""

from __future__ import annotations

import sys

from fedrad.flower_waits import shorten_loop_waits, shorten_object_pulls


def main() -> None:
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    if not shorten_loop_waits(start_client_internal):
        print("fedrad.supernode: WARNING: flwr's SuperNode loop is not the one fedrad was "
              "written for; it keeps Flower's 3 s idle wait", file=sys.stderr, flush=True)
    if not shorten_object_pulls(start_client_internal, "pull_objects"):
        print("fedrad.supernode: WARNING: flwr's object pulls are not the ones fedrad was "
              "written for; they keep Flower's 1-10 s backoff", file=sys.stderr, flush=True)
    flower_supernode()


if __name__ == "__main__":
    main()
