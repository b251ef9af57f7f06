"""DP-SGD whose unit of privacy is the patient, not the image.

Opacus samples and clips images. A patient with k images is then a group of k records
and spends about k times the ε of one image. fedrad's DP training makes the patient the
record instead:
- `PatientPoissonSampler`: at every step each patient is drawn independently with
  probability q (from the CSPRNG-seeded generator of client.dp_optimizer), and a drawn
  patient brings all their training images;
- the DP optimizer clips each patient's summed gradient to C (FusedDPOptimizer with
  `groups`), so one patient moves the noisy sum by at most C, whatever their k;
- the accountant (and the site's ledger) count steps of rate q on patients: the ε a run
  reports is the ε of every patient.
q is 1/steps with steps = ceil(images / batch-size) per epoch, so a batch holds
batch-size images on average, as with image sampling.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler, TensorDataset


class PatientPoissonSampler(Sampler[list[int]]):
    """Batches of image indices: every patient drawn with probability `sample_rate`
    (default 1/steps) per step."""

    def __init__(self, groups: np.ndarray, steps: int, generator: torch.Generator, *,
                 sample_rate: float | None = None) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.patients = [np.flatnonzero(groups == g) for g in np.unique(groups)]
        self.steps = steps
        self.sample_rate = 1.0 / steps if sample_rate is None else sample_rate
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample rate must be in (0, 1], got {self.sample_rate}")
        self.generator = generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            drawn = torch.rand(len(self.patients), generator=self.generator) < self.sample_rate
            yield [int(i) for p in drawn.nonzero().flatten().tolist() for i in self.patients[p]]


def collate_or_empty(dataset: TensorDataset):  # type: ignore[no-untyped-def]
    """A collate function that turns an empty draw into empty tensors of the right shape
    (a step with nobody drawn is still a noise-only DP step)."""
    shapes = [tensor.shape[1:] for tensor in dataset.tensors]
    dtypes = [tensor.dtype for tensor in dataset.tensors]

    def collate(batch: list[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
        if not batch:
            return [torch.empty((0, *shape), dtype=dtype)
                    for shape, dtype in zip(shapes, dtypes, strict=True)]
        return [torch.stack(column) for column in zip(*batch, strict=True)]

    return collate
