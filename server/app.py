"""fedrad's ServerApp (Flower Message API): rounds, aggregation, run folder, report."""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common import keys
from common.audit import digest, digest_arrays
from common.config import RunConfig
from common.model_signing import SIGNING_KEY_ENV, load_signing_key, sign_model
from common.models import build_model, load_pretrained, prior_provenance
from common.weights import (
    check_finite,
    from_arrays,
    global_norm,
    pack,
    plain_state_dict,
    to_arrays,
    unpack,
)
from server.aggregation import Aggregator, SiteUpdate, UpdatePool
from server.central_dp import CentralDP
from server.masked_sum import Roster
from server.memory import return_large_frees
from server.polling_grid import PollingGrid
from server.registry import RoundRecord, RunFolder, SiteRound, registered_sites, server_home
from server.report import write_report
from server.rounds import DROPPED_IN_RECOVERY, NO_REPLY, Replies, evaluate_round, train_round

LOG = logging.getLogger("fedrad.server")
app = ServerApp()


LOST = frozenset({NO_REPLY, DROPPED_IN_RECOVERY})  # train statuses of a site that did not answer
REFUSALS = frozenset({keys.STATUS_REFUSED_BUDGET, keys.STATUS_REFUSED_POLICY})


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


@dataclass
class _RunState:
    """What the round loop carries from one round to the next."""

    run: RunFolder
    first_round: int
    global_arrays: list[np.ndarray]


def _start_or_resume(context: Context, config: RunConfig, layout: list[np.ndarray],
                     aggregator: Aggregator, central: CentralDP | None) -> _RunState:
    """A new run folder, or (resume-from) the old one at its last checkpoint."""
    flat = config.to_mapping()
    if not config.resume_from:
        run = RunFolder.create(server_home(), context.run_id, flat)
        return _RunState(run, 1, pack(layout))
    run = RunFolder.open(server_home(), config.resume_from)
    before = {k: v for k, v in run.read_json("config.json").items() if k != "resume-from"}
    now = {k: v for k, v in flat.items() if k != "resume-from"}
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if changed:
        raise RunAborted(f"resume-from={config.resume_from}: the config differs from the "
                         f"run's own config.json in {changed}; resume with the same config "
                         "(fedrad run resume does) or start a new run")
    last = run.last_round()
    if last == 0:
        raise RunAborted(f"run {config.resume_from} has no checkpoint to resume from")
    state = run.load_checkpoint(last)
    server_state = {k: v.numpy() for k, v in run.load_server_state(last).items()}
    if central is not None:
        central.rounds = int(server_state.pop("central-dp-releases", np.zeros(1))[0])
    aggregator.load_state(server_state)
    run.drop_rounds_after(last)
    run.resumed_by(context.run_id, last)
    LOG.info("run %s resumes run %s after round %d", context.run_id, run.run_id, last)
    template_arrays = to_arrays(state)
    return _RunState(run, last + 1, pack(template_arrays))


