"""fedrad's ServerApp (Flower Message API): rounds, aggregation, run folder, report."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common import keys
from common.audit import digest
from common.config import RunConfig
from common.model_signing import SIGNING_KEY_ENV, load_signing_key, sign_model
from common.models import build_model, load_pretrained
from common.weights import (
    add,
    check_finite,
    from_arrays,
    global_norm,
    pack,
    plain_state_dict,
    to_arrays,
    unpack,
)
from server.central_dp import CentralDP
from server.polling_grid import PollingGrid
from server.registry import RoundRecord, RunFolder, SiteRound, registered_sites, server_home
from server.report import write_report
from server.rounds import Replies, evaluate_round, train_round

LOG = logging.getLogger("fedrad.server")
app = ServerApp()


class RunAborted(RuntimeError):
    """The run cannot go on (too few sites, no aggregate)."""


def _configure_logging() -> None:
    if not LOG.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("fedrad.server %(levelname)s: %(message)s"))
        LOG.addHandler(handler)
        LOG.setLevel(logging.INFO)
        LOG.propagate = False


def wait_for_nodes(grid: Grid, wanted: int, timeout: float) -> list[int]:
    """Node ids once at least `wanted` sites are connected; raise after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted:
            return nodes
        if time.monotonic() > deadline:
            raise RunAborted(f"only {len(nodes)} of {wanted} sites connected after {timeout:.0f}s")
        time.sleep(1.0)


def _site_rounds(train: Replies, evaluation: Replies,
                 names: dict[int, str]) -> dict[str, SiteRound]:
    sites: dict[str, SiteRound] = {}
    for node in sorted(set(train.statuses) | set(evaluation.statuses)):
        site_id = names.get(node, f"node-{node}")
        sites[site_id] = SiteRound(
            site_id=site_id,
            status=train.statuses.get(node, "not-asked"),
            train=train.metrics.get(node, {}),
            evaluation=evaluation.metrics.get(node, {}),
        )
    return sites


def _pooled(evaluation: Replies, metric: str) -> float:
    """The metric averaged over sites, weighted by their validation examples."""
    pairs = [(m[metric], m[keys.NUM_EXAMPLES]) for m in evaluation.metrics.values()
             if metric in m]
    total = sum(n for _, n in pairs)
    return sum(d * n for d, n in pairs) / total if total else float("nan")


