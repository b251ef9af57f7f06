"""fedrad's ClientApp: a thin adapter from Flower messages to the site's training code.

Top-level imports stay light (no torch): secure aggregation's key advert and
recovery (queries) need none of it, and training and evaluation go to the site
worker (client.worker) when one is running.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from client.errors import SiteRefusal, policy_refusal, site_failure
from client.messages import handle_evaluate, handle_query, handle_train
from client.site_config import AUDIT_FILE
from client.site_policy import enforce
from common.audit import AuditLog

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


def site_policy_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Second mod: the site's own policy (node config) decides whether this run may use
    the site at all, before key adverts, data loading, training or evaluation."""
    work_dir = context.node_config.get("work-dir")
    audit = AuditLog(Path(str(work_dir)).expanduser() / AUDIT_FILE) if work_dir else None
    broken = enforce(context.node_config, context.run_config, run_id=int(context.run_id),
                     audit=audit)
    if broken:
        raise policy_refusal(broken)
    return call_next(msg, context)


app = ClientApp(mods=[sanitising_mod, site_policy_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local DP training on the site's data; replies with the update (local - global)."""
    return handle_train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the site's held-out patients."""
    return handle_evaluate(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Secure aggregation's key advert (once per run) and dropout recovery."""
    return handle_query(msg, context)
