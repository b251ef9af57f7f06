"""The one adapter between fedrad's Message-API code and Flower's legacy SecAgg+.

In flwr 1.42 SecAgg+ exists only as the legacy `SecAggPlusWorkflow` (server,
needs a `LegacyContext` and a legacy `Strategy`) and `secaggplus_mod` (site,
speaks the legacy fitins/fitres record layout). Everything that knows about
that legacy API lives in this module; the ServerApp and ClientApp only call
`run_secagg_round`, `CLIENT_MODS`, `is_legacy_train`, `unpack_legacy_train`
and `pack_legacy_reply`. Chosen over porting the stages onto the Grid because
it reuses Flower's audited protocol code unchanged; the cost is one module of
glue. Sites mask their *update* (local - global), never full weights, and check
it fits the clipping range instead of letting the quantiser clip silently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.server_config import ServerConfig
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid

from common.config import SecAggConfig

LOG = logging.getLogger("fedrad.secagg")



class SecAggRequiredError(RuntimeError):
    """A plain (unmasked) training request in a run whose config asks for SecAgg+."""


def secagg_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Flower's `secaggplus_mod` for training messages that carry its stages.

    A plain training message passes only when the run's own config turned SecAgg+
    off (`secagg-enabled = false`); otherwise it is refused, so a server cannot
    quietly collect an unmasked update from a run that promised masking.
    """
    if (msg.metadata.message_type == MessageType.TRAIN
            and RECORD_KEY_CONFIGS not in msg.content.config_records):
        if ctxt.run_config.get("secagg-enabled", True) is not False:
            raise SecAggRequiredError("plain training request in a SecAgg+ run")
        return call_next(msg, ctxt)
    return secaggplus_mod(msg, ctxt, call_next)


CLIENT_MODS = (secagg_mod,)
_FITINS_PARAMS = "fitins.parameters"
_FITINS_CONFIG = "fitins.config"
_MAIN_CONFIG = "config"  # flwr.server.workflow.constant.MAIN_CONFIGS_RECORD
_MAIN_PARAMS = "parameters"  # flwr.server.workflow.constant.MAIN_PARAMS_RECORD


class SecAggRangeError(ValueError):
    """A masked update would not fit SecAgg+'s quantisation range."""