def _signing_key() -> Ed25519PrivateKey:
    """The consortium's model-signing key; without it the ServerApp refuses to run."""
    path = os.environ.get(SIGNING_KEY_ENV)
    if not path:
        raise RunAborted(f"{SIGNING_KEY_ENV} is not set: every global model must be signed "
                         "with the consortium's Ed25519 key (signing.key of `consortium init`)")
    return load_signing_key(Path(path))


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run `num-rounds` rounds of DP training with SecAgg+ and per-site evaluation."""
    _configure_logging()
    grid = PollingGrid(grid)
    config = RunConfig.from_mapping(context.run_config)
    run = RunFolder.create(server_home(), context.run_id, config.to_mapping())
    LOG.info(
        "run %s: task=%s rounds=%d min-sites=%d dp=%s secagg=%s folder=%s",
        context.run_id, config.task.value, config.num_rounds, config.min_sites,
        config.dp.enabled, config.secagg.enabled, run.root,
    )
    if not config.secagg.enabled:
        LOG.warning("SecAgg+ is OFF: the server sees each site's individual update")
    if not config.dp.enabled:
        LOG.warning("differential privacy is OFF for this run")
    model = build_model(config)
    if config.init_weights:
        load_pretrained(model, Path(config.init_weights).expanduser())
        LOG.info("initial weights from %s", config.init_weights)
    template = plain_state_dict(model)
    central = CentralDP(config.central_dp) if config.central_dp.enabled else None
    signer = _signing_key()
    layout = to_arrays(template)
    global_arrays = pack(layout)  # the wire form: one vector (common.weights)
    registered = registered_sites()  # node id → site, from the node keys the server holds
    names: dict[int, str] = dict(registered)
    try:
        wait_for_nodes(grid, config.min_sites, config.round_timeout)
        for server_round in range(1, config.num_rounds + 1):
            start = time.perf_counter()
            if not config.dp.enabled:
                LOG.warning("round %d: differential privacy is OFF (dp-enabled=false)",
                            server_round)
            node_ids = wait_for_nodes(grid, config.min_sites, config.round_timeout)
            run.audit.append("global-model-sent", run_id=run.run_id, round=server_round,
                             nodes=len(node_ids), bytes=sum(a.nbytes for a in global_arrays),
                             sha256=digest(b"".join(a.tobytes() for a in global_arrays)))
            train = train_round(grid, context, config, server_round=server_round,
                                global_arrays=global_arrays, node_ids=node_ids,
                                signature=sign_model(signer, global_arrays, context.run_id,
                                                     server_round, "train"))
            names.update({n: s for n, s in train.site_ids.items() if n not in registered})
            if train.update is None:  # recorded (who refused, who dropped), then stop
                run.record_round(RoundRecord(
                    server_round=server_round, wall_seconds=time.perf_counter() - start,
                    slowest_site_seconds=0.0, sites_expected=len(node_ids), sites_trained=0,
                    secagg=config.secagg.enabled, update_norm=0.0,
                    score_metric=keys.headline_metric(config.task), pooled_score=float("nan"),
                    sites=_site_rounds(train, Replies(), names),
                    failures=sorted(s for s in train.statuses.values() if s != "ok"),
                ))
                raise RunAborted(f"round {server_round}: no aggregate (sites: {train.statuses})")
            check_finite(train.update)
            if central is not None:
                contributors = sum(1 for s in train.statuses.values() if s == keys.STATUS_OK)
                central.privatise(train.update, contributors)
                LOG.info("round %d: central DP noise std %.4g over %d sites, ε %.3f "
                         "(δ %g)", server_round, central.noise_std(contributors),
                         contributors, central.epsilon(), config.central_dp.delta)
            global_arrays = add(global_arrays, train.update)
            global_arrays = [np.asarray(a, dtype=np.float32) for a in global_arrays]
            evaluation = evaluate_round(grid, config, server_round=server_round,
                                        global_arrays=global_arrays, node_ids=node_ids,
                                        signature=sign_model(signer, global_arrays,
                                                             context.run_id, server_round,
                                                             "evaluate"))
            names.update({n: s for n, s in evaluation.site_ids.items() if n not in registered})
            wall = time.perf_counter() - start
            slowest = max(
                (m.get("load-seconds", 0.0) + m.get("train-seconds", 0.0)
                 for m in train.metrics.values()),
                default=0.0,
            )
            record = RoundRecord(
                server_round=server_round,
                wall_seconds=wall,
                slowest_site_seconds=slowest,
                sites_expected=len(node_ids),
                sites_trained=len(train.metrics),
                secagg=config.secagg.enabled,
                update_norm=global_norm(train.update),
                score_metric=keys.headline_metric(config.task),
                pooled_score=_pooled(evaluation, keys.headline_metric(config.task)),
                central_epsilon=central.epsilon() if central is not None else None,
                sites=_site_rounds(train, evaluation, names),
                failures=sorted(s for s in train.statuses.values() if s != "ok"),
            )
            run.record_round(record)
            run.save_checkpoint(server_round,
                                from_arrays(template, unpack(global_arrays, layout)))
            LOG.info("round %d/%d: %d/%d sites, pooled %s %.3f, wall %.1fs, slowest site %.1fs",
                     server_round, config.num_rounds, record.sites_trained, len(node_ids),
                     record.score_metric, record.pooled_score, wall, slowest)
        run.finish("completed")
    except Exception:
        run.finish("failed")
        raise
    finally:
        report = write_report(run)
        LOG.info("report: %s", report)
