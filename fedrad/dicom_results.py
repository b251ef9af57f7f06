"""A model's results as DICOM objects a PACS stores beside the images (highdicom).

Segmentation → DICOM SEG: BINARY, one segment "Lung" (algorithm AUTOMATIC, named by the
model), at the image's own Rows x Columns, referencing its source image.
Classification → DICOM Comprehensive 3D SR holding a TID 1500 Measurement Report: per
label one measurement group (TID 1501) with the finding, the model's probability
(DCM 122157 "Probability", UCUM "1") and the call at the model's threshold
(SCT Present/Absent), the algorithm (fedrad, the model's registry name) and the source
image; the observer is the model as a device. Both are marked unverified: a clinician
verifies, not fedrad.
"""

from __future__ import annotations

from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

FEDRAD_CODES = "99FEDRAD"  # private coding scheme ("99" prefix, PS3.16 8.2): the labels
PLAIN_CHEST_XRAY = hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")
SEG_SERIES, SR_SERIES = 900, 950  # series numbers (+ image number) of what fedrad writes


def _algorithm(model_name: str) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name="fedrad", version=model_name, family=codes.cid7162.ArtificialIntelligence)


def lung_seg(source: pydicom.Dataset, mask: np.ndarray, model_name: str, number: int
             ) -> hd.seg.Segmentation:
    """A model-size boolean mask as a SEG over `source` (resized by nearest neighbour)."""
    full = _to_shape(mask, source)
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Lung",
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.Lung,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=_algorithm(model_name))
    return hd.seg.Segmentation(
        source_images=[source], pixel_array=full[None].astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment], series_instance_uid=hd.UID(),
        series_number=SEG_SERIES + number, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="fedrad", manufacturer_model_name=f"fedrad model {model_name}",
        software_versions="fedrad", device_serial_number="fedrad",
        series_description="fedrad lung segmentation", pixel_measures=_pixel_measures(source))


def _to_shape(mask: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    rows, cols = int(ds.Rows), int(ds.Columns)
    size = mask.shape[0]
    return mask[(np.arange(rows) * size) // rows][:, (np.arange(cols) * size) // cols]


def _pixel_measures(ds: pydicom.Dataset) -> hd.PixelMeasuresSequence | None:
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    if not spacing:
        return None
    return hd.PixelMeasuresSequence(pixel_spacing=[float(v) for v in spacing],
                                    slice_thickness=1.0)


def finding_code(label: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(label[:16], FEDRAD_CODES, label)


def classification_sr(source: pydicom.Dataset, probabilities: dict[str, float],
                      threshold: float, model_name: str, number: int
                      ) -> hd.sr.Comprehensive3DSR:
    """The model's findings on one image as a TID 1500 measurement report."""
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name="fedrad", manufacturer_name="fedrad",
            model_name=model_name[:64]))
    algorithm = hd.sr.AlgorithmIdentification(name="fedrad", version=model_name[:64])
    image = hd.sr.SourceImageForMeasurementGroup.from_source_image(source)
    groups = [
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(),
                                                         identifier=f"fedrad {label}"),
            finding_type=finding_code(label), algorithm_id=algorithm,
            measurements=[hd.sr.Measurement(name=codes.DCM.Probability, value=probability,
                                            unit=codes.UCUM.NoUnits, algorithm_id=algorithm)],
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(
                name=finding_code(label),
                value=codes.SCT.Present if probability > threshold else codes.SCT.Absent)],
            source_images=[image])
        for label, probability in probabilities.items()]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=PLAIN_CHEST_XRAY, imaging_measurements=groups)
    return hd.sr.Comprehensive3DSR(
        evidence=[source], content=report, series_instance_uid=hd.UID(),
        series_number=SR_SERIES + number, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="fedrad", is_complete=True, is_final=False, is_verified=False,
        series_description=f"fedrad findings ({model_name})"[:64])


def read_probabilities(sr: pydicom.Dataset) -> dict[str, float]:
    """label → probability, read back from an SR written by `classification_sr`."""
    report: Any = hd.sr.Comprehensive3DSR.from_dataset(sr).content  # a MeasurementReport
    out = {}
    for group in report.get_image_measurement_groups():
        probability = group.get_measurements(name=codes.DCM.Probability)[0]
        out[group.finding_type.meaning] = float(probability.value)
    return out
