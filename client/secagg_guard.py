"""The site's own checks on the parameters a server sends to Flower's SecAgg+ mod.

Flower's `secaggplus_mod` takes the sample size, share count, threshold and, at the
unmask stage, the active and dead sets from the server as given: a threshold of 1
makes any single share enough, too few sites make the "aggregate" one site's update,
and a site named both active and dead has its self mask *and* its pairwise masks
revealed, which unmasks its update. `secagg_guard_mod` runs before it and refuses:
- set-up with fewer sites than the node config's `min-secure-aggregation-sites`;
- a threshold t with 2·t <= share count (a minority could reconstruct secrets);
- an unmask request whose active and dead sets overlap, or that names a node that
  is not among this site's neighbours from the key exchange.
A refusal is a SiteRefusal with a fixed reason (the outermost mod sends it) and an
entry in the site's audit log.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)

from client.errors import policy_refusal
from client.site_config import AUDIT_FILE
from client.site_policy import SitePolicy
from common.audit import AuditLog

LOG = logging.getLogger("fedrad.client")


def _refuse(ctxt: Context, stage: str, problem: str) -> None:
    LOG.warning("SecAgg+ %s refused: %s", stage, problem)
    work_dir = ctxt.node_config.get("work-dir")
    if work_dir:
        AuditLog(Path(str(work_dir)).expanduser() / AUDIT_FILE).append(
            "secagg-refused", run_id=str(ctxt.run_id), stage=stage, problem=problem)
    raise policy_refusal(["secure-aggregation-parameters"])


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("not an integer")
    return value


def check_setup(configs: Any, policy: SitePolicy) -> str | None:
    """What is wrong with a set-up request (None: acceptable)."""
    try:
        sample, shares, threshold = (_int(configs[Key.SAMPLE_NUMBER]),
                                     _int(configs[Key.SHARE_NUMBER]),
                                     _int(configs[Key.THRESHOLD]))
    except (KeyError, TypeError):
        return "set-up parameters missing or not integers"
    if sample < policy.min_secure_aggregation_sites:
        return (f"{sample} sites, below this site's min-secure-aggregation-sites "
                f"{policy.min_secure_aggregation_sites}")
    if shares > sample or shares < 2:
        return f"share count {shares} for {sample} sites"
    if 2 * threshold <= shares or threshold > shares:
        return f"threshold {threshold} for {shares} shares (needs a strict majority)"
    return None


def check_unmask(configs: Any, neighbours: set[int]) -> str | None:
    """What is wrong with an unmask request (None: acceptable)."""
    try:
        active = [_int(n) for n in configs[Key.ACTIVE_NODE_ID_LIST]]
        dead = [_int(n) for n in configs[Key.DEAD_NODE_ID_LIST]]
    except (KeyError, TypeError):
        return "unmask sets missing or not node ids"
    if set(active) & set(dead):
        return "a node named both active and dead"
    if len(set(active)) != len(active) or len(set(dead)) != len(dead):
        return "a node named twice"
    if not set(dead) <= neighbours or not set(active) <= neighbours:
        return "a node that is not among this site's neighbours"
    return None


def secagg_guard_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Refuse SecAgg+ parameters that would weaken the masking (see the module doc)."""
    if (msg.metadata.message_type != MessageType.TRAIN
            or RECORD_KEY_CONFIGS not in msg.content.config_records):
        return call_next(msg, ctxt)
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    stage = configs.get(Key.STAGE)
    problem = None
    if stage == Stage.SETUP:
        problem = check_setup(configs, SitePolicy.from_mapping(ctxt.node_config))
    elif stage == Stage.UNMASK:
        state = ctxt.state.config_records.get(RECORD_KEY_STATE)
        # Flower's SecAggPlusState layout: the key exchange's node ids
        known = state.get("public_keys_dict:K") if state is not None else None
        neighbours = {int(n) for n in known} if isinstance(known, list) else set()
        problem = check_unmask(configs, neighbours)
    if problem is not None:
        _refuse(ctxt, str(stage), problem)
    return call_next(msg, ctxt)
