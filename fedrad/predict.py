"""`fedrad predict`: a registry model on one DICOM study at the hospital, results back to
PACS.

Segmentation → one DICOM SEG per image; classification → one DICOM SR (TID 1500
measurement report) per image with a probability and a call per label
(fedrad.dicom_results). Both → results.json keyed by the study's UIDs (StudyInstanceUID,
and each image's SeriesInstanceUID / SOPInstanceUID) and a Grad-CAM (classification) or
mask (segmentation) overlay PNG per image. With --dicomweb, `fedrad predict` stores the
objects `result_files` lists into the PACS the study came from (fedrad.pacs.store: one
STOW-RS request, once every file is written).

The model is used only once its consortium signature verifies (fedrad.evaluation's
load_model). A file that is not a usable image is reported and skipped; results.json
carries no patient name or id, only UIDs the PACS already holds.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
from pydicom.errors import InvalidDicomError

from client.pixels import PixelError, projection_pixels, resize_area
from common.config import Task
from fedrad.dicom_results import classification_sr, lung_seg
from fedrad.evaluation import EvaluationError, LoadedModel
from fedrad.saliency import gradcam, overlay_png

LOG = logging.getLogger("fedrad.predict")
PROJECTION_MODALITIES = {"CR", "DX"}
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


@dataclass(frozen=True)
class StudyImage:
    path: Path
    dataset: pydicom.Dataset
    pixels: np.ndarray  # (S, S) float32 in [0, 1], as the model was trained


def read_study(study: Path, model: LoadedModel) -> tuple[list[StudyImage], list[dict[str, str]]]:
    """The study's projection images, and a line for every file skipped (and why)."""
    if model.config.task is Task.VOLUME_SEG:
        raise EvaluationError("predict handles projection images (CR/DX); this model is "
                              "for 3D volumes")
    images, skipped = [], []
    for path in sorted(p for p in study.rglob("*") if p.is_file()):
        name = str(path.relative_to(study))
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError, ValueError) as exc:
            skipped.append({"file": name,
                            "reason": f"not readable as DICOM ({type(exc).__name__})"})
            continue
        if str(ds.get("SOPClassUID", "")) == SEG_SOP_CLASS:
            skipped.append({"file": name, "reason": "a segmentation, not an image"})
            continue
        if str(ds.get("Modality", "")) not in PROJECTION_MODALITIES or "PixelData" not in ds:
            skipped.append({"file": name, "reason": f"modality {ds.get('Modality', '?')} is "
                                                    "not a projection image (CR/DX)"})
            continue
        try:
            pixels = projection_pixels(ds, voi_window=model.config.voi_window)
        except (PixelError, ValueError, NotImplementedError) as exc:
            skipped.append({"file": name, "reason": f"pixels cannot be decoded: {exc}"})
            continue
        images.append(StudyImage(path, ds, resize_area(pixels, model.config.image_size)))
    if not images:
        raise EvaluationError(f"{study}: no projection image (CR/DX) to predict on; "
                              f"skipped: {skipped}")
    studies = {str(i.dataset.StudyInstanceUID) for i in images}
    if len(studies) > 1:
        raise EvaluationError(f"{study} holds {len(studies)} studies; give one study folder")
    return images, skipped


@torch.no_grad()
def _outputs(model: LoadedModel, images: list[StudyImage]) -> np.ndarray:
    batch = torch.from_numpy(np.stack([i.pixels[None] for i in images]).astype(np.float32))
    return torch.sigmoid(model.module(batch)).numpy()


def _save(result: pydicom.Dataset, path: Path, kind: str) -> dict[str, str]:
    result.save_as(path, enforce_file_format=True)
    return {f"{kind}_file": path.name, f"{kind}_sop_instance_uid": str(result.SOPInstanceUID)}


def result_files(out: Path, results: dict[str, Any]) -> list[Path]:
    """The DICOM objects (SEG or SR) a prediction wrote into `out`."""
    return [out / image[key] for image in results["images"]
            for key in ("seg_file", "sr_file") if key in image]


def predict_study(model: LoadedModel, study: Path, out: Path) -> dict[str, Any]:
    """Write the results into `out`; return what results.json holds."""
    images, skipped = read_study(study, model)
    out.mkdir(parents=True, exist_ok=True)
    probabilities = _outputs(model, images)
    threshold = model.config.threshold
    results: dict[str, Any] = {
        "model": model.name, "task": model.config.task.value, "threshold": threshold,
        "study_instance_uid": str(images[0].dataset.StudyInstanceUID),
        "images": [], "skipped": skipped,
    }
    for number, (image, output) in enumerate(zip(images, probabilities, strict=True), start=1):
        entry: dict[str, Any] = {
            "series_instance_uid": str(image.dataset.SeriesInstanceUID),
            "sop_instance_uid": str(image.dataset.SOPInstanceUID),
        }
        if model.config.task is Task.CXR_CLASSIFY:
            entry["labels"] = {label: {"probability": float(output[c]),
                                       "positive": bool(output[c] > threshold)}
                               for c, label in enumerate(model.config.labels)}
            top = int(np.argmax(output))
            heat = gradcam(model.module, model.config.model, image.pixels[None], top)
            png = overlay_png(image.pixels, heat, f"Grad-CAM: {model.config.labels[top]} "
                                                  f"p={output[top]:.2f}")
            sr = classification_sr(image.dataset, {k: v["probability"]
                                                   for k, v in entry["labels"].items()},
                                   threshold, model.name, number)
            entry.update(_save(sr, out / f"sr-{number:03d}.dcm", "sr"))
        else:
            mask = output[0] > threshold
            seg = lung_seg(image.dataset, mask, model.name, number)
            entry.update(_save(seg, out / f"seg-{number:03d}.dcm", "seg"))
            entry["foreground_fraction"] = float(mask.mean())
            png = overlay_png(image.pixels, mask.astype(np.float32),
                              f"predicted lung ({mask.mean():.0%} of image)", mask=True)
        overlay = f"overlay-{number:03d}.png"
        (out / overlay).write_bytes(png)
        entry["overlay"] = overlay
        results["images"].append(entry)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    LOG.info("predicted %d images (%d files skipped) into %s", len(images), len(skipped), out)
    return results
