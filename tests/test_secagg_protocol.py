"""SecAgg+ as fedrad runs it (common/secagg.py: Flower's workflow at the server, Flower's
secaggplus_mod behind our site mod), every stage exchanged for real through a loopback
Grid; only the sites' updates are fixed numbers (what a site would send).

Tolerance: each site's update, scaled by its weight r = n/max_weight, is quantised to the
grid S = 2·C/(Q−1) over [−C, C] (C = secagg-clipping-range 8, Q = secagg-quantization-range
2^22: S = 3.8e-6), so the masked sum is off by at most k·S/2 for k sites and the weighted
mean, divided by Σr, by k·S/(2·Σr). The test allows twice that: k·S/Σr (here about 2e-5
for 4 sites of 20-300 examples with max_weight 1000).
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.common.secure_aggregation.quantization import quantize
from flwr.server.workflow import SecAggPlusWorkflow

import common.secagg as secagg
from common.config import RunConfig
from tests.secagg_loopback import SEEN_BY_SERVER, LoopbackGrid, site

SETTINGS = RunConfig.from_mapping({}).secagg
STEP = 2 * SETTINGS.clipping_range / (SETTINGS.quantization_range - 1)
SHAPES = [(3, 4), (5,)]


def _round(updates, examples, drop_at: dict[int, str]):
    grid = LoopbackGrid({node: site(node, updates[node], examples[node], drop_at.get(node))
                         for node in updates})
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    globals_ = [np.zeros(s, dtype=np.float32) for s in SHAPES]
    return secagg.run_secagg_round(grid, context, server_round=1, global_arrays=globals_,
                                   node_ids=sorted(updates), fit_config={}, settings=SETTINGS,
                                   timeout=5.0)


def _sites(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    updates = {node: [rng.uniform(-0.5, 0.5, s).astype(np.float32) for s in SHAPES]
               for node in range(11, 11 + count)}
    examples = {node: int(rng.integers(20, 300)) for node in updates}
    return updates, examples


def _fedavg(updates, examples, nodes):
    weights = np.array([examples[n] for n in nodes], dtype=np.float64)
    return [np.average(np.stack([updates[n][i] for n in nodes]), axis=0, weights=weights)
            for i in range(len(SHAPES))]


@pytest.fixture(autouse=True)
def _identity(task_identity):
    return


@pytest.mark.parametrize("drop_at", [
    {},                                    # everyone
    {14: "collect_masked_vectors"},        # killed after key sharing: its shares unmask
    {14: "share_keys"},                    # dropped before it shared keys
    {14: "setup"},                         # never answered
])
def test_the_aggregate_is_fedavg_of_the_sites_that_finished(drop_at) -> None:
    updates, examples = _sites(4)
    outcome = _round(updates, examples, drop_at)
    finished = [n for n in updates if n not in drop_at]
    assert sorted(outcome.site_metrics) == finished
    expected = _fedavg(updates, examples, finished)
    error = max(float(np.max(np.abs(a - e))) for a, e in zip(outcome.aggregate, expected,
                                                              strict=True))
    bound = len(finished) * STEP / (sum(examples[n] for n in finished) / SETTINGS.max_weight)
    assert error < bound, f"{error:.3g} vs bound {bound:.3g}"
    wrong = _fedavg(updates, examples, list(updates))  # had the dropped site counted
    if drop_at:
        assert max(float(np.max(np.abs(a - w))) for a, w in
                   zip(outcome.aggregate, wrong, strict=True)) > 100 * bound


def test_the_server_never_receives_an_update_in_the_clear() -> None:
    """What each site uploads is its quantised update plus masks mod 2^32: no entry equals
    the site's quantised weighted update (a chance of 2^-32 each), yet the sum unmasks."""
    SEEN_BY_SERVER.clear()
    updates, examples = _sites(4, seed=3)
    outcome = _round(updates, examples, {})
    assert outcome.aggregate is not None and sorted(SEEN_BY_SERVER) == sorted(updates)
    for node, uploaded in SEEN_BY_SERVER.items():
        ratio = examples[node] / SETTINGS.max_weight
        clear = quantize([u * ratio for u in updates[node]], SETTINGS.clipping_range,
                         SETTINGS.quantization_range)
        # uploaded[0] carries the weight factor; the parameters follow it
        for masked, plain in zip(uploaded[1:], clear, strict=True):
            assert masked.shape == plain.shape
            assert np.mean(masked == plain) < 0.01


def test_flowers_own_workflow_sinks_the_round_on_an_early_dropout(monkeypatch) -> None:
    """Why common/secagg.py subclasses the workflow: with flwr 1.42's own, a site that
    drops before sharing its keys is listed as dead at unmask, the survivors have no
    share of it, and the round yields no aggregate."""
    monkeypatch.setattr(secagg, "_DropoutSafeSecAggPlus", SecAggPlusWorkflow)
    updates, examples = _sites(4)
    try:
        outcome = _round(updates, examples, {14: "share_keys"})
    except KeyError:
        return  # the survivors' unmask failed on the missing share
    assert outcome.aggregate is None


def test_below_the_reconstruction_threshold_there_is_no_aggregate() -> None:
    """Two of four sites gone after key sharing: 2 < threshold (2/3 of 4 → 3); the server
    gets nothing, not a partial or unmasked sum."""
    updates, examples = _sites(4)
    outcome = _round(updates, examples, {13: "collect_masked_vectors",
                                         14: "collect_masked_vectors"})
    assert outcome.aggregate is None
    assert outcome.site_metrics == {}
