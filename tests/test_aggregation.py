"""Strategies from config (Flower's, wrapped) and the screening of individual updates."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import ConfigError, RunConfig
from common.weights import CHUNK, global_norm
from server.aggregation import (
    REJECTED_NORM,
    REJECTED_NOT_FINITE,
    REJECTED_SHAPE,
    REJECTED_WEIGHT,
    Aggregator,
    SiteUpdate,
    UpdatePool,
    screen_update,
)

pytestmark = pytest.mark.usefixtures("task_identity")  # Messages are made here
PLAIN = {"secagg-enabled": False, "min-sites": 4, "min-train-sites": 4}
GLOBAL = [np.linspace(-1, 1, 12, dtype=np.float32)]


def _updates(seed: int = 0, hostile: float | None = None) -> list[SiteUpdate]:
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 0.01, 12).astype(np.float32)
    out = [SiteUpdate(n, [base + rng.normal(0, 0.001, 12).astype(np.float32)], w)
           for n, w in zip((1, 2, 3, 4), (10.0, 20.0, 30.0, 40.0), strict=True)]
    if hostile is not None:
        out[3] = SiteUpdate(4, [out[3].arrays[0] * hostile], 40.0)
    return out


def _aggregate(config: dict, updates: list[SiteUpdate], server_round: int = 1) -> np.ndarray:
    aggregator = Aggregator(RunConfig.from_mapping({**PLAIN, **config}))
    return aggregator.next_global(server_round, GLOBAL, updates)[0]


def test_fedavg_and_fedprox_are_the_example_weighted_mean() -> None:
    updates = _updates()
    expected = GLOBAL[0] + np.average([u.arrays[0] for u in updates], axis=0,
                                      weights=[u.weight for u in updates])
    for name in ("fedavg", "fedprox"):
        np.testing.assert_allclose(_aggregate({"strategy": name}, updates), expected,
                                   atol=1e-6)


def test_a_single_pre_averaged_update_gives_what_flowers_fedavg_gives() -> None:
    """SecAgg+ and the folding pool hand over one mean. FedAvg of one model is that model
    (fedrad skips Flower's strategy there); Flower's FedMedian of it agrees."""
    mean = SiteUpdate(0, [np.random.default_rng(3).normal(0, 0.01, 12).astype(np.float32)],
                      70.0)
    expected = GLOBAL[0] + mean.arrays[0]
    for name in ("fedavg", "fedprox"):
        got = _aggregate({"strategy": name}, [mean])
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_allclose(_aggregate({"strategy": "fedmedian"}, [mean]), expected,
                               atol=1e-7)  # Flower's own strategy, same single reply


def test_fedmedian_and_trimmed_mean_follow_their_definitions() -> None:
    updates = _updates(hostile=100.0)
    models = np.stack([GLOBAL[0] + u.arrays[0] for u in updates])
    np.testing.assert_allclose(_aggregate({"strategy": "fedmedian"}, updates),
                               np.median(models, axis=0), atol=1e-6)
    trimmed = np.sort(models, axis=0)[1:3].mean(axis=0)  # 25 % cut at each end of 4
    np.testing.assert_allclose(
        _aggregate({"strategy": "fedtrimmedavg", "trim-fraction": 0.25}, updates), trimmed,
        atol=1e-6)


def test_krum_picks_an_honest_update_and_fedavg_is_dragged_by_a_scaled_one() -> None:
    updates = _updates(hostile=100.0)
    honest = [GLOBAL[0] + u.arrays[0] for u in updates[:3]]
    chosen = _aggregate({"strategy": "krum", "krum-byzantine": 1}, updates)
    assert any(np.allclose(chosen, h, atol=1e-6) for h in honest)
    dragged = _aggregate({"strategy": "fedavg"}, updates)
    assert np.linalg.norm(dragged - GLOBAL[0]) > 10 * np.linalg.norm(chosen - GLOBAL[0])


def test_fedadam_state_saved_after_round_two_gives_round_three_exactly() -> None:
    config = RunConfig.from_mapping({**PLAIN, "strategy": "fedadam",
                                     "server-learning-rate": 0.05})
    unbroken, weights = Aggregator(config), list(GLOBAL)
    for server_round in (1, 2):
        weights = unbroken.next_global(server_round, weights, _updates(server_round))
    resumed = Aggregator(config)
    resumed.load_state(unbroken.state())
    after_unbroken = unbroken.next_global(3, weights, _updates(3))[0]
    after_resumed = resumed.next_global(3, weights, _updates(3))[0]
    np.testing.assert_array_equal(after_resumed, after_unbroken)
    fresh = Aggregator(config).next_global(3, weights, _updates(3))[0]
    assert not np.allclose(fresh, after_unbroken)  # the moments matter: state is needed


@pytest.mark.parametrize(("update", "max_norm", "reason"), [
    (SiteUpdate(1, [np.full(12, np.nan, np.float32)], 5.0), 0.0, REJECTED_NOT_FINITE),
    (SiteUpdate(1, [np.full(12, np.inf, np.float32)], 5.0), 0.0, REJECTED_NOT_FINITE),
    (SiteUpdate(1, [np.zeros(11, np.float32)], 5.0), 0.0, REJECTED_SHAPE),
    (SiteUpdate(1, [np.zeros(12, np.float32)] * 2, 5.0), 0.0, REJECTED_SHAPE),
    (SiteUpdate(1, [np.ones(12, np.float32)], 5.0), 3.0, REJECTED_NORM),  # norm 3.46
    (SiteUpdate(1, [np.ones(12, np.float32)], 0.0), 0.0, REJECTED_WEIGHT),
    (SiteUpdate(1, [np.ones(12, np.float32)], float("nan")), 0.0, REJECTED_WEIGHT),
    (SiteUpdate(1, [np.ones(12, np.float32)], 5.0), 3.5, None),
])
def test_screening(update: SiteUpdate, max_norm: float, reason: str | None) -> None:
    assert screen_update(update, GLOBAL, max_norm) == reason


@pytest.mark.parametrize(("values", "named"), [
    ({"strategy": "krum"}, "secure aggregation hides"),
    ({"strategy": "fedmedian", "secagg-enabled": False, "central-dp-enabled": True},
     "central DP"),
    ({"max-update-norm": 5.0}, "max-update-norm"),
    ({"strategy": "krum", "secagg-enabled": False, "min-sites": 3, "min-train-sites": 3},
     "min-train-sites to 4"),
    ({"min-train-sites": 4}, "min-train-sites (4) must be <= min-sites (3)"),
    ({"strategy": "fedyogi"}, "strategy must be one of"),
    ({"trim-fraction": 0.5, "secagg-enabled": False}, "trim-fraction"),
    ({"evaluate-every": 0}, "evaluate-every must be >= 1"),
    ({"cross-site-validation": True}, "secure aggregation exists to hide it"),
    ({"cross-site-validation": True, "secagg-enabled": False, "dp-enabled": False},
     "without DP"),
    ({"max-sites-in-flight": 4}, "every site of the set in the same exchange"),
    ({"max-sites-in-flight": -1, "secagg-enabled": False}, "max-sites-in-flight"),
])
def test_strategy_settings_that_would_protect_or_aggregate_less_are_refused(
        values: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(")", r"\)")
                       .replace("+", r"\+")):
        RunConfig.from_mapping(values)


def test_evaluation_every_n_rounds_includes_the_last() -> None:
    config = RunConfig.from_mapping({"num-rounds": 5, "evaluate-every": 2})
    assert [r for r in range(1, 6) if config.should_evaluate(r)] == [2, 4, 5]


@pytest.mark.parametrize("keep", [False, True])
def test_the_update_pool_gives_the_weighted_mean_whether_it_keeps_or_folds(keep: bool) -> None:
    updates = _updates(seed=3)
    pool = UpdatePool(GLOBAL, max_norm=0.0, keep=keep, uniform=False)
    for update in reversed(updates):  # arrival order does not matter
        assert pool.add(update) is None
    assert pool.add(SiteUpdate(9, [np.full(12, np.nan, np.float32)], 1.0)) == REJECTED_NOT_FINITE
    expected = np.average([u.arrays[0] for u in updates], axis=0,
                          weights=[u.weight for u in updates])
    np.testing.assert_allclose(pool.mean()[0], expected, rtol=1e-6)
    assert pool.count == 4
    assert len(pool.contributions()) == (4 if keep else 1)
    assert len(pool.kept) == (4 if keep else 0)  # folding holds no update


def test_a_uniform_pool_weighs_every_site_the_same() -> None:
    updates = _updates(seed=4)
    pool = UpdatePool(GLOBAL, max_norm=0.0, keep=False, uniform=True)
    for update in updates:
        pool.add(update)
    np.testing.assert_allclose(pool.mean()[0], np.mean([u.arrays[0] for u in updates], axis=0),
                               rtol=1e-6)


def test_a_model_larger_than_a_slice_is_summed_screened_and_measured_exactly() -> None:
    """The pool, the screen and the norms work slice by slice (no model-sized float64
    temporary): the results equal the whole-array computation, and a NaN in the last
    slice is still found."""
    size = 2 * CHUNK + 12345
    rng = np.random.default_rng(5)
    layout = [np.zeros(size, dtype=np.float32)]
    updates = [SiteUpdate(n, [rng.normal(0, 0.01, size).astype(np.float32)], w)
               for n, w in ((1, 3.0), (2, 5.0), (3, 11.0))]
    pool = UpdatePool(layout, max_norm=0.0, keep=False, uniform=False)
    for update in updates:
        assert pool.add(update) is None
    total = sum(u.arrays[0].astype(np.float64) * u.weight for u in updates)
    np.testing.assert_array_equal(pool.mean()[0], (total / 19.0).astype(np.float32))
    first, second = updates[0].arrays[0], updates[1].arrays[0]
    expected = np.linalg.norm(first.astype(np.float64) - second.astype(np.float64))
    assert global_norm([first], minus=[second]) == pytest.approx(expected, rel=1e-12)
    assert global_norm([first]) == pytest.approx(np.linalg.norm(first.astype(np.float64)),
                                                 rel=1e-12)
    poisoned = first.copy()
    poisoned[-1] = np.nan
    assert screen_update(SiteUpdate(4, [poisoned], 1.0), layout, 0.0) == REJECTED_NOT_FINITE
    assert screen_update(SiteUpdate(4, [first], 1.0), layout,
                         max_norm=0.99 * global_norm([first])) == REJECTED_NORM