def _contributions(run: RunFolder, server_round: int, train: Replies, pool: UpdatePool,
                   config: RunConfig, central: CentralDP | None
                   ) -> tuple[list[SiteUpdate], int]:
    """What the strategy aggregates, and how many sites' updates it holds."""
    for node, status in sorted(train.statuses.items()):
        if status.startswith("rejected-"):
            run.audit.append("update-rejected", run_id=run.run_id, round=server_round,
                             node_id=node, reason=status)
            LOG.warning("round %d: update of node %d rejected (%s)", server_round, node,
                        status)
    if config.secagg.enabled:
        counted = sum(1 for s in train.statuses.values() if s == keys.STATUS_OK)
        updates = [] if train.update is None else [SiteUpdate(0, train.update, 1.0)]
    else:
        counted = pool.count
        updates = pool.contributions()
    if updates and central is not None:  # noise on the mean of the clipped updates
        mean = train.update if config.secagg.enabled else pool.mean()
        assert mean is not None
        check_finite(mean)
        central.privatise(mean, counted)
        LOG.info("round %d: central DP noise std %.4g over %d sites, ε %.3f (δ %g)",
                 server_round, central.noise_std(counted), counted, central.epsilon(),
                 config.central_dp.delta)
        updates = [SiteUpdate(0, mean, 1.0)]
    return updates, counted


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run `num-rounds` rounds: DP training at the sites, secure aggregation or screened updates,
    the run's strategy, k-of-n participation, evaluation every N rounds, checkpoints."""
    _configure_logging()
    return_large_frees()
    grid = PollingGrid(grid)
    config = RunConfig.from_mapping(context.run_config)
    model = build_model(config)
    prior: dict[str, object] | None = None
    if config.init_weights:
        weights = Path(config.init_weights).expanduser()
        provenance = prior_provenance(config, weights)  # refused if made for another model
        load_pretrained(model, weights)
        prior = {"file": weights.name, "sha256": digest(weights.read_bytes()),
                 "provenance": provenance}
        LOG.info("initial weights from %s (%s)", config.init_weights,
                 "no provenance" if provenance is None else provenance["data"])
    template = plain_state_dict(model)
    layout = to_arrays(template)
    central = CentralDP(config.central_dp) if config.central_dp.enabled else None
    aggregator = Aggregator(config)
    signer = _signing_key()
    state = _start_or_resume(context, config, layout, aggregator, central)
    run, global_arrays = state.run, state.global_arrays
    if prior is not None and state.first_round == 1:
        run.record_prior(prior)
    LOG.info(
        "run %s: task=%s strategy=%s rounds=%d-%d min-sites=%d k=%d dp=%s secagg=%s "
        "folder=%s", context.run_id, config.task.value, config.strategy.name.value,
        state.first_round, config.num_rounds, config.min_sites,
        config.faults.min_train_sites, config.dp.enabled, config.secagg.enabled, run.root,
    )
    if not config.secagg.enabled:
        LOG.warning("secure aggregation is OFF: the server sees each site's individual update")
        if config.faults.max_update_norm == 0:
            LOG.warning("max-update-norm is 0: a site's update of any size is accepted "
                        "(weights above secagg-max-weight are still rejected); set a bound "
                        "for runs without secure aggregation")
    if not config.dp.enabled:
        LOG.warning("differential privacy is OFF for this run")
    registered = registered_sites()  # node id → site, from the node keys the server holds
    names: dict[int, str] = dict(registered)
    k = config.faults.min_train_sites
    last_end = 0.0  # when the previous round ended (perf_counter)
    roster = Roster(int(context.run_id)) if config.secagg.enabled else None
    awaiting: Callable[..., None] | None = None  # a round whose evaluation is out
    pending: tuple[int, int, list[int]] = (0, 0, [])  # its round, exchanges, sites alive
    refused: set[int] = set()  # sites that refused this run (budget, policy): not asked again
    patience = config.early_stop_patience
    stop_after: int | None = None  # set when `patience` rounds brought no better model

    def end_round(server_round: int, start: float, node_ids: list[int], train: Replies,
                  counted: int, step_norm: float, round_global: list[np.ndarray],
                  sent: list[np.ndarray], pool: UpdatePool, alive: list[int],
                  evaluation: Replies, exchanges: int, ended: float | None = None) -> None:
        """Record round `server_round` and save its checkpoint, once its evaluation (if
        any) is in. Its wall time runs from its start, or from the previous round's end
        if that came later, to its end: its aggregate (`ended`) when its evaluation rode
        on the next round's exchange, else now. What the round added to the run."""
        nonlocal last_end, stop_after
        _name_unregistered(names, registered, evaluation.site_ids)
        now = time.perf_counter() if ended is None else ended
        wall, last_end = now - max(start, last_end), now
        slowest = max(
            (m.get("load-seconds", 0.0) + m.get("train-seconds", 0.0)
             for n, m in train.metrics.items() if train.statuses.get(n) == "ok"),
            default=0.0,
        )
        record = RoundRecord(
            server_round=server_round,
            wall_seconds=wall,
            slowest_site_seconds=slowest,
            sites_expected=len(node_ids),
            sites_trained=counted,
            secagg=config.secagg.enabled,
            update_norm=step_norm,
            score_metric=keys.headline_metric(config.task),
            pooled_score=_pooled(evaluation, keys.headline_metric(config.task)),
            central_epsilon=central.epsilon() if central is not None else None,
            sites=_site_rounds(train, evaluation, names),
            failures=sorted(s for s in train.statuses.values() if s != "ok"),
            exchanges=exchanges,
        )
        run.record_round(record)
        run.save_checkpoint(server_round, from_arrays(template, unpack(round_global, layout)))
        best_round = run.tag_best(server_round, record.score_metric, record.pooled_score)
        # (round r is recorded once round r+1 has trained: stopping pays off before the last)
        if patience and best_round and server_round - best_round >= patience and \
                server_round < config.num_rounds - 1:
            stop_after = server_round
            run.stopped_early(server_round, best_round, patience)
            LOG.info("round %d: no better pooled %s than round %d's in %d round(s) "
                     "(early-stop-patience); the run stops", server_round,
                     record.score_metric, best_round, patience)
        server_state = {key: torch.from_numpy(np.ascontiguousarray(value))
                        for key, value in aggregator.state().items()}
        if central is not None:
            server_state["central-dp-releases"] = torch.tensor([central.rounds])
        run.save_server_state(server_round, server_state)
        if config.faults.cross_site and server_round == config.num_rounds:
            run.write_json("cross-site.json", _cross_site(
                grid, context, config, signer, server_round, round_global, sent=sent,
                updates=pool.contributions(), node_ids=alive, names=names))
        failed = {names.get(n, f"node-{n}"): s for n, s in train.statuses.items()
                  if s != keys.STATUS_OK}
        LOG.info("round %d/%d: %d/%d sites counted%s, pooled %s %.3f, ε %s, wall %.1fs, "
                 "slowest site %.1fs, overhead %.1fs, %d exchange(s)", server_round,
                 config.num_rounds, counted, len(node_ids),
                 f" (not counted: {failed})" if failed else "", record.score_metric,
                 record.pooled_score, _epsilons(record), wall, slowest,
                 max(wall - slowest, 0.0), exchanges)

    try:
        if state.first_round == 1:
            wait_for_nodes(grid, config.min_sites, config.round_timeout)
        for server_round in range(state.first_round, config.num_rounds + 1):
            if stop_after is not None:
                break
            start = time.perf_counter()
            if not config.dp.enabled:
                LOG.warning("round %d: differential privacy is OFF (dp-enabled=false)",
                            server_round)
            node_ids = [n for n in wait_for_nodes(grid, k, config.round_timeout)
                        if n not in refused]  # whoever is online and has not refused
            run.audit.append("global-model-sent", run_id=run.run_id, round=server_round,
                             nodes=len(node_ids), bytes=sum(a.nbytes for a in global_arrays),
                             sha256=digest_arrays(global_arrays))
            pool = UpdatePool(global_arrays, max_norm=config.faults.max_update_norm,
                              keep=aggregator.needs_every_update or config.faults.cross_site,
                              uniform=central is not None,
                              max_weight=config.secagg.max_weight)
            # One exchange: this request carries the previous round's global model, which
            # each site evaluates first (if that round is evaluated), then trains from.
            train, carried = train_round(
                grid, context, config, server_round=server_round,
                global_arrays=global_arrays, node_ids=node_ids,
                signature=sign_model(signer, global_arrays, context.run_id, server_round,
                                     "train"),
                pool=pool, roster=roster, evaluate_previous=awaiting is not None)
            if awaiting is not None:  # the previous round is recorded before this one
                awaiting(carried)
                awaiting = None
            _name_unregistered(names, registered, train.site_ids)
            for node, status in train.statuses.items():
                if status in REFUSALS and node not in refused:
                    refused.add(node)  # it would refuse again (ε only grows) and cost a
                    LOG.warning("round %d: %s %s; not asked again in this run",  # recovery
                                server_round, names.get(node, f"node-{node}"), status)
            updates, counted = _contributions(run, server_round, train, pool, config, central)
            if not updates or counted < k:  # recorded (who refused, who dropped), then stop
                run.record_round(RoundRecord(
                    server_round=server_round, wall_seconds=time.perf_counter() - start,
                    slowest_site_seconds=0.0, sites_expected=len(node_ids),
                    sites_trained=counted, secagg=config.secagg.enabled, update_norm=0.0,
                    score_metric=keys.headline_metric(config.task), pooled_score=float("nan"),
                    sites=_site_rounds(train, Replies(), names),
                    failures=sorted(s for s in train.statuses.values() if s != "ok"),
                    exchanges=train.exchanges,
                ))
                missing = sorted(names.get(n, f"node-{n}") for n, s in train.statuses.items()
                                 if s != keys.STATUS_OK)
                raise RunAborted(f"round {server_round}: {counted} site update(s) counted, "
                                 f"fewer than min-train-sites={k}, or no aggregate (secure "
                                 f"aggregation needs secagg-min-sites="
                                 f"{config.secagg.min_sites} after one recovery); sites not "
                                 f"counted: {missing} (statuses: {train.statuses})")
            sent = global_arrays  # the model this round's sites started from
            new_global = aggregator.next_global(server_round, global_arrays, updates)
            check_finite(new_global)
            step_norm = global_norm(new_global, minus=global_arrays)
            global_arrays = new_global
            # A site that did not answer the training request is gone for this round:
            # asking it to evaluate would only wait out the deadline a second time.
            alive = [n for n in node_ids if train.statuses.get(n) not in LOST]
            end = partial(end_round, server_round, start, node_ids, train, counted,
                          step_norm, global_arrays, sent, pool, alive)
            if config.should_evaluate(server_round) and alive:
                if server_round < config.num_rounds:  # carried by the next request
                    awaiting = partial(end, exchanges=train.exchanges,
                                       ended=time.perf_counter())
                    pending = (server_round, train.exchanges, alive)
                else:  # the last round adds an evaluation-only exchange
                    end(evaluate_round(grid, config, server_round=server_round,
                                       global_arrays=global_arrays, node_ids=alive,
                                       signature=sign_model(signer, global_arrays,
                                                            context.run_id, server_round,
                                                            "evaluate")),
                        exchanges=train.exchanges + 1)
            else:
                end(Replies(), exchanges=train.exchanges)
            # The round's Flower Messages (requests holding the model, replies, secure aggregation
            # stages) are reference cycles: free them now, not at some later full
            # collection, so a round's model copies never pile up across rounds.
            gc.collect()
        if awaiting is not None:  # stopped early: the evaluation no request will carry
            pending_round, exchanges, alive = pending
            awaiting(evaluate_round(grid, config, server_round=pending_round,
                                    global_arrays=global_arrays, node_ids=alive,
                                    signature=sign_model(signer, global_arrays,
                                                         context.run_id, pending_round,
                                                         "evaluate")),
                     exchanges=exchanges + 1, ended=None)
            awaiting = None
        run.finish("completed")
    except Exception:
        try:  # a round whose evaluation was still out is recorded without it
            if awaiting is not None:
                awaiting(Replies())
        except Exception:  # noqa: BLE001 - the run's own error is the one to raise
            LOG.exception("could not record the last evaluated round")
        run.finish("failed")
        raise
    finally:
        report = write_report(run)
        LOG.info("report: %s", report)


