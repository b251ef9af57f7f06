"""One round at a site: load data, check the privacy budget, train or evaluate.

Plain inputs in (global arrays, round, the site's node config, the run config), plain
outputs out; client.messages turns them into Flower replies. Runs in the site worker
(client.worker), which keeps one warm setup per run, or in a `flwr-clientapp` process.
Holds all the heavy imports.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import compute_clip_model_update

from client import distributed_dp, optimizer_store, site_logging
from client.dataset import DataSpec, SiteDataset, load_site_dataset
from client.errors import budget_refusal, policy_refusal
from client.ledger import BudgetExceeded, PrivacyLedger, RunCapExceeded, Session
from client.served import split_seed
from client.site_config import AUDIT_FILE, SiteConfig
from client.training import (
    ClassificationAlgo,
    SegmentationAlgo,
    build_algo,
    default_delta,
    dp_schedule,
    pick_device,
    plan_noise_multiplier,
)
from common import keys
from common.audit import AuditLog, digest_arrays
from common.config import OptimizerState, RunConfig, UpdateDType
from common.masking import quantise
from common.phi import PHIGuard
from common.weights import check_finite, global_norm, pack, subtract, unpack

LOG = logging.getLogger("fedrad.client")
LEDGER_FILE = "privacy-ledger.json"
WARM_RUNS = 2  # setups a worker keeps (the current run and the one before)


@dataclass(frozen=True)
class _Setup:
    site: SiteConfig
    config: RunConfig
    dataset: SiteDataset
    algo: SegmentationAlgo | ClassificationAlgo
    guard: PHIGuard
    load_seconds: float


_warm: dict[str, _Setup] = {}


@lru_cache(maxsize=8)
def _audit_log(work_dir: Path) -> AuditLog:
    return AuditLog(work_dir / AUDIT_FILE)


def _audit(site: SiteConfig) -> AuditLog:
    """The site's own audit log: what it trained and sent (sizes, hashes), never data."""
    return _audit_log(site.work_dir)


def _setup(run_id: int, node_config: dict[str, Any], run_config: dict[str, Any]) -> _Setup:
    """The run's data and model: built once per run and process, then reused warm."""
    key = json.dumps([run_id, node_config, run_config], sort_keys=True, default=str)
    if key in _warm:
        return _Setup(**{**_warm[key].__dict__, "load_seconds": 0.0})
    start = time.perf_counter()
    site = SiteConfig.from_mapping(node_config)
    site_logging.configure(site.work_dir)
    if site.threads:
        torch.set_num_threads(site.threads)
    config = RunConfig.from_mapping(run_config)
    spec = DataSpec(task=config.task, image_size=config.image_size,
                    voi_window=config.voi_window, labels=config.labels,
                    labels_file=site.labels_file, labels_key=site.labels_key,
                    foreground=config.foreground)
    dataset = load_site_dataset(site.data_dir, site.work_dir, spec,
                                workers=site.ingest_workers)
    # The site's own held-out patients: its val-fraction, seeded by its own secret
    # (the run's val-fraction and seed do not choose them).
    algo = build_algo(config, dataset, pick_device(site.device),
                      split=(site.val_fraction, split_seed(site.work_dir)))
    setup = _Setup(site=site, config=config, dataset=dataset, algo=algo,
                   guard=PHIGuard(dataset.phi_values),
                   load_seconds=time.perf_counter() - start)
    _warm[key] = setup
    while len(_warm) > WARM_RUNS:
        del _warm[next(iter(_warm))]
    return setup


