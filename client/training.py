"""Local training behind a framework-neutral interface (as MONAI's ClientAlgo).

`SegmentationAlgo` and `ClassificationAlgo` know nothing of Flower: train /
evaluate / get_weights / set_weights. A unit test, a simulation and a SuperNode
all run this same code. `build_algo` picks the one for the run's task.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric, HausdorffDistanceMetric, ROCAUCMetric
from opacus.accountants.utils import get_noise_multiplier
from torch.utils.data import DataLoader, TensorDataset

from client import distributed_dp
from client.augmentation import Augmenter
from client.dataset import SiteDataset
from client.dp_optimizer import FusedDPOptimizer, SitePrivacyEngine, make_private
from client.patient_sampling import PatientPoissonSampler, collate_or_empty
from common import keys
from common.config import Optimizer, OptimizerState, RunConfig, Strategy, Task
from common.models import build_model, freeze_except
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
    """Validation metrics of the current weights on the site's held-out patients.

    `metrics` uses the wire names of common.keys (e.g. eval-dice, eval-auroc:<label>).
    """

    loss: float
    metrics: dict[str, float]
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
    """(sample rate, steps per epoch): ceil(images / batch-size) steps, each drawing every
    patient with probability 1/steps (a batch-size of images on average)."""
    batches = max(1, math.ceil(num_train / batch_size))
    return 1.0 / batches, batches


def dp_schedule(config: RunConfig, num_train: int) -> tuple[float, int]:
    """(sample rate, DP steps per round) of a site's training. Local mode: local-epochs x
    ceil(images / batch-size) steps at 1/ceil(...); distributed mode: one step at the
    global weights with the run's dp-sample-rate (client.distributed_dp)."""
    if config.dp.distributed:
        return config.dp.sample_rate, 1
    sample_rate, per_epoch = dp_sampling(num_train, config.batch_size)
    return sample_rate, config.local_epochs * per_epoch


def plan_noise_multiplier(config: RunConfig, *, num_train: int, delta: float) -> float:
    """σ that spends the run's target ε over its planned rounds (computed once); the
    record is a patient (client.patient_sampling). In distributed mode σ is the noise of
    the secure sum, planned from the run config alone (the same at every site)."""
    sample_rate, per_round = dp_schedule(config, num_train)
    if config.dp.distributed:
        delta = distributed_dp.plan_delta(config)
    return _noise_for(config.dp.target_epsilon, delta, sample_rate,
                      config.num_rounds * per_round)


@functools.lru_cache(maxsize=64)
def _noise_for(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Opacus' bisection (about 3 s here), once per distinct plan in a site worker."""
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps, accountant="rdp"))


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


class _Proximal:
    """FedProx's local term μ/2·||w - w_global||², as a decoupled step after each update:
    w ← w - lr·μ·(w - w_global). It reads no data, so under DP-SGD it is post-processing
    and costs no privacy (a loss term would be lost in Opacus' per-sample gradients)."""

    def __init__(self, params: list[torch.nn.Parameter], rate: float) -> None:
        self.params = params
        self.anchor = [p.detach().clone() for p in params]
        self.rate = rate

    @classmethod
    def of(cls, config: RunConfig, model: torch.nn.Module) -> _Proximal | None:
        settings = config.strategy
        if settings.name is not Strategy.FEDPROX or settings.proximal_mu == 0:
            return None
        params = [p for p in model.parameters() if p.requires_grad]
        return cls(params, min(1.0, config.learning_rate * settings.proximal_mu))

    @torch.no_grad()
    def step(self) -> None:
        for param, anchor in zip(self.params, self.anchor, strict=True):
            param.sub_(self.rate * (param - anchor))


