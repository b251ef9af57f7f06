"""Training-only augmentation: geometry on the image and its mask together, then intensity.

A random affine (MONAI's `RandAffined`: rotation, scale, shift; no flips, since a flipped
chest X-ray is another anatomy) moves the image bilinearly and the mask by nearest
neighbour with the same parameters, so a transformed mask stays the mask of the
transformed image. Then each image gets a contrast (x0.9-1.1) and brightness (+-0.05)
change. Classification images get the same geometry (their label does not move).
`augment-intensity = "strong"` randomises the image's appearance further (MONAI's
RandAdjustContrast gamma 0.5-2, RandGaussianSmooth, RandGaussianNoise, contrast x0.6-1.4
about the mean): domain randomisation, so that a model trained on generated phantoms
(fedrad pretrain) meets real radiographs' exposures, sharpness and noise.

Seeded: one `Augmenter` per local training session, seeded from the run's seed and the
round, draws the same transforms for the same batches. Evaluation never calls it.
"""

from __future__ import annotations

import math
from collections.abc import Hashable

import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandAffined,
    RandGaussianNoise,
    RandGaussianSmooth,
)

from common.config import AugmentConfig, Intensity

_IMAGE, _MASK = "image", "mask"


class Augmenter:
    """The run's augmentation for one training session (a batch at a time)."""

    def __init__(self, settings: AugmentConfig, *, spatial_dims: int, image_size: int,
                 seed: int) -> None:
        self.settings = settings
        radians = math.radians(settings.rotation)
        rotate = radians if spatial_dims == 2 else (radians,) * 3
        self._affine = {
            masked: RandAffined(
                keys=[_IMAGE, _MASK] if masked else [_IMAGE],
                prob=settings.probability,
                rotate_range=rotate,
                scale_range=(settings.scale,) * spatial_dims,
                translate_range=(settings.shift * image_size,) * spatial_dims,
                mode=("bilinear", "nearest") if masked else "bilinear",
                padding_mode="zeros",
            ).set_random_state(seed)
            for masked in (True, False)
        }
        self._generator = torch.Generator().manual_seed(seed)
        self._appearance = None
        if settings.intensity is Intensity.STRONG:
            self._appearance = Compose([
                RandAdjustContrast(prob=0.8, gamma=(0.5, 2.0)),
                RandGaussianSmooth(prob=0.5, sigma_x=(0.3, 1.2), sigma_y=(0.3, 1.2),
                                   sigma_z=(0.3, 1.2)),
                RandGaussianNoise(prob=0.5, mean=0.0, std=0.04),
            ]).set_random_state(seed)

    def __call__(self, images: torch.Tensor, masks: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Augmented copies of a batch (N, C, *spatial) and, for segmentation, its masks."""
        if not self.settings.enabled:
            return images, masks
        device = images.device
        moved_images, moved_masks = [], []
        affine = self._affine[masks is not None]
        for i in range(len(images)):
            sample: dict[Hashable, torch.Tensor] = {_IMAGE: images[i].cpu()}
            if masks is not None:
                sample[_MASK] = masks[i].cpu()
            out = affine(sample)
            moved_images.append(_plain(out[_IMAGE]).to(images.dtype))
            if masks is not None:
                moved_masks.append(_plain(out[_MASK]).to(masks.dtype))
        if self._appearance is not None:
            moved_images = [_plain(self._appearance(image.clamp(0, 1))).to(images.dtype)
                            for image in moved_images]
        batch = torch.stack(moved_images)
        shape = (batch.shape[0],) + (1,) * (batch.dim() - 1)
        mean: torch.Tensor | float = 0.0
        if self._appearance is None:
            contrast = 0.9 + 0.2 * torch.rand(shape, generator=self._generator)
        else:  # about the image's mean, so the exposure stays where gamma put it
            contrast = 0.6 + 0.8 * torch.rand(shape, generator=self._generator)
            mean = batch.mean(dim=tuple(range(1, batch.dim())), keepdim=True)
        brightness = 0.1 * torch.rand(shape, generator=self._generator) - 0.05
        batch = ((batch - mean) * contrast + mean + brightness).clamp(0, 1).to(device)
        return batch, (torch.stack(moved_masks).to(device) if masks is not None else None)


def _plain(value: object) -> torch.Tensor:
    """MONAI returns MetaTensors; training wants plain tensors (no affine tracking)."""
    return value.as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(value)