def train_outcome(*, run_id: int, node_config: dict[str, Any], run_config: dict[str, Any],
                  global_arrays: list[np.ndarray], server_round: int,
                  masked: bool) -> dict[str, Any]:
    """Train locally with DP-SGD: the update (local - global), its FedAvg weight, metrics.
    `masked` (secure aggregation): the update comes back quantised (common.masking), its
    range checked, never clipped."""
    setup = _setup(run_id, node_config, run_config)
    config, site, algo = setup.config, setup.site, setup.algo
    check_finite(global_arrays)  # the wire form: one packed vector (common.weights)
    algo.set_weights(unpack(global_arrays, algo.get_weights()))

    metrics: dict[str, int | float | list[int] | list[float]] = {}
    noise: float | None = None  # σ this site's ledger charges
    own_noise: float | None = None  # σ of the noise it adds (distributed: its share)
    ledger: PrivacyLedger | None = None
    if config.dp.enabled:
        ledger = PrivacyLedger(site.work_dir / LEDGER_FILE, budget=site.epsilon_budget,
                               delta=site.policy.delta_for(config,
                                                           default_delta(algo.num_train)))
        cohort = algo.cohort
        if config.dp.distributed and not masked:  # its share alone would be sent in the clear
            LOG.warning("round %d refused: dp-mode=distributed without secure aggregation",
                        server_round)
            _audit(site).append("round-refused", run_id=str(run_id), round=server_round,
                                reason="distributed DP unmasked")
            raise policy_refusal(["dp-mode"])
        noise = ledger.run_noise_multiplier(run_id) or plan_noise_multiplier(
            config, num_train=algo.num_train, delta=ledger.delta)
        own_noise = noise * distributed_dp.share(config)
        sample_rate, steps = dp_schedule(config, algo.num_train)
        planned = Session(run_id, server_round, noise, sample_rate, steps,
                          own_noise if config.dp.distributed else None)
        _reserve(ledger, planned, cohort, site)
    else:
        LOG.warning("round %d: differential privacy is OFF for this run (dp-enabled=false)",
                    server_round)

    kept = config.optimizer_state is OptimizerState.KEPT
    run = config.resume_from or str(run_id)  # the run folder a resumed run continues
    if kept:  # the moments after this site's previous round of the run, from its disk
        algo.optimizer_state = optimizer_store.load(site.work_dir, run, server_round)
    result = algo.train(server_round=server_round, noise_multiplier=own_noise)
    if kept and algo.optimizer_state is not None:
        optimizer_store.save(site.work_dir, run, server_round, algo.optimizer_state)
    if ledger is not None and noise is not None:
        if (result.sample_rate, result.steps) != (planned.sample_rate, planned.steps):
            LOG.error("round %d: the accountant counted %d steps at q=%.4f, %d at q=%.4f were "
                      "reserved; the counted session is charged as well (fail closed)",
                      server_round, result.steps, result.sample_rate, planned.steps,
                      planned.sample_rate)
            _reserve(ledger, Session(run_id, server_round, noise, result.sample_rate,
                                     result.steps, planned.floor_noise_multiplier),
                     cohort, site)
        metrics.update({
            keys.EPSILON_TOTAL: ledger.epsilon(cohort),
            keys.EPSILON_ROUND: ledger.epsilon(cohort, run_id),
            keys.EPSILON_BUDGET: site.epsilon_budget,
            keys.DELTA: ledger.delta,
            keys.NOISE_MULTIPLIER: noise,
        })
        if config.dp.distributed:  # what holds if the sum's other sites added nothing
            metrics[keys.EPSILON_FLOOR] = ledger.floor_epsilon(cohort, run_id)
    local = pack(algo.get_weights())
    weight = distributed_dp.fedavg_weight(config, examples=result.num_examples,
                                          patients=len(algo.cohort))  # FedAvg weighting ...
    if config.central_dp.enabled:  # ... or uniform, with each update clipped (central DP)
        compute_clip_model_update(local, global_arrays, config.central_dp.clipping_norm)
        weight = 1
    update = [np.asarray(a, dtype=np.float32) for a in subtract(local, global_arrays)]
    check_finite(update)
    if config.update_dtype is UpdateDType.FLOAT16:  # half the bytes (secure aggregation is off)
        update = [a.astype(np.float16) for a in update]
        check_finite(update)  # beyond float16's ±65504: refused, never sent as Inf
    metrics.update({
        keys.NUM_EXAMPLES: float(result.num_examples),
        **({keys.TRAIN_LOSS: result.loss} if site.policy.share_train_loss else {}),
        keys.TRAIN_SECONDS: result.seconds,
        keys.LOAD_SECONDS: setup.load_seconds,
        keys.UPDATE_NORM: global_norm(update),
    })
    LOG.info("round %d trained: %d examples, %d steps, %.1fs", server_round,
             result.num_examples, result.steps, result.seconds)
    setup.guard.check_record_dict(RecordDict({  # what client.messages will send
        keys.UPDATE: ArrayRecord(update),
        keys.METRICS: MetricRecord(metrics),
        keys.SITE: ConfigRecord({keys.SITE_ID: site.site_id, keys.STATUS: keys.STATUS_OK}),
    }))
    quantised = None
    if masked:
        quantised = quantise(np.concatenate([a.ravel() for a in update]), int(weight),
                             clipping_range=config.secagg.clipping_range,
                             quantization_range=config.secagg.quantization_range,
                             max_weight=config.secagg.max_weight)
    _audit(site).append("update-sent", run_id=str(run_id), round=server_round,
                        bytes=sum(a.nbytes for a in update),
                        sha256=digest_arrays(update),
                        examples=result.num_examples,
                        epsilon_total=metrics.get(keys.EPSILON_TOTAL))
    if quantised is not None:  # the float update never leaves this function unmasked
        return {"quantised": quantised, "metrics": metrics, "site_id": site.site_id}
    return {"update": update, "weight": weight, "metrics": metrics, "site_id": site.site_id}


