"""Epoch time with DP-SGD vs. without, at the same batch size, in one run.

Usage: python bench/dp_overhead.py [--steps N] [--repeats R] [--threads T]

Models: MONAI DenseNet121 (cxr-classify) and UNet (lung-seg), built exactly as fedrad
builds them (GroupNorm, no in-place ops), 128 x 128 inputs, batch 16, Adam. An "epoch"
is `steps` batches; each mode is timed best-of-`repeats`, all in this process, the
modes interleaved within each repeat:

- plain: no DP;
- opacus-hooks: Opacus 1.6 defaults (per-sample gradients by its hooks; im2col for
  convolutions, functorch for layers it has no sampler for, e.g. ConvTranspose);
- opacus-functorch: `grad_sample_mode="functorch"`;
- fedrad: what fedrad trains with (client/dp_optimizer.py `make_private`): Opacus'
  hooks with fedrad's convolution and GroupNorm samplers (client/dp_samplers.py), the
  fused DP step (client/dp_optimizer.py) and autograd's discarded weight gradients
  skipped (client/dp_weight_grads.py); noise from the OS CSPRNG as Opacus' secure mode
  draws it (SitePrivacyEngine);
- fedrad-patients: the same, clipping per patient (2 images each: `groups`), as fedrad's
  training does (client/patient_sampling.py);
- fedrad-patients:<dp-trainable>: the same with only those parameters trained
  (norm-bias, head, norm-bias-head; common.models.freeze_except), against plain training
  of every parameter.

Every DP mode clips per sample (max_grad_norm 1) and adds noise (sigma 1), with fixed
batches (no Poisson sampling, so the batch size is the same as plain). The last
line is `dp_over_plain=<worst ratio of fedrad and fedrad-patients over the two models>`.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from monai.losses import DiceCELoss
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from client import dp_samplers
from client.dp_optimizer import SitePrivacyEngine, make_private
from common.config import RunConfig, Trainable
from common.models import build_model, freeze_except

SIZE, BATCH = 128, 16
MODELS = {
    "densenet121": {"task": "cxr-classify", "model": "densenet121", "image-size": SIZE},
    "unet": {"task": "lung-seg", "model": "unet", "image-size": SIZE},
}


def _epoch(name: str, mode: str, steps: int) -> float:
    config = RunConfig.from_mapping(MODELS[name])
    torch.manual_seed(0)
    images = torch.rand(steps * BATCH, 1, SIZE, SIZE)
    if config.task.is_segmentation:
        targets = (torch.rand(steps * BATCH, 1, SIZE, SIZE) > 0.5).float()
        loss_fn: torch.nn.Module = DiceCELoss(sigmoid=True)
    else:
        targets = (torch.rand(steps * BATCH, len(config.labels)) > 0.5).float()
        loss_fn = torch.nn.BCEWithLogitsLoss()
    model = build_model(config)
    _, _, trainable = mode.partition(":")
    if trainable:
        freeze_except(model, Trainable(trainable))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loader = DataLoader(TensorDataset(images, targets), batch_size=BATCH)
    if mode.startswith("fedrad"):
        model, optimizer, loader = make_private(
            SitePrivacyEngine(accountant="rdp"), model, optimizer, loader, noise_multiplier=1.0,
            max_grad_norm=1.0, poisson_sampling=False)
    elif mode != "plain":
        engine = PrivacyEngine(accountant="rdp")
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
            max_grad_norm=1.0, poisson_sampling=False,
            grad_sample_mode="functorch" if mode == "opacus-functorch" else "hooks")
    if mode.startswith("fedrad-patients"):
        optimizer.groups = torch.arange(BATCH) // 2  # type: ignore[union-attr]
    model.train()
    start = time.perf_counter()
    for x, y in loader:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    modes = ["plain", "opacus-hooks", "opacus-functorch", "fedrad", "fedrad-patients",
             *(f"fedrad-patients:{t.value}" for t in Trainable if t is not Trainable.ALL)]
    best: dict[tuple[str, str], float] = {}
    failed: set[tuple[str, str]] = set()
    dp_samplers.install()
    for _ in range(args.repeats):  # modes interleaved, so drift on the machine hits all
        for name in MODELS:
            for mode in modes:
                if (name, mode) in failed:
                    continue
                try:
                    if mode.startswith("opacus"):
                        with dp_samplers.opacus_defaults():
                            seconds = _epoch(name, mode, args.steps)
                    else:
                        seconds = _epoch(name, mode, args.steps)
                except Exception as exc:  # noqa: BLE001 - a mode that fails is reported
                    print(f"{name:12s} {mode:17s} fails: {type(exc).__name__}: {exc}"[:160])
                    failed.add((name, mode))
                    continue
                best[name, mode] = min(best.get((name, mode), float("inf")), seconds)
    print(f"{args.steps} steps of batch {BATCH} at {SIZE}x{SIZE}, {args.threads} threads, "
          f"best of {args.repeats}")
    worst = 0.0
    for name in MODELS:
        plain = best[name, "plain"]
        for mode in modes:
            if (name, mode) not in best:
                continue
            ratio = best[name, mode] / plain
            print(f"{name:12s} {mode:32s} {args.steps * BATCH / best[name, mode]:7.1f} img/s"
                  f"  x{ratio:.2f} of plain")
            if mode in ("fedrad", "fedrad-patients"):
                worst = max(worst, ratio)
    print(f"dp_over_plain={worst:.2f}")


if __name__ == "__main__":
    main()
