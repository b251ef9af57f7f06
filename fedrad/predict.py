"""`fedrad predict`: a registry model on one DICOM study at the hospital, results back to
PACS.

Segmentation → one DICOM SEG per image (highdicom: BINARY, segment "Lung", algorithm
AUTOMATIC, referencing its source image), at the image's own size.
Classification → results.json keyed by the study's UIDs (StudyInstanceUID, and each
image's SeriesInstanceUID / SOPInstanceUID) with a probability and a call per label.
Both → a Grad-CAM (classification) or mask (segmentation) overlay PNG per image.

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

import highdicom as hd
import numpy as np
import pydicom
import torch
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes

from client.pixels import PixelError, projection_pixels, resize_area
from common.config import Task
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


def _seg(image: StudyImage, mask: np.ndarray, model: LoadedModel, number: int
         ) -> hd.seg.Segmentation:
    ds = image.dataset
    full = _to_shape(mask, ds)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="fedrad", version=model.name, family=codes.cid7162.ArtificialIntelligence)
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Lung",
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.Lung,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm)
    return hd.seg.Segmentation(
        source_images=[ds], pixel_array=full[None].astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment], series_instance_uid=hd.UID(), series_number=900 + number,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="fedrad",
        manufacturer_model_name=f"fedrad model {model.name}", software_versions="fedrad",
        device_serial_number="fedrad", series_description="fedrad lung segmentation",
        pixel_measures=_pixel_measures(ds))


def _to_shape(mask: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """The model-size mask at the image's Rows x Columns (nearest neighbour)."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    size = mask.shape[0]
    return mask[(np.arange(rows) * size) // rows][:, (np.arange(cols) * size) // cols]


def _pixel_measures(ds: pydicom.Dataset) -> hd.PixelMeasuresSequence | None:
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    if not spacing:
        return None
    return hd.PixelMeasuresSequence(pixel_spacing=[float(v) for v in spacing],
                                    slice_thickness=1.0)


@torch.no_grad()
def _outputs(model: LoadedModel, images: list[StudyImage]) -> np.ndarray:
    batch = torch.from_numpy(np.stack([i.pixels[None] for i in images]).astype(np.float32))
    return torch.sigmoid(model.module(batch)).numpy()


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
        else:
            mask = output[0] > threshold
            seg = _seg(image, mask, model, number)
            seg_name = f"seg-{number:03d}.dcm"
            seg.save_as(out / seg_name)
            entry.update({"seg_file": seg_name, "seg_sop_instance_uid": str(seg.SOPInstanceUID),
                          "foreground_fraction": float(mask.mean())})
            png = overlay_png(image.pixels, mask.astype(np.float32),
                              f"predicted lung ({mask.mean():.0%} of image)", mask=True)
        overlay = f"overlay-{number:03d}.png"
        (out / overlay).write_bytes(png)
        entry["overlay"] = overlay
        results["images"].append(entry)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    LOG.info("predicted %d images (%d files skipped) into %s", len(images), len(skipped), out)
    return results