def _reserve(ledger: PrivacyLedger, planned: Session, cohort: dict[str, int],
             site: SiteConfig) -> None:
    """Charge `planned` to the cohort's patients before training, or refuse the round:
    over the run's cap (max-epsilon-per-run, whatever num-rounds claimed) or over the
    site's total budget. Checked and recorded under the ledger's lock."""
    try:
        ledger.reserve(planned, cohort, run_cap=site.policy.max_epsilon_per_run)
    except RunCapExceeded as exc:
        LOG.warning("round %d refused: %s", planned.server_round, exc)
        _audit(site).append("round-refused", run_id=str(planned.run_id),
                            round=planned.server_round, reason="max-epsilon-per-run")
        raise policy_refusal(["max-epsilon-per-run"]) from exc
    except BudgetExceeded as exc:
        LOG.warning("round %d refused: %s", planned.server_round, exc)
        _audit(site).append("round-refused", run_id=str(planned.run_id),
                            round=planned.server_round, reason="privacy budget")
        raise budget_refusal() from exc


def evaluate_outcome(*, run_id: int, node_config: dict[str, Any], run_config: dict[str, Any],
                     global_arrays: list[np.ndarray], server_round: int) -> dict[str, Any]:
    """The task's metrics of the global model on the held-out patients."""
    setup = _setup(run_id, node_config, run_config)
    check_finite(global_arrays)
    setup.algo.set_weights(unpack(global_arrays, setup.algo.get_weights()))
    result = setup.algo.evaluate()
    metrics: dict[str, int | float | list[int] | list[float]] = {
        keys.EVAL_LOSS: result.loss,
        **result.metrics,
        keys.NUM_EXAMPLES: float(result.num_examples),
        keys.EVAL_SECONDS: result.seconds,
        keys.LOAD_SECONDS: setup.load_seconds,
    }
    setup.guard.check_record_dict(RecordDict({
        keys.METRICS: MetricRecord(metrics),
        keys.SITE: ConfigRecord({keys.SITE_ID: setup.site.site_id, keys.STATUS: keys.STATUS_OK}),
    }))
    LOG.info("round %d evaluated on %d examples", server_round, result.num_examples)
    _audit(setup.site).append("metrics-sent", run_id=str(run_id), round=server_round,
                              names=sorted(metrics))
    return {"metrics": metrics, "site_id": setup.site.site_id}
