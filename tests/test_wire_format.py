"""The model on the wire: one packed float32 vector, unpacked by the run's own model."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from common.config import ConfigError, RunConfig, UpdateDType
from common.models import build_model
from common.weights import (
    UpdateError,
    from_arrays,
    numpy_view,
    numpy_views,
    pack,
    plain_state_dict,
    to_arrays,
    unpack,
)


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
    with pytest.raises(ConfigError,
                       match="update-dtype=float16 has no effect under secure aggregation"):
        RunConfig.from_mapping({"update-dtype": "float16"})
    config = RunConfig.from_mapping({"update-dtype": "float16", "secagg-enabled": False})
    assert config.update_dtype is UpdateDType.FLOAT16
    with pytest.raises(ConfigError, match="update-dtype"):
        RunConfig.from_mapping({"update-dtype": "int8", "secagg-enabled": False})


def test_a_float16_update_is_the_float32_update_in_half_the_bytes(phantom_sites,
                                                                  tmp_path) -> None:
    from client.site_round import train_outcome

    run_config = {"image-size": 32, "local-epochs": 1, "batch-size": 8, "augment": False,
                  "secagg-enabled": False, "dp-enabled": False}  # DP noise would differ
    wire = pack(to_arrays(plain_state_dict(build_model(RunConfig.from_mapping(run_config)))))
    out = {}
    secret = os.urandom(32)  # one hospital in two work folders: one validation split
    for dtype in ("float32", "float16"):
        node_config = {"site-id": "hospital-a", "data-dir": str(phantom_sites["hospital-a"]),
                       "work-dir": str(tmp_path / dtype), "epsilon-budget": 20.0}
        (tmp_path / dtype).mkdir()
        (tmp_path / dtype / "site.secret").write_bytes(secret)
        out[dtype] = train_outcome(run_id=1, node_config=node_config,
                                   run_config={**run_config, "update-dtype": dtype},
                                   global_arrays=wire, server_round=1, masked=False)
    half, full = out["float16"]["update"][0], out["float32"]["update"][0]
    assert half.dtype == np.float16 and full.dtype == np.float32
    assert 2 * half.nbytes == full.nbytes and np.abs(full).max() > 1e-3
    np.testing.assert_allclose(half.astype(np.float32), full, rtol=2e-3, atol=1e-5)


def test_numpy_views_read_flowers_arrays_without_copying_them() -> None:
    """The server folds each reply from a view into the reply's own bytes: equal to
    Flower's `Array.numpy()`, read-only, for C and Fortran order, 0-d and float16; an
    object array is refused as np.load(allow_pickle=False) refuses it."""
    rng = np.random.default_rng(0)
    cases = [rng.normal(size=(3, 5)).astype(np.float32),
             np.asfortranarray(rng.normal(size=(4, 2))),
             np.array(2.5, dtype=np.float32),
             rng.normal(size=7).astype(np.float16)]
    record = ArrayRecord(cases)
    views = numpy_views(record)
    for original, view, array in zip(cases, views, record.values(), strict=True):
        np.testing.assert_array_equal(view, array.numpy())
        np.testing.assert_array_equal(view, original)
        assert view.dtype == original.dtype and view.shape == original.shape
        assert not view.flags.writeable  # a view of the bytes, not a copy
    with pytest.raises(UpdateError, match="objects"):
        numpy_view(_object_array())
    with pytest.raises(UpdateError, match="serialised as"):
        numpy_view(Array(dtype="float32", shape=(1,), stype="torch.raw", data=b"\0" * 4))


def _object_array() -> Array:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=buffer.getvalue())
