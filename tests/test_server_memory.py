"""The server frees each folded update at once (bench/sim_scale.py measures the whole)."""

from __future__ import annotations

import gc
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common import keys
from common.config import RunConfig
from server.aggregation import UpdatePool
from server.polling_grid import PollingGrid
from server.rounds import train_round
from tests.inprocess import InProcessGrid

VALUES = 1 << 20  # one 4 MiB float32 tensor
SITES = 8


def _site(node: int):  # noqa: ANN202
    update = np.full(VALUES, 1e-3 * node, dtype=np.float32)

    def handle(message: Message) -> Message:
        return Message(RecordDict({
            keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 10.0}),
            keys.SITE: ConfigRecord({keys.SITE_ID: f"site-{node}",
                                     keys.STATUS: keys.STATUS_OK}),
            keys.UPDATE: ArrayRecord([update]),
        }), reply_to=message)

    return handle


@pytest.mark.parametrize("keep", [False, True])
def test_a_folded_update_is_freed_without_waiting_for_the_garbage_collector(
        task_identity: None, keep: bool) -> None:
    """A pulled Flower Message is part of a reference cycle: if the server left its
    update in it, each of the round's updates would stay allocated until a full garbage
    collection (which a process holding torch runs rarely). Folding must free them, and a
    pool that keeps every update must still see each one whole."""
    config = RunConfig.from_mapping({"secagg-enabled": False, "min-sites": 2})
    global_arrays = [np.zeros(VALUES, dtype=np.float32)]
    grid = PollingGrid(InProcessGrid({n: _site(n) for n in range(1, SITES + 1)}),
                       interval=0.01)
    pool = UpdatePool(global_arrays, max_norm=0.0, keep=keep, uniform=False)
    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        out, _ = train_round(grid, None, config, server_round=1,
                             global_arrays=global_arrays, node_ids=list(range(1, SITES + 1)),
                             signature=b"s", pool=pool, roster=None)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        gc.enable()
    assert set(out.statuses.values()) == {keys.STATUS_OK} and pool.count == SITES
    mean = pool.mean()[0]
    np.testing.assert_allclose(mean, 1e-3 * (SITES + 1) / 2, rtol=1e-5)
    update_bytes = VALUES * 4
    if keep:  # every update kept: one update's bytes per site, no more
        assert SITES * update_bytes <= held < (SITES + 3) * update_bytes
    else:  # the float64 running sum (2 updates) and the mean, not one per site
        assert held < 4 * update_bytes, held / update_bytes


FRESH_SERVER = """
import numpy as np
from pathlib import Path
from server.memory import return_large_frees

def resident():
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096

size = 28 * 2**20
print(return_large_frees())
for _ in range(3):
    buffer = np.ones(size, dtype=np.uint8)
    grown = resident()
    del buffer
    print(round((grown - resident()) / size, 2))
"""


def test_freed_model_sized_buffers_go_back_to_the_system() -> None:
    """As the ServerApp starts: freeing a 28 MB buffer (a DenseNet121 update) returns its
    pages at once, however many were freed before (glibc would keep them from the second
    on)."""
    result = subprocess.run([sys.executable, "-c", FRESH_SERVER], capture_output=True,
                            text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    lines = result.stdout.split()
    assert lines[0] == "True"  # this machine runs glibc
    assert len(lines) == 4 and all(float(x) > 0.9 for x in lines[1:]), lines