def _cross_site(grid: PollingGrid, context: Context, config: RunConfig, signer: Ed25519PrivateKey,
                server_round: int, global_arrays: list[np.ndarray], *,
                sent: list[np.ndarray], updates: list[SiteUpdate], node_ids: list[int],
                names: dict[int, str]) -> dict[str, dict[str, dict[str, float]]]:
    """Each site's local model of the last round (the global model it started from plus its
    DP-trained update) and the global model, evaluated at every site: model → site →
    metrics. Only allowed without secure aggregation and with DP (common.config)."""
    models = {"global": global_arrays}
    for update in updates:
        models[f"local:{names.get(update.node_id, update.node_id)}"] = [
            (b + u).astype(np.float32) for b, u in zip(sent, update.arrays, strict=True)]
    table: dict[str, dict[str, dict[str, float]]] = {}
    for model_name, arrays in models.items():
        replies = evaluate_round(grid, config, server_round=server_round,
                                 global_arrays=arrays, node_ids=node_ids,
                                 signature=sign_model(signer, arrays, context.run_id,
                                                      server_round, "evaluate"))
        table[model_name] = {names.get(n, f"node-{n}"): m for n, m in replies.metrics.items()}
    LOG.info("cross-site validation: %d models x %d sites", len(models), len(node_ids))
    return table


def _name_unregistered(names: dict[int, str], registered: dict[int, str],
                       claimed: dict[int, str]) -> None:
    """Names of nodes the server did not register, from what they say of themselves, but
    never a name that a registered site (or another node) holds: such a claim is recorded
    under the node's id, so no node can pose as a registered hospital."""
    for node, name in claimed.items():
        if node in registered or node in names:
            continue
        taken = set(names.values())
        names[node] = name if name not in taken else f"node-{node}"


def _epsilons(record: RoundRecord) -> str:
    spent = {s: round(v.train["epsilon-total"], 2) for s, v in record.sites.items()
             if "epsilon-total" in v.train}
    return str(spent) if spent else "DP off"
