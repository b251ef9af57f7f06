"""volume-seg: CT/MR volumes and their label maps, resized to a cube for 3D training.

A site lists its volumes in `volumes.csv` in the data folder (or the node config
`labels-file`): columns `image` and `label_map` (NIfTI paths relative to the data
folder) and optionally `patient` (rows of one patient stay on one side of the
split; without it each row is its own patient). A row that cannot be used is
reported with its reason and the others go on.

Preprocessing, defined once here for training and evaluation: intensities scaled
by the volume's own 0.5-99.5 percentiles to [0, 1] (CT and MR alike), then an
area resize to size^3; the label map becomes one foreground class (the run's
`foreground` values) resized nearest-neighbour.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from client.cache import write_private
from client.dicom_scan import Skipped, patient_key
from client.volumes import VolumeError, load_nifti

if TYPE_CHECKING:
    from client.dataset import DataSpec, SiteDataset

LOG = logging.getLogger("fedrad.client")
MANIFEST = "volumes.csv"


def _normalise(volume: np.ndarray) -> np.ndarray:
    low, high = np.percentile(volume, (0.5, 99.5))
    scale = 1.0 / (high - low) if high > low else 1.0
    return np.clip((volume - low) * scale, 0.0, 1.0).astype(np.float32)


def _resize(volume: np.ndarray, size: int, *, nearest: bool) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    out = F.interpolate(tensor, size=(size, size, size), mode="nearest" if nearest else "area")
    return out[0, 0].numpy()


def _rows(manifest: Path) -> list[dict[str, str]]:
    from client.dataset import DatasetError

    if not manifest.is_file():
        raise DatasetError(f"{manifest} not found: volume-seg needs a volumes.csv with columns "
                           "image,label_map (paths relative to the data folder)")
    with manifest.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"image", "label_map"} <= set(reader.fieldnames):
            raise DatasetError(f"{manifest}: expected columns image,label_map "
                               f"(got {reader.fieldnames})")
        return list(reader)


def load_volume_dataset(root: Path, work_dir: Path, spec: DataSpec) -> SiteDataset:
    from client.dataset import DatasetError, SiteDataset, content_hash

    manifest = spec.labels_file or root / MANIFEST
    rows = _rows(manifest)
    digest = hashlib.sha256(f"volumes|v1|{spec.image_size}|{spec.foreground}".encode())
    digest.update(manifest.read_bytes())
    for row in rows:
        for column in ("image", "label_map"):
            path = root / row[column]
            stat = path.stat() if path.is_file() else None
            digest.update(f"|{row[column]}|{stat.st_size if stat else -1}|"
                          f"{stat.st_mtime_ns if stat else -1}".encode())
    cache = work_dir / "cache" / "volumes" / f"{digest.hexdigest()}.npz"
    meta_file = cache.with_suffix(".json")
    meta = json.loads(meta_file.read_text()) if cache.is_file() and meta_file.is_file() else {}
    if "patients" in meta:
        with np.load(cache) as stored:
            return SiteDataset(images=stored["images"], targets=stored["targets"],
                               groups=stored["groups"], content_hash=meta["content_hash"],
                               phi_values=frozenset(),
                               skipped=tuple(Skipped(**s) for s in meta["skipped"]),
                               patients=tuple(meta["patients"]))
    images, targets, patients, skipped = [], [], [], []
    for line, row in enumerate(rows, start=2):
        try:
            image, label = load_nifti(root / row["image"]), load_nifti(root / row["label_map"])
        except (OSError, VolumeError, ValueError) as exc:
            skipped.append(Skipped(f"{manifest.name}:{line}",
                                   f"volume cannot be read ({type(exc).__name__})"))
            continue
        if image.array.shape != label.array.shape:
            skipped.append(Skipped(f"{manifest.name}:{line}",
                                   f"label map is {label.array.shape}, image is "
                                   f"{image.array.shape}"))
            continue
        mask = np.isin(np.rint(label.array).astype(np.int64), spec.foreground)
        if not mask.any():
            skipped.append(Skipped(f"{manifest.name}:{line}",
                                   f"label map holds none of the foreground values "
                                   f"{list(spec.foreground)}"))
            continue
        images.append(_resize(_normalise(image.array), spec.image_size, nearest=False))
        targets.append(_resize(mask.astype(np.float32), spec.image_size, nearest=True)
                       .astype(np.uint8))
        patients.append(row.get("patient") or f"row-{line}")
    if not images:
        reasons = "; ".join(f"{s.file}: {s.reason}" for s in skipped)
        raise DatasetError(f"no usable volume in {manifest}: {reasons}")
    order = {p: i for i, p in enumerate(sorted(set(patients)))}
    stacked = np.stack(images)[:, None]
    masks = np.stack(targets)[:, None]
    groups = np.array([order[p] for p in patients], dtype=np.int64)
    meta = {"content_hash": content_hash(stacked, masks),
            "patients": [patient_key(f"volume|{p}") for p in sorted(order)],
            "skipped": [s.__dict__ for s in skipped]}
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.tmp.npz")
    np.savez(tmp, images=stacked, targets=masks, groups=groups)
    tmp.replace(cache)
    write_private(cache.with_suffix(".json"), json.dumps(meta).encode())
    LOG.info("volumes: %d loaded, %d skipped", len(images), len(skipped))
    return SiteDataset(images=stacked, targets=masks, groups=groups,
                       content_hash=meta["content_hash"], phi_values=frozenset(),
                       skipped=tuple(skipped), patients=tuple(meta["patients"]))
