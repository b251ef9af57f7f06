"""How a round's updates become the next global model: Flower's Message-API strategies.

fedrad does not reimplement FedAvg, FedProx, FedAdam, FedMedian, FedTrimmedAvg or Krum:
`Aggregator` hands the sites' models (global + update, in the packed wire form of
common.weights) to the matching `flwr.serverapp.strategy` class and reads its result.
Under secure aggregation (or central DP) the server holds only the mean update; the strategy then
sees that one mean as a single reply, which is FedAdam's input; for FedAvg and FedProx the
mean of that one reply is the reply itself, so the strategy is not called.

Before aggregation every individual update is screened (`screen_update`): not finite, the
wrong shape, a non-positive weight or a norm beyond `max-update-norm` is rejected with a
fixed status word, and the round goes on without it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
)

from common import keys
from common.config import RunConfig, Strategy
from common.weights import all_finite, chunks, global_norm

LOG = logging.getLogger("fedrad.server")
_ARRAYS = "arrays"  # record names of the replies handed to the strategy
_METRICS = "metrics"

# Status words of a rejected update (recorded per site and round; never the values).
REJECTED_NOT_FINITE = "rejected-not-finite"
REJECTED_SHAPE = "rejected-shape"
REJECTED_NORM = "rejected-norm"
REJECTED_WEIGHT = "rejected-weight"
REJECTED_MALFORMED = "rejected-malformed"  # a reply without the records a site sends


@dataclass(frozen=True)
class SiteUpdate:
    """One site's update (local - global) in the packed wire form, and its weight."""

    node_id: int
    arrays: list[np.ndarray]
    weight: float


def screen_update(update: SiteUpdate, layout: list[np.ndarray], max_norm: float,
                  max_weight: float = float("inf")) -> str | None:
    """None when the update may be aggregated, else the status word saying why not.

    A site reports its own FedAvg weight (its number of training examples); one above
    `max_weight` would let it dominate the mean, and is rejected."""
    if len(update.arrays) != len(layout) or any(
            a.shape != b.shape for a, b in zip(update.arrays, layout, strict=False)):
        return REJECTED_SHAPE
    if not all(all_finite(a) for a in update.arrays):
        return REJECTED_NOT_FINITE
    if not (np.isfinite(update.weight) and 0 < update.weight <= max_weight):
        return REJECTED_WEIGHT
    if max_norm > 0 and global_norm(update.arrays) > max_norm:
        return REJECTED_NORM
    return None


class UpdatePool:
    """Where a round's individual updates go once screened.

    Mean-based strategies (FedAvg, FedProx, FedAdam) fold each accepted update into one
    running weighted sum as it arrives, so the server holds a single model-sized sum and
    not one model per site; robust strategies and cross-site validation need every
    update, and keep them. `uniform`: every site weighs 1 (central DP's clipped mean).
    """

    def __init__(self, layout: list[np.ndarray], *, max_norm: float, keep: bool,
                 uniform: bool, max_weight: float = float("inf")) -> None:
        self.layout = layout
        self.max_norm = max_norm
        self.max_weight = max_weight
        self.keep = keep
        self.uniform = uniform
        self.kept: list[SiteUpdate] = []
        self.count = 0
        self._sum: list[np.ndarray] | None = None
        self._mean: list[np.ndarray] | None = None
        self._weight = 0.0

    def add(self, update: SiteUpdate) -> str | None:
        """Screen and take `update`; the rejection status word, or None if accepted."""
        reason = screen_update(update, self.layout, self.max_norm, self.max_weight)
        if reason is not None:
            return reason
        if self._mean is not None:
            raise RuntimeError("update pool already averaged; a round's pool takes no more")
        weight = 1.0 if self.uniform else update.weight
        self.count += 1
        self._weight += weight
        if self.keep:
            self.kept.append(update)
            return None
        if self._sum is None:
            # float64: each float32 x weight term is exact and the sum rounds far below
            # float32's precision, so the mean does not depend on the order replies
            # arrived in (a resumed run equals an unbroken one)
            self._sum = [np.zeros_like(a, dtype=np.float64) for a in self.layout]
        for total, array in zip(self._sum, update.arrays, strict=True):
            flat_total, flat = total.reshape(-1), array.reshape(-1)
            for part in chunks(flat):  # no model-sized float64 temporary
                flat_total[part] += np.multiply(flat[part], weight, dtype=np.float64)
        return None

    def mean(self) -> list[np.ndarray]:
        """The weighted mean of the accepted updates."""
        if self.count == 0:
            raise ValueError("no update accepted")
        if self.keep:
            weights = [1.0 if self.uniform else u.weight for u in self.kept]
            return [np.average(np.stack(layer), axis=0, weights=weights).astype(np.float32)
                    for layer in zip(*(u.arrays for u in self.kept), strict=True)]
        if self._mean is None:
            assert self._sum is not None
            # divided in float64 and rounded once into float32, with no float64 temporary;
            # the sum (twice the model) is dropped: the mean is all a folding pool gives
            self._mean = [np.divide(total, self._weight, out=np.empty(total.shape, np.float32),
                                    casting="same_kind") for total in self._sum]
            self._sum = None
        return self._mean

    def contributions(self) -> list[SiteUpdate]:
        """What the strategy aggregates: every update (in node order), or their mean."""
        if self.count == 0:
            return []
        if self.keep:
            return sorted(self.kept, key=lambda u: u.node_id)
        return [SiteUpdate(0, self.mean(), self._weight)]