# ---------------------------------------------------------------- server side
@dataclass
class SecAggOutcome:
    """What one SecAgg+ round gave the server: the aggregate and per-site metadata."""

    aggregate: list[np.ndarray] | None = None
    site_metrics: dict[int, dict[str, Any]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


class _RoundStrategy(Strategy):  # type: ignore[misc]
    """A legacy Strategy that only hands the workflow our fit instructions back."""

    def __init__(self, grid: Grid, node_ids: list[int], fit_config: dict[str, Any],
                 outcome: SecAggOutcome) -> None:
        self._grid = grid
        self._node_ids = node_ids
        self._fit_config = fit_config
        self._outcome = outcome

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: Any) -> list[tuple[ClientProxy, FitIns]]:
        run_id = self._grid.run.run_id
        return [
            (GridClientProxy(node_id, self._grid, run_id), FitIns(parameters, self._fit_config))
            for node_id in self._node_ids
        ]

    def aggregate_fit(self, server_round: int, results: list[tuple[Any, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Any]]:
        for proxy, fit_res in results:
            self._outcome.site_metrics[proxy.node_id] = dict(fit_res.metrics)
        self._outcome.failures.extend(str(failure) for failure in failures)
        if not results:
            return None, {}
        # After unmasking every result carries the same aggregated vector.
        self._outcome.aggregate = parameters_to_ndarrays(results[0][1].parameters)
        return results[0][1].parameters, {}

    # The workflow calls nothing else; these complete the abstract interface.
    def initialize_parameters(self, client_manager: Any) -> None:
        return None

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: Any) -> list[Any]:
        return []

    def aggregate_evaluate(self, server_round: int, results: list[Any],
                           failures: list[Any]) -> tuple[None, dict[str, Any]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None


class _DropoutSafeSecAggPlus(SecAggPlusWorkflow):  # type: ignore[misc]
    """Flower's SecAgg+ workflow with the unmask stage's dead set corrected.

    flwr 1.42 computes the dead nodes of the unmask stage as sampled − active, so a
    site that drops before it has distributed its key shares (during setup or
    share-keys) is listed as dead, and every surviving site then fails looking up a
    share it never received (KeyError in `secaggplus_mod._unmask`): one early dropout
    sinks the whole round. The protocol's dead set is U2 − U3: sites that shared keys
    but sent no masked vector. Survivors only masked pairwise with sites whose shares
    they received, so after share-keys the sampled set, and every site's neighbour set
    (whose pairwise masks the server removes for a dead site), are narrowed to those
    sites. Two dead sites' masks with each other cancel in Flower's unmask loop.
    """

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        ok = bool(super().share_keys_stage(grid, context, state))
        shared = set(state.active_node_ids)
        state.sampled_node_ids = shared
        for node in list(state.nid_to_neighbours):
            state.nid_to_neighbours[node] = state.nid_to_neighbours[node] & shared
        return ok


def run_secagg_round(grid: Grid, context: Context, *, server_round: int,
                     global_arrays: list[np.ndarray], node_ids: list[int],
                     fit_config: dict[str, Any], settings: SecAggConfig,
                     timeout: float) -> SecAggOutcome:
    """One SecAgg+ training round; the server only ever sees the weighted mean update."""
    outcome = SecAggOutcome()
    strategy = _RoundStrategy(grid, node_ids, fit_config, outcome)
    legacy = LegacyContext(
        context,
        config=ServerConfig(num_rounds=1),
        strategy=strategy,
        client_manager=SimpleClientManager(),
    )
    parameters = ndarrays_to_parameters(global_arrays)
    legacy.state.array_records[_MAIN_PARAMS] = compat.parameters_to_arrayrecord(parameters, True)
    legacy.state.config_records[_MAIN_CONFIG] = ConfigRecord({"current_round": server_round})
    workflow = _DropoutSafeSecAggPlus(
        num_shares=1.0,  # every sampled site holds a share of every other's keys
        reconstruction_threshold=2 / 3,  # survives a third of the sites dropping out
        max_weight=settings.max_weight,
        clipping_range=settings.clipping_range,
        quantization_range=settings.quantization_range,
        timeout=timeout,
    )
    workflow(grid, legacy)
    # Do not keep the (aggregate) weights in the ServerApp's context state.
    legacy.state.array_records.pop(_MAIN_PARAMS, None)
    return outcome


# ------------------------------------------------------------------ site side
def is_legacy_train(message: Message) -> bool:
    """True for the SecAgg+ workflow's training message (legacy fitins layout)."""
    return _FITINS_PARAMS in message.content.array_records


def unpack_legacy_train(message: Message) -> tuple[list[np.ndarray], dict[str, Any]]:
    """The global weights and fit config of a SecAgg+ training message."""
    fit_ins = compat.recorddict_to_fitins(message.content, keep_input=True)
    return parameters_to_ndarrays(fit_ins.parameters), dict(fit_ins.config)


def check_range(update: list[np.ndarray], num_examples: int, settings: SecAggConfig) -> None:
    """Refuse an update the quantiser would clip (it must be masked unchanged)."""
    ratio = num_examples / settings.max_weight
    if ratio > 1:
        raise SecAggRangeError(
            f"num-examples {num_examples} exceeds secagg-max-weight {settings.max_weight:g}; "
            "raise secagg-max-weight in the run config"
        )
    peak = max(float(np.max(np.abs(a))) for a in update) * ratio
    if peak > settings.clipping_range:
        raise SecAggRangeError(
            f"weighted update peak {peak:.3g} exceeds secagg-clipping-range "
            f"{settings.clipping_range:g}; raise it or lower the learning rate"
        )


def pack_legacy_reply(message: Message, update: list[np.ndarray], num_examples: int,
                      metrics: dict[str, Any]) -> Message:
    """Our (already PHI-checked) update and metrics in the layout secaggplus_mod masks."""
    fit_res = FitRes(
        status=Status(code=Code.OK, message="ok"),
        parameters=ndarrays_to_parameters(update),
        num_examples=num_examples,
        metrics=metrics,
    )
    content: RecordDict = compat.fitres_to_recorddict(fit_res, keep_input=False)
    return Message(content, reply_to=message)


__all__ = [
    "CLIENT_MODS",
    "SecAggOutcome",
    "SecAggRangeError",
    "check_range",
    "is_legacy_train",
    "pack_legacy_reply",
    "run_secagg_round",
    "unpack_legacy_train",
]
