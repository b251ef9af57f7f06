"""Local training behind a framework-neutral interface (as MONAI's ClientAlgo).

`SegmentationAlgo` knows nothing of Flower: train / evaluate / get_weights /
set_weights. A unit test, a simulation and a SuperNode all run this same code.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from opacus import PrivacyEngine
from opacus.accountants.utils import get_noise_multiplier
from torch.utils.data import DataLoader, TensorDataset

from client.dataset import SiteDataset
from common.config import Optimizer, RunConfig
from common.models import build_model
from common.weights import from_arrays, plain_state_dict, to_arrays

LOG = logging.getLogger("fedrad.client")


@dataclass(frozen=True)
class TrainResult:
    """What one local training session did."""

    loss: float
    num_examples: int
    steps: int
    sample_rate: float
    seconds: float


@dataclass(frozen=True)
class EvalResult:
    """Validation metrics of the current weights on the site's held-out patients."""

    loss: float
    dice: float
    num_examples: int
    seconds: float


def pick_device(preference: str) -> torch.device:
    """CUDA when present (and not refused by the site), else CPU."""
    if preference == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if preference == "cuda":
        raise RuntimeError("node-config asks for device=cuda but no CUDA device is available")
    return torch.device("cpu")


def dp_sampling(num_train: int, batch_size: int) -> tuple[float, int]:
    """(sample rate, steps per epoch) exactly as Opacus' Poisson DPDataLoader uses them."""
    batches = max(1, math.ceil(num_train / batch_size))
    return 1.0 / batches, batches


def plan_noise_multiplier(config: RunConfig, *, num_train: int, delta: float) -> float:
    """σ that spends the run's target ε over its planned rounds x epochs (computed once)."""
    sample_rate, per_epoch = dp_sampling(num_train, config.batch_size)
    steps = config.num_rounds * config.local_epochs * per_epoch
    return float(
        get_noise_multiplier(
            target_epsilon=config.dp.target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant="rdp",
        )
    )


def default_delta(num_train: int) -> float:
    """δ well below 1/N of the site's training set."""
    return min(1e-5, 0.1 / num_train)


def _noise_only_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """DP-SGD step for an empty Poisson batch: zero per-sample gradients, noise added.

    Skipping it would make the number of updates depend on the data and would
    leave the accountant counting fewer steps than were sampled.
    """
    optimizer.zero_grad()
    for param in model.parameters():
        if param.requires_grad:
            # Opacus reads per-sample gradients from this attribute.
            param.grad_sample = torch.zeros(  # type: ignore[attr-defined]
                (0, *param.shape), device=param.device
            )
    optimizer.step()


class SegmentationAlgo:
    """2D lung segmentation with a MONAI UNet, optionally with Opacus DP-SGD."""

    def __init__(self, config: RunConfig, dataset: SiteDataset, device: torch.device) -> None:
        self.config = config
        self.device = device
        train_idx, val_idx = dataset.split(config.val_fraction, config.seed)
        self.train_set = self._tensors(dataset, train_idx)
        self.val_set = self._tensors(dataset, val_idx)
        self.model = build_model(config).to(device)
        self.loss_fn = DiceCELoss(sigmoid=True)

    @staticmethod
    def _tensors(dataset: SiteDataset, index: np.ndarray) -> TensorDataset:
        images = torch.from_numpy(dataset.images[index])
        masks = torch.from_numpy(dataset.masks[index].astype(np.float32))
        return TensorDataset(images, masks)

    @property
    def num_train(self) -> int:
        return len(self.train_set)

    def get_weights(self) -> list[np.ndarray]:
        return to_arrays(plain_state_dict(self.model))

    def set_weights(self, arrays: list[np.ndarray]) -> None:
        state = from_arrays(plain_state_dict(self.model), arrays)
        self.model.load_state_dict(state)

    def train(self, *, server_round: int, noise_multiplier: float | None) -> TrainResult:
        """Local epochs; with DP-SGD when `noise_multiplier` is given."""
        start = time.perf_counter()
        torch.manual_seed(self.config.seed * 1000 + server_round)
        loader = DataLoader(self.train_set, batch_size=self.config.batch_size, shuffle=True)
        model = copy.deepcopy(self.model)  # a fresh module per session: no stale DP hooks
        model.train()
        optimizer = self._optimizer(model)
        engine = None
        if noise_multiplier is not None:
            engine = PrivacyEngine(accountant="rdp")
            model, optimizer, loader = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=noise_multiplier,
                max_grad_norm=self.config.dp.max_grad_norm,
                poisson_sampling=True,
            )
        model.train()
        losses: list[float] = []
        steps = 0
        for _ in range(self.config.local_epochs):
            for images, masks in loader:
                if len(images) == 0:  # Poisson sampling drew nobody: a noise-only step
                    _noise_only_step(model, optimizer)
                    steps += 1
                    continue
                images, masks = images.to(self.device), masks.to(self.device)
                optimizer.zero_grad()
                loss = self.loss_fn(model(images), masks)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                steps += 1
        sample_rate, _ = dp_sampling(self.num_train, self.config.batch_size)
        if engine is not None:  # what the accountant actually counted
            (_, sample_rate, _), = {(s, q, 0) for s, q, _ in engine.accountant.history}
            steps = sum(num for _, _, num in engine.accountant.history)
        self.model.load_state_dict(plain_state_dict(model))
        return TrainResult(
            loss=float(np.mean(losses)) if losses else float("nan"),
            num_examples=self.num_train,
            steps=steps,
            sample_rate=sample_rate,
            seconds=time.perf_counter() - start,
        )

    def _optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        lr = self.config.learning_rate
        if self.config.optimizer is Optimizer.SGD:
            return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        return torch.optim.Adam(model.parameters(), lr=lr)

    @torch.no_grad()
    def evaluate(self) -> EvalResult:
        """Loss and Dice (MONAI DiceMetric, threshold 0.5) on the held-out patients."""
        start = time.perf_counter()
        self.model.eval()
        metric = DiceMetric(include_background=True, reduction="mean")
        losses = []
        for images, masks in DataLoader(self.val_set, batch_size=16):
            images, masks = images.to(self.device), masks.to(self.device)
            logits = self.model(images)
            losses.append(float(self.loss_fn(logits, masks)) * len(images))
            metric(y_pred=(torch.sigmoid(logits) > 0.5).float(), y=masks)
        aggregate = metric.aggregate()
        dice = float(aggregate[0] if isinstance(aggregate, tuple) else aggregate)
        return EvalResult(
            loss=sum(losses) / len(self.val_set),
            dice=dice,
            num_examples=len(self.val_set),
            seconds=time.perf_counter() - start,
        )