def build_strategy(config: RunConfig) -> FedAvg:
    """The Flower strategy named by the run config (sampling is fedrad's, not its)."""
    common = {"weighted_by_key": keys.NUM_EXAMPLES, "arrayrecord_key": _ARRAYS,
              "min_train_nodes": config.faults.min_train_sites,
              "train_metrics_aggr_fn": _no_metrics}
    settings = config.strategy
    name = settings.name
    if name is Strategy.FEDAVG:
        return FedAvg(**common)  # type: ignore[arg-type]
    if name is Strategy.FEDPROX:
        return FedProx(**common, proximal_mu=settings.proximal_mu)  # type: ignore[arg-type]
    if name is Strategy.FEDADAM:
        return FedAdam(**common, eta=settings.server_learning_rate)  # type: ignore[arg-type]
    if name is Strategy.FEDMEDIAN:
        return FedMedian(**common)  # type: ignore[arg-type]
    if name is Strategy.FEDTRIMMEDAVG:
        return FedTrimmedAvg(**common, beta=settings.trim_fraction)  # type: ignore[arg-type]
    return Krum(**common, num_malicious_nodes=settings.krum_byzantine)  # type: ignore[arg-type]


def _no_metrics(contents: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Site metrics are kept per site by the ServerApp, not averaged by the strategy."""
    return MetricRecord()


def _record(arrays: list[np.ndarray]) -> ArrayRecord:
    return ArrayRecord({str(i): Array(np.asarray(a, dtype=np.float32))
                        for i, a in enumerate(arrays)})


_MEAN_OF_ONE_IS_ITSELF = frozenset({Strategy.FEDAVG, Strategy.FEDPROX})


class Aggregator:
    """One run's strategy, with the state it carries between rounds (FedAdam's moments)."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.strategy = build_strategy(config)

    @property
    def needs_every_update(self) -> bool:
        """Robust rules look at each update; the others need only their weighted mean."""
        return self.config.strategy.name.needs_individual_updates

    def next_global(self, server_round: int, global_arrays: list[np.ndarray],
                    updates: list[SiteUpdate]) -> list[np.ndarray]:
        """The strategy's new global model from the screened updates (or one mean)."""
        if not updates:
            raise ValueError("no update to aggregate")
        if len(updates) == 1 and self.config.strategy.name in _MEAN_OF_ONE_IS_ITSELF:
            # FedAvg's (and FedProx's) weighted mean of one model is that model; Flower's
            # strategy would only copy it about four times (records, bytes, result).
            return [np.add(g, u, dtype=np.float32)
                    for g, u in zip(global_arrays, updates[0].arrays, strict=True)]
        replies = [
            Message(RecordDict({
                _ARRAYS: _record([g + u for g, u in zip(global_arrays, update.arrays,
                                                        strict=True)]),
                _METRICS: MetricRecord({keys.NUM_EXAMPLES: float(update.weight)}),
            }), dst_node_id=update.node_id, message_type=MessageType.TRAIN)
            for update in updates
        ]
        if isinstance(self.strategy, FedAdam):  # what its configure_train would record
            self.strategy.current_arrays = {str(i): np.asarray(a, dtype=np.float32)
                                            for i, a in enumerate(global_arrays)}
        arrays, _ = self.strategy.aggregate_train(server_round, replies)
        if arrays is None:
            raise ValueError(f"strategy {self.config.strategy.name.value} gave no model")
        out = [np.asarray(arrays[str(i)].numpy(), dtype=np.float32)
               for i in range(len(global_arrays))]
        return out

    def state(self) -> dict[str, np.ndarray]:
        """What must survive a restart for the next round to equal an unbroken run's."""
        out: dict[str, np.ndarray] = {}
        if isinstance(self.strategy, FedAdam):
            for name in ("m_t", "v_t"):
                moments = getattr(self.strategy, name)
                for key, value in (moments or {}).items():
                    out[f"{name}.{key}"] = np.asarray(value)
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        if isinstance(self.strategy, FedAdam):
            for name in ("m_t", "v_t"):
                moments = {key.split(".", 1)[1]: value for key, value in state.items()
                           if key.startswith(name + ".")}
                setattr(self.strategy, name, moments or None)
