"""`fedrad report RUN`: the run's report, plus what the global model does on local data.

The run part (learning curves per site, participation, privacy spent) comes from the
run folder (server.report). With `--data`, the run's final model is evaluated on local
DICOM folders (fedrad.evaluation) and the report adds ROC and reliability curves, or
Dice/HD95 distributions, and Grad-CAM (classification) or mask (segmentation) overlays
for a few examples per class. Those images are rendered here from local data and stay
in the report file written here; nothing is sent anywhere.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from client.dataset import SiteDataset
from common.config import Task
from fedrad.evaluation import LoadedModel, evaluate, load_data, load_model, pool
from fedrad.saliency import gradcam, overlay_png
from server.registry import RunFolder
from server.report import img_tag, png_bytes, pyplot, write_report

EXAMPLES_PER_CLASS = 3


def _roc_points(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every threshold, for plotting."""
    order = np.argsort(-scores, kind="stable")
    hits = truth[order] > 0.5
    tpr = np.concatenate([[0.0], np.cumsum(hits) / max(1, hits.sum())])
    fpr = np.concatenate([[0.0], np.cumsum(~hits) / max(1, (~hits).sum())])
    return fpr, tpr


def _roc_png(result: dict[str, Any], labels: tuple[str, ...]) -> bytes:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    arrays = result["_arrays"]["pooled"]
    for column, label in enumerate(labels):
        if label not in result["auroc"]:
            continue
        fpr, tpr = _roc_points(arrays["scores"][:, column], arrays["truth"][:, column])
        low, high = result["auroc_ci"][label]
        ax.plot(fpr, tpr, label=f"{label}: AUROC {result['auroc'][label]:.3f} "
                               f"[{low:.3f}, {high:.3f}]")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("ROC (pooled local data, 95 % bootstrap CI)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return png_bytes(fig)


def _reliability_png(result: dict[str, Any]) -> bytes:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for label, values in result["labels"].items():
        pairs = [(p, o) for p, o in zip(values["reliability"]["mean_predicted"],
                                        values["reliability"]["observed"], strict=True)
                 if p is not None and o is not None]
        if pairs:
            ax.plot(*zip(*pairs, strict=True), marker="o",
                    label=f"{label}: ECE {values['ece']:.3f}")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed frequency")
    ax.set_title("reliability (calibration)", fontsize=9)
    ax.legend(fontsize=7)
    return png_bytes(fig)


def _dice_png(result: dict[str, Any], sites: list[str]) -> bytes:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    names = sites if len(sites) > 1 else ["pooled"]
    for name in names:
        ax.hist(result["_arrays"][name if len(sites) > 1 else "pooled"]["dice_per_image"],
                bins=np.linspace(0, 1, 21), alpha=0.6, label=name)
    ax.set_xlabel("Dice per image")
    ax.set_ylabel("images")
    low, high = result["dice_ci"]
    ax.set_title(f"Dice: mean {result['dice_mean']:.3f} [{low:.3f}, {high:.3f}]", fontsize=9)
    ax.legend(fontsize=7)
    return png_bytes(fig)


def _overlays(model: LoadedModel, pooled: SiteDataset, result: dict[str, Any]) -> list[str]:
    arrays = result["_arrays"]["pooled"]
    figures = []
    if model.config.task is Task.CXR_CLASSIFY:
        for column, label in enumerate(model.config.labels):
            for positive in (True, False):
                chosen = np.nonzero((arrays["truth"][:, column] > 0.5) == positive)[0]
                for index in chosen[:EXAMPLES_PER_CLASS]:
                    image = pooled.images[index]
                    heat = gradcam(model.module, model.config.model, image, column)
                    caption = (f"{label} = {int(positive)}: p "
                               f"{arrays['scores'][index, column]:.2f}")
                    figures.append(img_tag(overlay_png(image[0], heat, caption),
                                           f"Grad-CAM {caption}"))
        return figures
    dice = arrays["dice_per_image"]
    order = np.argsort(dice)
    for index in [*order[:2], *order[-2:]]:  # the two worst and the two best
        caption = f"predicted mask, Dice {dice[index]:.2f}"
        figures.append(img_tag(overlay_png(pooled.images[index][0],
                                           arrays["masks"][index][0], caption, mask=True),
                               caption))
    return figures


def local_sections(model: LoadedModel, sites: dict[str, SiteDataset]) -> list[str]:
    """Report sections from local data: curves, distributions and overlays."""
    result = evaluate(model, sites)
    parts = [f"<h2>Model {html.escape(model.name)} on local data "
             f"({result['n_images']} images: {html.escape(', '.join(sites))})</h2>"]
    if model.config.task is Task.CXR_CLASSIFY:
        parts += [img_tag(_roc_png(result, model.config.labels), "ROC curves"),
                  img_tag(_reliability_png(result), "reliability plot")]
        parts.append("<table><tr><th>label</th><th>AUROC [95 % CI]</th><th>sensitivity</th>"
                     "<th>specificity</th><th>ECE</th></tr>")
        for label, values in result["labels"].items():
            ci = result["auroc_ci"].get(label, [float("nan")] * 2)
            auroc = result["auroc"].get(label, float("nan"))
            parts.append(f"<tr><td>{html.escape(label)}</td><td>{auroc:.3f} [{ci[0]:.3f}, "
                         f"{ci[1]:.3f}]</td><td>{_num(values['sensitivity'])}</td>"
                         f"<td>{_num(values['specificity'])}</td><td>{values['ece']:.3f}</td>"
                         "</tr>")
        parts.append("</table><h3>Grad-CAM (MONAI), a few examples per class</h3>")
    else:
        parts.append(img_tag(_dice_png(result, list(sites)), "Dice distribution"))
        hd95 = result["hd95"]
        parts.append(f"<p>HD95 (pixels at {model.config.image_size} px): median "
                     f"{hd95.get('median', float('nan')):.2f}, 5-95 % "
                     f"{hd95.get('p05', float('nan')):.2f}-{hd95.get('p95', float('nan')):.2f}"
                     f"; undefined (empty masks) {result['hd95_undefined']}</p>"
                     "<h3>Predicted masks: the two worst and the two best</h3>")
    parts += _overlays(model, pool(list(sites.values())), result)
    return parts


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def write_run_report(server_home: Path, run_id: str, *, data: list[Path], out: Path,
                     work_dir: Path, labels_file: Path | None) -> Path:
    """The run's report at `out`, with local-data sections when `data` is given: of the
    model `run_id` names (RUN: the last round; RUN:ROUND or RUN:best)."""
    run = RunFolder.open(server_home, run_id.partition(":")[0])
    extra: list[str] = []
    if data:
        model = load_model(run_id, server_home=server_home, verify_key=None)
        sites = {folder.resolve().name: load_data(model.config, folder,
                                                  work_dir / folder.resolve().name,
                                                  labels_file)
                 for folder in data}
        extra = local_sections(model, sites)
    return write_report(run, extra, out)
