"""Training-recipe properties of the augmentation (client.augmentation): a mask moves with
its image, the same seed draws the same transforms, evaluation never augments."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from client.augmentation import Augmenter
from client.dataset import SiteDataset
from client.training import SegmentationAlgo
from common.config import RunConfig

SIZE = 64


def _shapes(n: int, seed: int) -> torch.Tensor:
    """Binary blobs (ellipses off centre): images whose bright pixels are their own mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    masks = []
    for _ in range(n):
        cy, cx, ry, rx = rng.uniform(0.3, 0.6), rng.uniform(0.3, 0.6), *rng.uniform(0.1, 0.25, 2)
        masks.append(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1)
    return torch.from_numpy(np.stack(masks)[:, None].astype(np.float32))


def _augmenter(seed: int, **changes: object) -> Augmenter:
    settings = dataclasses.replace(RunConfig.from_mapping({}).augment, **{
        "probability": 1.0, "rotation": 20.0, "scale": 0.2, "shift": 0.15, **changes})
    return Augmenter(settings, spatial_dims=2, image_size=SIZE, seed=seed)


def test_a_transformed_mask_is_the_mask_of_the_transformed_image() -> None:
    masks = _shapes(8, seed=0)
    images = masks * 0.8 + 0.1  # lung bright on a dark background
    moved_images, moved_masks = _augmenter(3)(images, masks.clone())
    assert moved_masks is not None
    assert not torch.equal(moved_masks, masks)  # the geometry did move them
    assert set(torch.unique(moved_masks).tolist()) <= {0.0, 1.0}  # nearest: still binary
    # the image's bright region (after contrast 0.9-1.1, brightness +-0.05) is the mask;
    # pixels may differ only on the blob's 1-pixel rim (bilinear vs nearest)
    from_image = (moved_images > 0.5).float()
    disagree = (from_image != moved_masks).float().mean(dim=(1, 2, 3))
    assert float(disagree.max()) < 0.02, disagree
    # and that agreement is no accident: against another image's mask it fails
    assert float((from_image != moved_masks.roll(1, dims=0)).float().mean()) > 0.05


def test_the_same_seed_draws_the_same_transforms_and_another_seed_others() -> None:
    masks = _shapes(6, seed=1)
    first = _augmenter(11)(masks * 0.7, masks.clone())
    again = _augmenter(11)(masks * 0.7, masks.clone())
    other = _augmenter(12)(masks * 0.7, masks.clone())
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_switched_off_it_returns_the_batch_untouched() -> None:
    masks = _shapes(4, seed=2)
    images = masks * 0.6
    out_images, out_masks = _augmenter(5, enabled=False)(images, masks)
    assert out_images is images and out_masks is masks


def test_evaluation_never_augments() -> None:
    """evaluate() scores the stored validation images as they are: twice the same, and
    equal to the model run by hand on them, however strong the training augmentation."""
    masks = _shapes(12, seed=4)
    dataset = SiteDataset(images=(masks * 0.8).numpy(), targets=masks.numpy().astype(np.uint8),
                          groups=np.arange(12), content_hash="", phi_values=frozenset(),
                          skipped=(), patients=tuple(f"p{i}" for i in range(12)))
    config = RunConfig.from_mapping({"image-size": SIZE, "augment-probability": 1.0,
                                     "augment-rotation": 40.0, "dp-enabled": False})
    algo = SegmentationAlgo(config, dataset, torch.device("cpu"))
    first, second = algo.evaluate(), algo.evaluate()
    assert first.metrics == second.metrics and first.loss == second.loss
    loss, logits, _ = algo.predict()
    with torch.no_grad():
        images = algo.val_set.tensors[0]
        assert torch.allclose(logits, algo.model.eval()(images))
    assert loss == first.loss


def test_strong_intensity_randomises_appearance_not_the_mask() -> None:
    """augment-intensity=strong (domain randomisation for phantom priors): the same seed
    draws the same geometry as mild, so the masks are identical; the images' exposure
    (gamma, blur, noise, contrast) varies far more, stays in [0, 1] and stays seeded."""
    from common.config import Intensity

    masks = _shapes(16, seed=4)
    images = masks * 0.6 + 0.2
    mild_images, mild_masks = _augmenter(5)(images, masks.clone())
    strong_images, strong_masks = _augmenter(5, intensity=Intensity.STRONG)(images,
                                                                            masks.clone())
    again, _ = _augmenter(5, intensity=Intensity.STRONG)(images, masks.clone())
    assert mild_masks is not None and strong_masks is not None
    assert torch.equal(mild_masks, strong_masks)
    assert torch.equal(strong_images, again)
    assert 0.0 <= float(strong_images.min()) and float(strong_images.max()) <= 1.0
    inside = strong_masks > 0.5

    def lung_levels(batch: torch.Tensor) -> torch.Tensor:  # each image's mean lung grey
        return torch.stack([b[m].mean() for b, m in zip(batch, inside, strict=True)])

    spread = {"mild": float(lung_levels(mild_images).std()),
              "strong": float(lung_levels(strong_images).std())}
    assert spread["strong"] > 2 * spread["mild"], spread  # exposures differ per image

    def texture(batch: torch.Tensor) -> float:  # grey-level spread within each lung
        lungs = masks > 0.5
        return float(torch.stack([b[m].std() for b, m in zip(batch, lungs, strict=True)])
                     .mean())

    still = {i: _augmenter(5, probability=0.0, intensity=i)(images, None)[0]
             for i in Intensity}  # no geometry: each lung one grey level, unless noised
    assert texture(still[Intensity.MILD]) < 1e-5
    assert texture(still[Intensity.STRONG]) > 0.01