class LocalAlgo:
    """Shared by every task: data split, DP-SGD training loop, weights in and out."""

    def __init__(self, config: RunConfig, dataset: SiteDataset, device: torch.device, *,
                 split: tuple[float, int] | None = None) -> None:
        """`split`: (validation fraction, seed) of the patients held out; a site passes
        its own (client.served.split_seed), others the run's val-fraction and seed."""
        self.config = config
        self.device = device
        fraction, seed = split if split is not None else (config.val_fraction, config.seed)
        train_idx, val_idx = dataset.split(fraction, seed)
        self.train_groups = dataset.groups[train_idx]
        # The privacy ledger's cohort: every training patient, each one DP record
        # (client.patient_sampling draws and clips a patient's images together).
        self.cohort: dict[str, int] = {dataset.patients[g]: 1
                                       for g in np.unique(self.train_groups).tolist()}
        self.train_set = self._tensors(dataset, train_idx)
        self.val_set = self._tensors(dataset, val_idx)
        self.model = build_model(config).to(device)
        # optimizer-state=kept: the local optimiser's moments between this run's rounds
        # (post-processing of DP gradients; they never leave the site)
        self.optimizer_state: dict[str, Any] | None = None

    @staticmethod
    def _tensors(dataset: SiteDataset, index: np.ndarray) -> TensorDataset:
        images = torch.from_numpy(np.ascontiguousarray(dataset.images[index]))
        targets = torch.from_numpy(dataset.targets[index].astype(np.float32))
        groups = torch.from_numpy(dataset.groups[index].astype(np.int64))
        return TensorDataset(images, targets, groups)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def num_train(self) -> int:
        return len(self.train_set)

    def get_weights(self) -> list[np.ndarray]:
        return to_arrays(plain_state_dict(self.model))

    def set_weights(self, arrays: list[np.ndarray]) -> None:
        state = from_arrays(plain_state_dict(self.model), arrays)
        self.model.load_state_dict(state)

    def train(self, *, server_round: int, noise_multiplier: float | None,
              max_grad_norm: float | None = None) -> TrainResult:
        """Local epochs; with DP-SGD when `noise_multiplier` is given.

        `max_grad_norm` defaults to the run's dp-max-grad-norm (tests pass other values).
        The run's `seed` drives augmentation and, without DP, the shuffling; DP's
        sampling and noise come from the OS CSPRNG (SitePrivacyEngine), never from it.
        """
        start = time.perf_counter()
        torch.manual_seed(self.config.seed * 1000 + server_round)
        augmenter = Augmenter(self.config.augment, spatial_dims=self.config.task.spatial_dims,
                              image_size=self.config.image_size,
                              seed=self.config.seed * 1000 + server_round)
        loader = DataLoader(self.train_set, batch_size=self.config.batch_size, shuffle=True)
        epochs = self.config.local_epochs
        if self.config.dp.distributed:  # one noisy gradient at the global weights
            if noise_multiplier is None:
                raise ValueError("dp-mode=distributed trains only with DP noise")
            epochs = 1
        model = copy.deepcopy(self.model)  # a fresh module per session: no stale DP hooks
        freeze_except(model, self.config.dp.trainable)  # dp-trainable: the rest stays as sent
        model.train()
        optimizer = self._optimizer(model)
        plain_optimizer = optimizer
        engine = None
        if noise_multiplier is not None:
            engine = SitePrivacyEngine(accountant="rdp")
            model, optimizer, loader = self._private(engine, model, optimizer,
                                                     noise_multiplier, max_grad_norm)
        model.train()
        proximal = _Proximal.of(self.config, model)
        losses: list[float] = []
        steps = 0
        for _ in range(epochs):
            for images, targets, groups in loader:
                if isinstance(optimizer, FusedDPOptimizer):
                    optimizer.groups = groups  # clip per patient
                if len(images) == 0:  # Poisson sampling drew nobody: a noise-only step
                    _noise_only_step(model, optimizer)
                    steps += 1
                    continue
                images, targets = images.to(self.device), targets.to(self.device)
                images, masks = augmenter(images, targets if self.config.task.is_segmentation
                                          else None)
                if masks is not None:
                    targets = masks
                optimizer.zero_grad()
                loss = self.loss(model(images), targets)
                loss.backward()
                optimizer.step()
                if proximal is not None:
                    proximal.step()
                losses.append(float(loss.detach()))
                steps += 1
        sample_rate, _ = dp_sampling(self.num_train, self.config.batch_size)
        if engine is not None:  # what the accountant actually counted
            (_, sample_rate, _), = {(s, q, 0) for s, q, _ in engine.accountant.history}
            steps = sum(num for _, _, num in engine.accountant.history)
        self.model.load_state_dict(plain_state_dict(model))
        if self.config.optimizer_state is OptimizerState.KEPT:
            self.optimizer_state = copy.deepcopy(plain_optimizer.state_dict())
        return TrainResult(
            loss=float(np.mean(losses)) if losses else float("nan"),
            num_examples=self.num_train,
            steps=steps,
            sample_rate=sample_rate,
            seconds=time.perf_counter() - start,
        )

    def _private(self, engine: SitePrivacyEngine, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, noise_multiplier: float,
                 max_grad_norm: float | None
                 ) -> tuple[torch.nn.Module, FusedDPOptimizer, DataLoader[Any]]:
        """DP-SGD on patients: Poisson-sampled patients (all their images), each patient's
        gradient clipped to C, the mean over the expected number of patients."""
        # one epoch of the loader: its steps and rate (dp_schedule's, per epoch)
        sample_rate, steps = (self.config.dp.sample_rate, 1) if self.config.dp.distributed \
            else dp_sampling(self.num_train, self.config.batch_size)
        sampler = PatientPoissonSampler(self.train_groups, steps, engine.secure_rng,
                                        sample_rate=sample_rate)
        loader = DataLoader(self.train_set, batch_sampler=sampler,
                            collate_fn=collate_or_empty(self.train_set))
        private, dp_optimizer, private_loader = make_private(
            engine, model, optimizer, loader, noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm or self.config.dp.max_grad_norm,
            poisson_sampling=False)  # the sampler above is Poisson, on patients
        dp_optimizer.expected_batch_size = sampler.sample_rate * len(sampler.patients)
        return private, dp_optimizer, private_loader

    def _optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        lr = self.config.learning_rate
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer: torch.optim.Optimizer
        if self.config.dp.distributed:  # the step is the noisy gradient itself
            return torch.optim.SGD(params, lr=lr)
        if self.config.optimizer is Optimizer.SGD:
            optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9)
        else:
            optimizer = torch.optim.Adam(params, lr=lr)
        if self.optimizer_state is not None:  # the moments of this site's previous round
            optimizer.load_state_dict(self.optimizer_state)
        return optimizer

    @torch.no_grad()
    def predict(self) -> tuple[float, torch.Tensor, torch.Tensor]:
        """Mean validation loss, logits and targets of the held-out patients."""
        self.model.eval()
        losses, logits, targets = [], [], []
        for images, target, _ in DataLoader(self.val_set, batch_size=16):
            images, target = images.to(self.device), target.to(self.device)
            output = self.model(images)
            losses.append(float(self.loss(output, target)) * len(images))
            logits.append(output.cpu())
            targets.append(target.cpu())
        return sum(losses) / len(self.val_set), torch.cat(logits), torch.cat(targets)


