"""The model on the wire: one packed float32 vector, unpacked by the run's own model."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import ConfigError, RunConfig, UpdateDType
from common.models import build_model
from common.weights import UpdateError, from_arrays, pack, plain_state_dict, to_arrays, unpack


def test_a_model_packs_into_one_vector_and_back_exactly() -> None:
    template = plain_state_dict(build_model(RunConfig.from_mapping({"model": "segresnet"})))
    arrays = to_arrays(template)
    wire = pack(arrays)
    assert len(arrays) > 10 and len(wire) == 1 and wire[0].dtype == np.float32
    assert wire[0].size == sum(a.size for a in arrays)
    back = unpack(wire, arrays)
    for original, restored in zip(arrays, back, strict=True):
        np.testing.assert_array_equal(original, restored)
    from_arrays(template, back)  # shapes as the state dict wants them


@pytest.mark.parametrize("wire, match", [
    (lambda a: [pack(a)[0][:-1]], "the run's model has"),
    (lambda a: pack(a) + pack(a), "one packed vector"),
    (lambda a: [pack(a)[0].reshape(1, -1)], "one packed vector"),
])
def test_a_packed_model_of_another_layout_is_refused(wire, match) -> None:
    arrays = [np.ones((2, 3), np.float32), np.arange(4, dtype=np.float32)]
    with pytest.raises(UpdateError, match=match):
        unpack(wire(arrays), arrays)


def test_float16_updates_only_without_secagg() -> None:
    with pytest.raises(ConfigError, match="update-dtype=float16 has no effect under SecAgg"):
        RunConfig.from_mapping({"update-dtype": "float16"})
    config = RunConfig.from_mapping({"update-dtype": "float16", "secagg-enabled": False})
    assert config.update_dtype is UpdateDType.FLOAT16
    with pytest.raises(ConfigError, match="update-dtype"):
        RunConfig.from_mapping({"update-dtype": "int8", "secagg-enabled": False})


def test_a_float16_update_is_the_float32_update_in_half_the_bytes(phantom_sites,
                                                                  tmp_path) -> None:
    from client.site_round import train_outcome

    run_config = {"image-size": 32, "local-epochs": 1, "batch-size": 8, "augment": False,
                  "secagg-enabled": False}
    wire = pack(to_arrays(plain_state_dict(build_model(RunConfig.from_mapping(run_config)))))
    out = {}
    for dtype in ("float32", "float16"):
        node_config = {"site-id": "hospital-a", "data-dir": str(phantom_sites["hospital-a"]),
                       "work-dir": str(tmp_path / dtype), "epsilon-budget": 20.0}
        out[dtype] = train_outcome(run_id=1, node_config=node_config,
                                   run_config={**run_config, "update-dtype": dtype},
                                   global_arrays=wire, server_round=1, legacy=False)
    half, full = out["float16"]["update"][0], out["float32"]["update"][0]
    assert half.dtype == np.float16 and full.dtype == np.float32
    assert 2 * half.nbytes == full.nbytes and np.abs(full).max() > 1e-3
    np.testing.assert_allclose(half.astype(np.float32), full, rtol=2e-3, atol=1e-5)
