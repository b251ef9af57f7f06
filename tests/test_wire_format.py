"""The model on the wire: one packed float32 vector, unpacked by the run's own model."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import RunConfig
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