class SegmentationAlgo(LocalAlgo):
    """Lung (2D) or organ (3D) segmentation: Dice + cross-entropy loss."""

    def __init__(self, config: RunConfig, dataset: SiteDataset, device: torch.device, *,
                 split: tuple[float, int] | None = None) -> None:
        super().__init__(config, dataset, device, split=split)
        self.loss_fn = DiceCELoss(sigmoid=True)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(logits, targets)  # type: ignore[no-any-return]

    def evaluate(self) -> EvalResult:
        """Dice and 95 % Hausdorff distance (MONAI metrics) at the run's threshold."""
        start = time.perf_counter()
        loss, logits, targets = self.predict()
        predicted = (torch.sigmoid(logits) > self.config.threshold).float()
        dice = DiceMetric(include_background=True, reduction="mean")
        dice(y_pred=predicted, y=targets)
        metrics = {keys.EVAL_DICE: _scalar(dice.aggregate())}
        hd95 = HausdorffDistanceMetric(include_background=True, percentile=95,
                                       reduction="mean")
        hd95(y_pred=predicted, y=targets)
        value = _scalar(hd95.aggregate())
        if math.isfinite(value):  # no finite value when every prediction is empty
            metrics[keys.EVAL_HD95] = value
        return EvalResult(loss, metrics, len(self.val_set), time.perf_counter() - start)


class ClassificationAlgo(LocalAlgo):
    """CheXNet-style multi-label classification: a sigmoid per label, BCE loss."""

    def __init__(self, config: RunConfig, dataset: SiteDataset, device: torch.device, *,
                 split: tuple[float, int] | None = None) -> None:
        super().__init__(config, dataset, device, split=split)
        self.loss_fn = torch.nn.BCEWithLogitsLoss()

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(logits, targets)  # type: ignore[no-any-return]

    def evaluate(self) -> EvalResult:
        """Per label: AUROC (MONAI ROCAUCMetric), sensitivity and specificity at the
        run's threshold; plus the macro AUROC over the labels that have both classes."""
        start = time.perf_counter()
        loss, logits, targets = self.predict()
        scores = torch.sigmoid(logits)
        metrics: dict[str, float] = {}
        aurocs = []
        for column, label in enumerate(self.config.labels):
            truth, score = targets[:, column], scores[:, column]
            positive = truth > 0.5
            called = score > self.config.threshold
            if positive.any() and (~positive).any():
                auroc = ROCAUCMetric()
                auroc(y_pred=score, y=truth)
                value = _scalar(auroc.aggregate())
                metrics[keys.label_metric(keys.EVAL_AUROC, label)] = value
                aurocs.append(value)
            if positive.any():
                metrics[keys.label_metric(keys.EVAL_SENSITIVITY, label)] = float(
                    (called & positive).sum() / positive.sum())
            if (~positive).any():
                metrics[keys.label_metric(keys.EVAL_SPECIFICITY, label)] = float(
                    (~called & ~positive).sum() / (~positive).sum())
        if aurocs:
            metrics[keys.EVAL_AUROC_MACRO] = float(np.mean(aurocs))
        return EvalResult(loss, metrics, len(self.val_set), time.perf_counter() - start)


def _scalar(aggregate: object) -> float:
    value = aggregate[0] if isinstance(aggregate, tuple | list) else aggregate
    return float(value.item() if isinstance(value, torch.Tensor) else value)  # type: ignore[arg-type]


def build_algo(config: RunConfig, dataset: SiteDataset, device: torch.device, *,
               split: tuple[float, int] | None = None
               ) -> SegmentationAlgo | ClassificationAlgo:
    """The local algorithm for the run's task."""
    if config.task is Task.CXR_CLASSIFY:
        return ClassificationAlgo(config, dataset, device, split=split)
    return SegmentationAlgo(config, dataset, device, split=split)
