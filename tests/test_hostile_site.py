"""A hostile site cannot crash or dominate a plain (no-SecAgg) round: the server's round
code screens what each reply carries, whatever a site sends (fakes of a hostile site's
replies; the server code is the real train_round and UpdatePool)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from common import keys
from common.config import RunConfig
from server.aggregation import REJECTED_WEIGHT, UpdatePool
from server.polling_grid import PollingGrid
from server.rounds import REJECTED_MALFORMED, train_round
from tests.inprocess import InProcessGrid

pytestmark = pytest.mark.usefixtures("task_identity")
CONFIG = RunConfig.from_mapping({"secagg-enabled": False, "min-sites": 3,
                                 "min-train-sites": 2, "round-timeout": 10.0})
GLOBAL = [np.zeros(6, np.float32)]


def _site(update: np.ndarray, examples: float):
    def handle(message: Message) -> Message:
        return Message(RecordDict({
            keys.UPDATE: ArrayRecord([update]),
            keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: examples}),
            keys.SITE: ConfigRecord({keys.SITE_ID: "x", keys.STATUS: keys.STATUS_OK}),
        }), reply_to=message)
    return handle


def _round(hostile) -> tuple[dict[int, str], np.ndarray]:
    honest = np.full(6, 0.1, np.float32)
    grid = PollingGrid(InProcessGrid({1: _site(honest, 10.0), 2: _site(honest * 3, 10.0),
                                      3: hostile}), interval=0.01)
    pool = UpdatePool(GLOBAL, max_norm=0.0, keep=False, uniform=False,
                      max_weight=CONFIG.secagg.max_weight)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    out, _ = train_round(grid, context, CONFIG, server_round=1, global_arrays=GLOBAL,
                         node_ids=[1, 2, 3], signature=b"", pool=pool, roster=None)
    return out.statuses, pool.mean()[0]


def test_a_site_claiming_a_billion_examples_cannot_dominate_the_mean() -> None:
    statuses, mean = _round(_site(np.full(6, 50.0, np.float32), 1e9))
    assert statuses == {1: keys.STATUS_OK, 2: keys.STATUS_OK, 3: REJECTED_WEIGHT}
    np.testing.assert_allclose(mean, np.full(6, 0.2), rtol=1e-6)  # the honest sites' mean


@pytest.mark.parametrize("array", [
    np.zeros(6, dtype=[("a", "<f4")]),  # structured: passed numpy_view, then TypeError
    np.zeros(6, dtype=np.int64),
    np.zeros(6, dtype=np.complex64),
])
def test_an_update_of_another_dtype_is_rejected_as_malformed_not_a_crash(array) -> None:
    statuses, mean = _round(_site(array, 10.0))
    assert statuses[3] == REJECTED_MALFORMED
    np.testing.assert_allclose(mean, np.full(6, 0.2), rtol=1e-6)


def test_an_unregistered_node_cannot_pose_as_a_registered_hospital() -> None:
    from server.app import _name_unregistered

    registered = {1: "hospital-a"}
    names = dict(registered)
    _name_unregistered(names, registered, {1: "hospital-z", 2: "hospital-a", 3: "clinic-x"})
    assert names == {1: "hospital-a", 2: "node-2", 3: "clinic-x"}
    _name_unregistered(names, registered, {4: "clinic-x"})  # a second claim of a name
    assert names[4] == "node-4"


@pytest.mark.parametrize("run_id", ["../../etc", "/etc", "7/../../x", ""])
def test_a_resume_from_outside_the_runs_folder_is_refused(tmp_path, run_id) -> None:
    from server.registry import RunFolder, RunFolderError

    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "registry.json").write_text("{}")  # what a climb would find
    with pytest.raises(RunFolderError, match="not a run id"):
        RunFolder.open(tmp_path / "home", run_id)
