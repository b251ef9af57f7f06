"""`fedrad site check`: what a site can train on, without sending anything anywhere."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom

from client.dicom_scan import ImageRef, SegRef, scan_folder
from client.labels import labelled_images, load_labels
from client.pixels import PixelError, check_geometry, dataset_frames, nifti_mask, seg_pixels
from client.volumes import VolumeError, build_volume, group_series

LABELS_FILE = "labels.csv"


def check_site(data: Path, labels_file: Path | None = None,
               labels_key: str = "sop_instance_uid",
               progress: Callable[[int], None] = lambda done: None) -> dict[str, Any]:
    """Scan and decode every image once; count what is usable and list what is not;
    `progress(n)` after each of the n image or mask files decoded so far."""
    decoded: dict[str, tuple[int, int]] = {}  # image UID -> (rows, cols)
    seg_shapes: dict[Path, tuple[int, int]] = {}
    errors: dict[Path, str] = {}
    visited: list[Path] = []

    def visit(kind: str, ref: ImageRef | SegRef, ds: pydicom.Dataset | None) -> None:
        """Decode each file in the scan's own read (one read per file)."""
        visited.append(ref.path)
        progress(len(visited))
        try:
            if isinstance(ref, SegRef):
                mask = nifti_mask(ref.path) if ds is None else seg_pixels(ds)
                seg_shapes[ref.path] = (int(mask.shape[0]), int(mask.shape[1]))
            elif ds is not None:
                dims = dataset_frames(ds).shape
                decoded[ref.sop_instance_uid] = (int(dims[1]), int(dims[2]))
        except PixelError as exc:
            errors[ref.path] = str(exc)

    scan = scan_folder(data, visit=visit)
    images = {image.sop_instance_uid: image for image in scan.images}
    for image in scan.images:
        if image.path in errors:
            scan.skip(image.path, errors[image.path])
    masks = 0
    for seg in scan.segs:
        shape = decoded.get(seg.referenced_sop_uid)
        if seg.path in errors:  # its own fault first (a bomb, a broken mask)
            scan.skip(seg.path, errors[seg.path])
        elif seg.referenced_sop_uid not in images:
            scan.skip(seg.path, "SEG references an image that is not in the data folder")
        elif shape is None:
            scan.skip(seg.path, "SEG references an image that could not be decoded")
        else:
            try:
                check_geometry(seg_shapes[seg.path], shape)
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
