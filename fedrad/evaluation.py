"""`fedrad evaluate`: a global model on a local DICOM dataset, with uncertainty.

The data is read by the site's own ingestion (client.dataset: the same decoding,
MONOCHROME1/bit-depth handling and cache as training), all of it, no split. Metrics
are MONAI's; 95 % confidence intervals come from a bootstrap over patients (an image is
never resampled apart from the other images of its patient).

Classification: AUROC per label and macro with CI, sensitivity and specificity at the
model's threshold, expected calibration error and the reliability curve.
Segmentation: Dice (with CI) and HD95 per image, summarised as distributions.
Nothing here identifies a patient: only numbers leave this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import (
    CalibrationErrorMetric,
    DiceMetric,
    HausdorffDistanceMetric,
    ROCAUCMetric,
    calibration_binning,
)

from client.dataset import DataSpec, SiteDataset, load_site_dataset
from client.ingest import Progress
from common.config import RunConfig, Task
from common.models import build_model

BOOTSTRAP = 1000
CALIBRATION_BINS = 10


class EvaluationError(ValueError):
    """A model or dataset that cannot be evaluated; the message says what to do."""


@dataclass(frozen=True)
class LoadedModel:
    """A global model ready to run, with the config that says how to feed it."""

    name: str
    config: RunConfig
    module: torch.nn.Module
    # what the run recorded: this round's pooled validation score, and the pooled
    # (centralised) baseline of the same sites, when one was recorded for the run
    validation_score: float | None = None
    baseline: dict[str, Any] | None = None

    def baseline_ratio(self) -> dict[str, Any] | None:
        """The run's pooled validation score of this model over the pooled baseline's."""
        if not self.baseline or self.validation_score is None:
            return None
        return {**self.baseline, "validation_score": self.validation_score,
                "ratio": self.validation_score / self.baseline["score"]}


def load_model(source: str, *, server_home: Path | None, verify_key: Path | None
               ) -> LoadedModel:
    """An exported model folder (its signature checked) or a registry name RUN[:ROUND|:best]."""
    from common.model_signing import load_verify_key
    from fedrad.model_registry import resolve, verify_export

    folder = Path(source)
    if folder.is_dir():
        if verify_key is None:
            raise EvaluationError(f"{folder}: a model export is used only once its signature "
                                  "verifies; pass --verify-key (signing.pub of the kit)")
        description = verify_export(folder, load_verify_key(verify_key))
        state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
        name = str(description["name"])
        flat = description["run_config"]
        score = description["metrics"].get("pooled_score")
        baseline = description.get("pooled_baseline")
    else:
        if server_home is None:
            raise EvaluationError(f"{source!r} is not a folder; a registry name RUN[:ROUND|:best] "
                                  "needs --consortium (the server's run folders)")
        run, ref = resolve(server_home, source)
        state, name, flat = run.load_checkpoint(ref.server_round), ref.name, \
            run.read_json("config.json")
        row = next((r for r in run.rounds() if r["server_round"] == ref.server_round), {})
        score = row.get("pooled_score")
        baseline = run.read_json("registry.json").get("pooled_baseline")
    config = RunConfig.from_mapping(flat)
    module = build_model(config)
    module.load_state_dict(state)
    finite = score if isinstance(score, float) and math.isfinite(score) else None
    return LoadedModel(name, config, module.eval(), finite, baseline)


def load_data(config: RunConfig, data: Path, work_dir: Path, labels_file: Path | None,
              progress: Progress | None = None) -> SiteDataset:
    spec = DataSpec(task=config.task, image_size=config.image_size,
                    voi_window=config.voi_window, labels=config.labels,
                    labels_file=labels_file, foreground=config.foreground)
    return load_site_dataset(data, work_dir, spec, progress=progress)


@torch.no_grad()
def probabilities(model: LoadedModel, images: np.ndarray, batch: int = 16) -> np.ndarray:
    """Sigmoid outputs of the model for every image."""
    out = []
    for start in range(0, len(images), batch):
        chunk = torch.from_numpy(np.ascontiguousarray(images[start:start + batch]))
        out.append(torch.sigmoid(model.module(chunk)).numpy())
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def _auroc(scores: np.ndarray, truth: np.ndarray) -> float:
    if truth.min() == truth.max():
        return float("nan")
    metric = ROCAUCMetric()
    metric(y_pred=torch.from_numpy(scores), y=torch.from_numpy(truth))
    return float(metric.aggregate())  # type: ignore[arg-type]


def _bootstrap(groups: np.ndarray, statistic: Any, seed: int) -> list[float]:
    """95 % percentile interval of `statistic(index)` over patient resamples."""
    rng = np.random.default_rng(seed)
    patients = np.unique(groups)
    members = {p: np.nonzero(groups == p)[0] for p in patients}
    values = []
    for _ in range(BOOTSTRAP):
        drawn = rng.choice(patients, size=len(patients), replace=True)
        value = statistic(np.concatenate([members[p] for p in drawn]))
        if math.isfinite(value):
            values.append(value)
    if len(values) < BOOTSTRAP // 2:
        return [float("nan"), float("nan")]
    low, high = np.percentile(values, [2.5, 97.5])
    return [float(low), float(high)]


def classification(model: LoadedModel, data: SiteDataset, seed: int = 0) -> dict[str, Any]:
    scores = probabilities(model, data.images)
    truth = (data.targets > 0.5).astype(np.float32)
    threshold = model.config.threshold
    auroc: dict[str, float] = {}
    auroc_ci: dict[str, list[float]] = {}
    per_label: dict[str, dict[str, Any]] = {}
    for column, label in enumerate(model.config.labels):
        s, t = scores[:, column], truth[:, column]
        positive, called = t > 0.5, s > threshold
        value = _auroc(s, t)
        if math.isfinite(value):
            auroc[label] = value
            auroc_ci[label] = _bootstrap(data.groups, lambda i, s=s, t=t: _auroc(s[i], t[i]),
                                         seed)
        # One batch item whose "pixels" are the images: bins span the whole dataset.
        s_all, t_all = torch.from_numpy(s).reshape(1, 1, -1), torch.from_numpy(t).reshape(1, 1, -1)
        calibration = CalibrationErrorMetric(num_bins=CALIBRATION_BINS)
        calibration(y_pred=s_all, y=t_all)
        mean_p, observed, counts = calibration_binning(s_all, t_all, num_bins=CALIBRATION_BINS)
        per_label[label] = {
            "positives": int(positive.sum()), "negatives": int((~positive).sum()),
            "sensitivity": float((called & positive).sum() / positive.sum())
            if positive.any() else None,
            "specificity": float((~called & ~positive).sum() / (~positive).sum())
            if (~positive).any() else None,
            "ece": float(calibration.aggregate()),  # type: ignore[arg-type]
            "reliability": {"mean_predicted": _finite(mean_p.flatten()),
                            "observed": _finite(observed.flatten()),
                            "count": [int(c) for c in counts.flatten()]},
        }
    if auroc:
        labels = list(auroc)
        columns = [model.config.labels.index(label) for label in labels]
        auroc["macro"] = float(np.mean([auroc[label] for label in labels]))

        def macro(index: np.ndarray) -> float:
            return float(np.mean([_auroc(scores[index, c], truth[index, c]) for c in columns]))

        auroc_ci["macro"] = _bootstrap(data.groups, macro, seed)
    return {"auroc": auroc, "auroc_ci": auroc_ci, "threshold": threshold,
            "labels": per_label, "scores": scores, "truth": truth}


def _finite(values: torch.Tensor) -> list[float | None]:
    return [float(v) if math.isfinite(float(v)) else None for v in values]


def _summary(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {}
    p5, median, p95 = np.percentile(values, [5, 50, 95])
    return {"mean": float(values.mean()), "std": float(values.std()), "median": float(median),
            "p05": float(p5), "p95": float(p95), "n": int(len(values))}


def segmentation(model: LoadedModel, data: SiteDataset, seed: int = 0) -> dict[str, Any]:
    predicted = torch.from_numpy(probabilities(model, data.images) > model.config.threshold
                                 ).float()
    truth = torch.from_numpy(data.targets.astype(np.float32))
    # ignore_empty=False: no lung in the truth and none predicted scores 1, not NaN
    dice_metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    dice = dice_metric(y_pred=predicted, y=truth).numpy().reshape(-1)  # type: ignore[union-attr]
    hd_metric = HausdorffDistanceMetric(include_background=True, percentile=95,
                                        reduction="none")
    hd95 = hd_metric(y_pred=predicted, y=truth).numpy().reshape(-1)  # type: ignore[union-attr]
    finite_hd = hd95[np.isfinite(hd95)]
    return {"dice_mean": float(dice.mean()),
            "dice_ci": _bootstrap(data.groups, lambda i: float(dice[i].mean()), seed),
            "dice": _summary(dice), "hd95": _summary(finite_hd),
            "hd95_undefined": int(len(hd95) - len(finite_hd)),
            "dice_per_image": dice, "masks": predicted.numpy()}


def evaluate(model: LoadedModel, sites: dict[str, SiteDataset]) -> dict[str, Any]:
    """Per site and pooled; arrays (scores, masks) are kept under `_arrays` for plots."""
    pooled = pool(list(sites.values()))
    rows = {"pooled": pooled, **sites} if len(sites) > 1 else {"pooled": pooled}
    out: dict[str, Any] = {"model": model.name, "task": model.config.task.value,
                           "n_images": int(len(pooled.images)), "per_site": {},
                           "_arrays": {}, "pooled_baseline": model.baseline_ratio()}
    for name, data in rows.items():
        if len(data.images) == 0:
            raise EvaluationError(f"{name}: no usable image for task {model.config.task.value}")
        result = (classification if model.config.task is Task.CXR_CLASSIFY
                  else segmentation)(model, data)
        out["_arrays"][name] = {k: result.pop(k) for k in
                                ("scores", "truth", "dice_per_image", "masks") if k in result}
        result["n_images"] = int(len(data.images))
        if name == "pooled":
            out.update(result)
        else:
            out["per_site"][name] = result
    if len(sites) == 1:
        out["per_site"][next(iter(sites))] = {k: v for k, v in out.items()
                                              if k not in {"per_site", "_arrays", "model",
                                                           "task", "pooled_baseline"}}
    return out


def pool(sites: list[SiteDataset]) -> SiteDataset:
    if len(sites) == 1:
        return sites[0]
    offset, groups = 0, []
    for data in sites:  # patients of different sites never share a group
        groups.append(data.groups + offset)
        offset += int(data.groups.max()) + 1 if len(data.groups) else 0
    return SiteDataset(images=np.concatenate([d.images for d in sites]),
                       targets=np.concatenate([d.targets for d in sites]),
                       groups=np.concatenate(groups), content_hash="",
                       phi_values=frozenset().union(*(d.phi_values for d in sites)),
                       skipped=())
