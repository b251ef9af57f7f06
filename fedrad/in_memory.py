"""A federation in one process, for judging recipes: the sites' own local algorithms
(client.training) and the server's own strategies (server.aggregation), with weights moving
in memory instead of over Flower. The deployment tests cover the transport; this module
lets a benchmark compare, in one run and on the same validation patients:

- `train_federated`: the run config's rounds x local epochs at every site, aggregated by
  the run's strategy (FedAvg weighted by training examples, FedAdam, ...);
- `train_pooled`: the same model, preprocessing and augmentation trained centrally on the
  union of the sites' training patients (one optimiser throughout, as pooled training is);
- `train_single`: one site's patients only, for as many epochs as the federation trains.

Every model is scored by `pooled_score`: the task's headline metric at each site's
validation patients, averaged weighted by their number (what the ServerApp records).
With dp-enabled, each site trains with DP-SGD at the noise that spends its target ε over
the run's planned rounds (as a site plans it); pooled and single-site trainings never use DP.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from client import distributed_dp
from client.dataset import DataSpec, load_site_dataset
from client.training import (
    ClassificationAlgo,
    SegmentationAlgo,
    build_algo,
    default_delta,
    plan_noise_multiplier,
)
from common import keys
from common.config import PHANTOM_PRIOR, OptimizerState, RunConfig
from common.models import build_model, load_pretrained
from common.weights import pack, subtract, unpack
from server.aggregation import Aggregator, SiteUpdate, UpdatePool

Algo = SegmentationAlgo | ClassificationAlgo


@dataclass
class Curve:
    """A training's pooled validation score after each round (or epoch)."""

    scores: list[float] = field(default_factory=list)
    seconds: float = 0.0
    best_weights: list[np.ndarray] = field(default_factory=list)  # of the best round

    def add(self, score: float, weights: list[np.ndarray]) -> None:
        if not self.scores or score > self.best:
            self.best_weights = [np.array(a, copy=True) for a in weights]
        self.scores.append(score)

    @property
    def best(self) -> float:
        return max(self.scores)

    @property
    def best_round(self) -> int:
        return int(np.argmax(self.scores)) + 1


def load_sites(config: RunConfig, data_root: Path, cache: Path) -> dict[str, Algo]:
    """Every site folder under `data_root`, its patients split by the run's val-fraction
    and seed (so pooled and federated trainings hold out the same patients). A later
    training may use another config of the same task and image size: each training
    sets its own on the sites."""
    spec = DataSpec(task=config.task, image_size=config.image_size,
                    voi_window=config.voi_window, labels=config.labels,
                    foreground=config.foreground)
    sites = {}
    for folder in sorted(p for p in data_root.iterdir() if p.is_dir()):
        dataset = load_site_dataset(folder, cache / folder.name, spec)
        sites[folder.name] = build_algo(config, dataset, torch.device("cpu"))
    if len(sites) < 2:
        raise ValueError(f"{data_root}: expected a folder per site, found {len(sites)}")
    return sites


def pooled_score(sites: dict[str, Algo], weights: list[np.ndarray], metric: str) -> float:
    """`metric` of `weights` at every site's validation patients, weighted by their number."""
    total = count = 0.0
    for algo in sites.values():
        algo.set_weights(weights)
        result = algo.evaluate()
        if metric in result.metrics:
            total += result.metrics[metric] * result.num_examples
            count += result.num_examples
    return total / count if count else float("nan")


def train_federated(config: RunConfig, sites: dict[str, Algo],
                    on_round: Callable[[int, float], None] | None = None) -> Curve:
    """`num-rounds` rounds of local training at every site and the run's strategy."""
    metric = keys.headline_metric(config.task)
    _task_identity()
    aggregator = Aggregator(config)
    first = next(iter(sites.values()))
    # the server's starting point: the seeded initial model (or a prior), never what the
    # sites' models hold from an earlier training in this process
    first.model.load_state_dict(build_model(config).state_dict())
    if config.init_weights == PHANTOM_PRIOR:
        raise ValueError(f"init-weights = \"{PHANTOM_PRIOR}\" is made at submission "
                         "(fedrad.pretrain.resolve_prior); pass the file it made")
    if config.init_weights:
        load_pretrained(first.model, Path(config.init_weights).expanduser())
    global_arrays = pack(first.get_weights())
    layout = first.get_weights()
    for algo in sites.values():
        algo.optimizer_state = None
        algo.config = config  # the run's recipe (lr, epochs, dp-trainable, ...) at every site
    noise = {name: plan_noise_multiplier(config, num_train=algo.num_train,
                                         delta=default_delta(algo.num_train))
             * distributed_dp.share(config)  # a site's own noise (distributed: σ/√K)
             if config.dp.enabled else None for name, algo in sites.items()}
    curve = Curve()
    start = time.perf_counter()
    for server_round in range(1, config.num_rounds + 1):
        pool = UpdatePool(global_arrays, max_norm=0.0, keep=aggregator.needs_every_update,
                          uniform=False)
        for node, (name, algo) in enumerate(sites.items(), start=1):
            algo.set_weights(unpack(global_arrays, layout))
            result = algo.train(server_round=server_round, noise_multiplier=noise[name])
            update = subtract(pack(algo.get_weights()), global_arrays)
            weight = distributed_dp.fedavg_weight(config, examples=result.num_examples,
                                                  patients=len(algo.cohort))
            if pool.add(SiteUpdate(node, update, float(weight))) is not None:
                raise RuntimeError(f"round {server_round}: an update was rejected")
        global_arrays = aggregator.next_global(server_round, global_arrays,
                                               pool.contributions())
        weights = unpack(global_arrays, layout)
        curve.add(pooled_score(sites, weights, metric), weights)
        if on_round is not None:
            on_round(server_round, curve.scores[-1])
    curve.seconds = time.perf_counter() - start
    return curve


def _task_identity() -> None:
    """What a SuperLink sets before a ServerApp makes Messages (Flower's strategies do)."""
    from flwr.supercore.task_identity import TaskIdentity

    try:
        TaskIdentity.run_id  # noqa: B018 - raises when unset
    except RuntimeError:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def train_pooled(config: RunConfig, sites: dict[str, Algo], epochs: int,
                 on_epoch: Callable[[int, float], None] | None = None) -> Curve:
    """The same model trained centrally on every site's training patients together."""
    return _central(config, sites, list(sites), epochs, on_epoch)


def train_single(config: RunConfig, sites: dict[str, Algo], site: str, epochs: int) -> Curve:
    """One site's patients only, scored on every site's validation patients."""
    return _central(config, sites, [site], epochs, None)


def _central(config: RunConfig, sites: dict[str, Algo], train_on: list[str], epochs: int,
             on_epoch: Callable[[int, float], None] | None) -> Curve:
    metric = keys.headline_metric(config.task)
    central_config = dataclasses.replace(config, local_epochs=1,
                                         optimizer_state=OptimizerState.KEPT)
    algo = copy.copy(sites[train_on[0]])  # its loss and evaluation, a model of its own
    algo.config = central_config
    algo.model = build_model(central_config)  # the sites' seeded initial weights
    algo.optimizer_state = None
    algo.train_set = TensorDataset(*(torch.cat(parts) for parts in zip(
        *(sites[s].train_set.tensors for s in train_on), strict=True)))
    curve = Curve()
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        algo.train(server_round=epoch, noise_multiplier=None)
        weights = algo.get_weights()
        curve.add(pooled_score(sites, weights, metric), weights)
        if on_epoch is not None:
            on_epoch(epoch, curve.scores[-1])
    curve.seconds = time.perf_counter() - start
    return curve
