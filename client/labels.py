"""A site's labels.csv, keyed by SOPInstanceUID, AccessionNumber or StudyInstanceUID."""

from __future__ import annotations

import csv
from pathlib import Path

from client.dicom_scan import ImageRef

KEY_COLUMNS = ("sop_instance_uid", "accession_number", "study_instance_uid")


class LabelsError(ValueError):
    """A labels file that cannot be used as configured."""


def load_labels(path: Path, key: str = "sop_instance_uid") -> dict[str, dict[str, str]]:
    """Rows of `path` by their `key` column; a repeated key is an error naming the line."""
    if key not in KEY_COLUMNS:
        raise LabelsError(f"labels key must be one of {list(KEY_COLUMNS)}, got {key!r}")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or key not in reader.fieldnames:
            raise LabelsError(
                f"{path}: no column {key!r} (columns: {reader.fieldnames}); set the site's "
                "labels key to the column that identifies each image or study"
            )
        rows: dict[str, dict[str, str]] = {}
        for line, row in enumerate(reader, start=2):
            value = (row.get(key) or "").strip()
            if not value:
                continue
            if value in rows:
                raise LabelsError(f"{path}, line {line}: {key} value repeated")
            rows[value] = row
    return rows


def image_key(image: ImageRef, key: str) -> str:
    """The value of `key` for one image."""
    if key == "sop_instance_uid":
        return image.sop_instance_uid
    if key == "accession_number":
        return image.accession_number
    return image.study_uid


def labelled_images(images: list[ImageRef], labels: dict[str, dict[str, str]],
                    key: str) -> list[ImageRef]:
    """The images that have a labels row."""
    return [image for image in images if image_key(image, key) in labels]
