"""fedrad.radiographs: the phantom films a privacy-free prior is trained on."""

from __future__ import annotations

import numpy as np
import pytest

from fedrad.radiographs import radiograph


def _film(seed: int, nodule: bool = False, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    return radiograph(np.random.default_rng(seed), size, nodule)


def test_a_seed_gives_the_same_film() -> None:
    first, second = _film(3), _film(3)
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert not np.array_equal(first[0], _film(4)[0])


@pytest.mark.parametrize("seed", range(12))
def test_films_are_chest_shaped(seed: int) -> None:
    """Two lungs that fill much of the film, darker than the rest of the chest, mask
    binary, image in [0, 1]."""
    image, mask = _film(seed)
    assert image.dtype == np.float32 and 0.0 <= image.min() and image.max() <= 1.0
    assert mask.dtype == np.uint8 and set(np.unique(mask).tolist()) <= {0, 1}
    assert 0.12 < mask.mean() < 0.55  # the demo's phantoms: ~0.1
    half = mask.shape[1] // 2
    assert mask[:, :half].sum() > 0.25 * mask.sum() and mask[:, half:].sum() > 0.2 * mask.sum()
    lung, rest = image[mask == 1].mean(), image[mask == 0].mean()
    assert lung < rest + 0.05  # aerated lung is darker than the chest around it on average


def test_a_nodule_is_lung_in_the_mask() -> None:
    """A nodule (or any opacity) brightens the film inside the lung, not the mask."""
    with_nodule, without = _film(5, nodule=True), _film(5, nodule=False)
    assert np.array_equal(with_nodule[1], without[1])
    assert not np.array_equal(with_nodule[0], without[0])
