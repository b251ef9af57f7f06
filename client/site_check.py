"""`fedrad site check`: what a site can train on, without sending anything anywhere."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from client.dicom_scan import scan_folder
from client.labels import labelled_images, load_labels
from client.pixels import PixelError, frames, seg_mask
from client.volumes import VolumeError, build_volume, group_series

LABELS_FILE = "labels.csv"


def check_site(data: Path, labels_file: Path | None = None,
               labels_key: str = "sop_instance_uid") -> dict[str, Any]:
    """Scan and decode every image once; count what is usable and list what is not."""
    scan = scan_folder(data)
    images = {image.sop_instance_uid: image for image in scan.images}
    decoded: dict[str, tuple[int, int]] = {}
    for uid, image in images.items():
        try:
            dims = frames(image.path).shape
            decoded[uid] = (int(dims[1]), int(dims[2]))
        except PixelError as exc:
            scan.skip(image.path, str(exc))
    masks = 0
    for seg in scan.segs:
        shape = decoded.get(seg.referenced_sop_uid)
        if seg.referenced_sop_uid not in images:
            scan.skip(seg.path, "SEG references an image that is not in the data folder")
        elif shape is None:
            scan.skip(seg.path, "SEG references an image that could not be decoded")
        else:
            try:
                seg_mask(seg.path, shape)
                masks += 1
            except PixelError as exc:
                scan.skip(seg.path, str(exc))
    volumes = 0
    for series in group_series([images[uid] for uid in decoded]).values():
        if len(series) < 2:
            continue
        try:
            build_volume([image.path for image in series])
            volumes += 1
        except VolumeError as exc:
            scan.skip(series[0].path, f"series of {len(series)} slices: {exc}")
    usable = [images[uid] for uid in decoded]
    labels_path = labels_file or data / LABELS_FILE
    labels = load_labels(labels_path, labels_key) if labels_path.is_file() else {}
    return {
        "images": len(usable),
        "series": len({image.series_uid for image in usable}),
        "studies": len({image.study_uid for image in usable}),
        "patients": len({image.patient_key for image in usable}),
        "modalities": dict(Counter(image.modality for image in usable)),
        "transfer_syntaxes": dict(Counter(image.transfer_syntax for image in usable)),
        "masks_matched": masks,
        "volumes": volumes,
        "labelled": len(labelled_images(usable, labels, labels_key)),
        "other_objects": dict(scan.other_objects),
        "phi_fields_in_headers": scan.phi_fields,
        "skipped": [{"file": s.file, "reason": s.reason} for s in scan.skipped],
    }
