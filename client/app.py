"""fedrad's ClientApp: a thin adapter from Flower messages to the site's training code.

Top-level imports stay light (no torch): SecAgg+'s key-exchange stages run in
their own `flwr-clientapp` processes and need none of it, and training and
evaluation go to the site worker (client.worker) when one is running.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from client.errors import SiteRefusal, site_failure
from client.messages import handle_evaluate, handle_train
from common.secagg import CLIENT_MODS

LOG = logging.getLogger("fedrad.client")


def sanitising_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Outermost mod: no exception text ever leaves the site, only fixed reasons."""
    try:
        return call_next(msg, context)
    except SiteRefusal as refusal:
        LOG.warning("round refused: %s", refusal.reason)
        return Message(Error(code=refusal.code, reason=refusal.reason), reply_to=msg)
    except Exception:  # noqa: BLE001 - a site never crashes on a bad request
        LOG.exception("round failed at this site")
        failure = site_failure()
        return Message(Error(code=failure.code, reason=failure.reason), reply_to=msg)


app = ClientApp(mods=[sanitising_mod, *CLIENT_MODS])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local DP training on the site's data; replies with the update (local - global)."""
    return handle_train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the site's held-out patients."""
    return handle_evaluate(msg, context)
