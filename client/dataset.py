"""A site's training data for one task, at a fixed size, split by patient.

`load_site_dataset` reads the data folder through the content-hashed cache
(client/ingest.py, client/cache.py) and assembles what the task needs:

- lung-seg: each projection image with its lung mask (DICOM SEG or NIfTI);
- cxr-classify: each projection image with its labels.csv row (one 0/1 per label);
- volume-seg: CT/MR volumes with their label maps (client/volume_dataset.py).

What is assembled is cached too, so a later round reads two files and decodes nothing.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.cache import (
    ContentIndex,
    DatasetStore,
    ShardStore,
    dataset_key,
    read_rows,
    settings_tag,
)
from client.dicom_scan import Skipped, walk_files
from client.ingest import Ingested, Progress, ingest
from client.labels import LabelsError, image_key, load_labels
from client.pixels import PixelError, check_geometry
from common.config import Task

LOG = logging.getLogger("fedrad.client")
LABELS_FILE = "labels.csv"


class DatasetError(ValueError):
    """Nothing in the data folder can be used for the task; the message says why."""


@dataclass(frozen=True)
class DataSpec:
    """What a task reads from a site's folder; every field is part of the cache key."""

    task: Task = Task.LUNG_SEG
    image_size: int = 64
    voi_window: bool = False
    labels: tuple[str, ...] = ()  # cxr-classify: labels.csv columns
    labels_file: Path | None = None  # default: <data>/labels.csv
    labels_key: str = "sop_instance_uid"
    foreground: tuple[int, ...] = (1,)  # volume-seg: label-map values that are foreground


@dataclass(frozen=True)
class SiteDataset:
    """Arrays ready for training; nothing in it identifies a patient."""

    images: np.ndarray  # (N, 1, S, S[, S]) float32 in [0, 1]
    targets: np.ndarray  # segmentation: (N, 1, S, S[, S]) uint8 masks; classification: (N, L)
    groups: np.ndarray  # (N,) int: patient index, for grouped splits
    content_hash: str  # identifies these arrays (cache, audit)
    phi_values: frozenset[str]
    skipped: tuple[Skipped, ...]
    patients: tuple[str, ...] = ()  # patient key of each group index (the privacy ledger's)

    def split(self, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Train/validation indices with every patient on one side only."""
        patients = np.unique(self.groups)
        if len(patients) < 2:
            raise DatasetError("a site needs images of at least 2 patients to hold some out "
                               f"for validation; this one has {len(patients)}")
        rng = np.random.default_rng(seed)
        order = rng.permutation(patients)
        n_val = min(max(1, round(len(patients) * val_fraction)), len(patients) - 1)
        val_patients = set(order[:n_val].tolist())
        is_val = np.array([g in val_patients for g in self.groups])
        return np.nonzero(~is_val)[0], np.nonzero(is_val)[0]


def content_hash(images: np.ndarray, targets: np.ndarray) -> str:
    return hashlib.sha256(images.tobytes() + targets.tobytes()).hexdigest()


def _pair_masks(found: Ingested) -> list[tuple[Path, Path, str]]:
    """(image, mask, patient key) for every usable pair; everything else is reported."""
    scan, shards = found.scan, found.shards
    segs_by_image = {seg.referenced_sop_uid: seg for seg in scan.segs}
    image_uids = {image.sop_instance_uid for image in scan.images}
    for orphan in scan.segs:
        if orphan.referenced_sop_uid not in image_uids:
            scan.skip(orphan.path, "SEG references an image that is not in the data folder")
    pairs = []
    for image in scan.images:
        seg = segs_by_image.get(image.sop_instance_uid)
        if seg is None:
            scan.skip(image.path, "image has no lung SEG (not usable for segmentation)")
            continue
        picture, mask = shards[image.path], shards[seg.path]
        if picture.error or mask.error:
            scan.skip(image.path, picture.error or mask.error)
            continue
        try:
            check_geometry(mask.shape, picture.shape)
        except PixelError as exc:
            scan.skip(seg.path, str(exc))
            continue
        pairs.append((image.path, seg.path, image.patient_key))
    return pairs


def _label_rows(found: Ingested, spec: DataSpec, labels_path: Path
                ) -> list[tuple[Path, list[float], str]]:
    """(image, 0/1 per label, patient key) for every image with a complete labels row."""
    rows = load_labels(labels_path, spec.labels_key)
    missing = [c for c in spec.labels if rows and c not in next(iter(rows.values()))]
    if missing:
        raise LabelsError(f"{labels_path}: no column(s) {missing}; the run's `labels` setting "
                          "names the labels.csv columns to train on")
    out = []
    for image in found.scan.images:
        if found.shards[image.path].error:
            found.scan.skip(image.path, found.shards[image.path].error)
            continue
        row = rows.get(image_key(image, spec.labels_key))
        if row is None:
            found.scan.skip(image.path, f"no row in {labels_path.name} for this image")
            continue
        values = [(row.get(column) or "").strip() for column in spec.labels]
        if any(value == "" for value in values):
            found.scan.skip(image.path, f"{labels_path.name}: empty label (unlabelled image)")
            continue
        if any(value not in ("0", "1") for value in values):
            found.scan.skip(image.path, f"{labels_path.name}: a label is not 0 or 1")
            continue
        out.append((image.path, [float(v) for v in values], image.patient_key))
    return out


def _assemble(shard_folder: Path, meta: dict) -> SiteDataset | None:
    images = read_rows(shard_folder, [tuple(loc) for loc in meta["images"]])
    targets: np.ndarray | None
    if meta["targets"] is None:
        targets = np.asarray(meta["labels"], dtype=np.float32)
    else:
        targets = read_rows(shard_folder, [tuple(loc) for loc in meta["targets"]])
    if images is None or targets is None or "patients" not in meta:  # (an older cache)
        return None
    return SiteDataset(
        images=images[:, None].astype(np.float32, copy=False),
        targets=targets if meta["targets"] is None else targets[:, None],
        groups=np.asarray(meta["groups"], dtype=np.int64),
        content_hash=str(meta["content_hash"]),
        phi_values=frozenset(meta["phi_values"]),
        skipped=tuple(Skipped(**s) for s in meta["skipped"]),
        patients=tuple(meta["patients"]),
    )


def load_site_dataset(root: Path, work_dir: Path, spec: DataSpec, *,
                      workers: int = 1, progress: Progress | None = None) -> SiteDataset:
    """The task's dataset from the cache, or scanned, decoded and assembled now.

    Files not in the cache are read by `workers` processes (node config
    `ingest-workers`). Measured on the 2-vCPU development machine a second worker
    gained 0-15 % (bench/RESULTS.md), so one is the default.
    """
    if spec.task is Task.VOLUME_SEG:
        from client.volume_dataset import load_volume_dataset

        return load_volume_dataset(root, work_dir, spec)
    cache_dir = work_dir / "cache"
    labels_path = spec.labels_file or root / LABELS_FILE
    labels_hash = ""
    if spec.task is Task.CXR_CLASSIFY:
        if not labels_path.is_file():
            raise DatasetError(f"{labels_path} not found: classification needs a labels.csv; "
                               "set the node config labels-file")
        labels_hash = hashlib.sha256(labels_path.read_bytes()).hexdigest()
    shard_settings = settings_tag(image_size=spec.image_size, voi_window=spec.voi_window)
    settings = f"{shard_settings}|{spec.task}|{spec.labels}|{spec.labels_key}|{labels_hash}"
    walked: list[Skipped] = []  # links out of the folder, loops, unreadable folders
    entries = walk_files(root, walked)
    index = ContentIndex(cache_dir)
    known = [index.known(entry) for entry in entries]
    datasets = DatasetStore(cache_dir)
    if all(known):
        key = dataset_key(settings, [(e, str(d)) for e, d in zip(entries, known, strict=True)])
        meta = datasets.load(key)
        cached = _assemble(cache_dir / "shards" / shard_settings, meta) if meta else None
        if cached is not None:
            LOG.info("dataset: %d images from cache", len(cached.groups))
            return cached
    found = ingest(root, entries, index, ShardStore(cache_dir, shard_settings),
                   spec.image_size, spec.voi_window, workers,
                   progress or (lambda done, total: None))
    found.scan.skipped.extend(walked)
    meta = _meta(found, spec, labels_path)
    key = dataset_key(settings, [(e, found.digests[e.path]) for e in entries])
    datasets.save(key, meta)
    dataset = _assemble(found.store.folder, meta)
    if dataset is None:
        raise RuntimeError("internal: the shards just written cannot be read back")
    LOG.info("dataset: %d images (%d files decoded), %d files skipped", len(dataset.groups),
             found.decoded, len(dataset.skipped))
    return dataset


def _meta(found: Ingested, spec: DataSpec, labels_path: Path) -> dict:
    """How the ingested files assemble into the task's dataset (what the cache keeps)."""
    store, digests = found.store, found.digests
    if spec.task is Task.LUNG_SEG:
        pairs = _pair_masks(found)
        images = [image for image, _, _ in pairs]
        targets = [store.locate(digests[mask]) for _, mask, _ in pairs]
        labels = None
        patients = [patient for _, _, patient in pairs]
    else:
        rows = _label_rows(found, spec, labels_path)
        images = [image for image, _, _ in rows]
        targets = None
        labels = [values for _, values, _ in rows]
        patients = [patient for _, _, patient in rows]
    if not images:
        what = "image/mask pairs" if spec.task is Task.LUNG_SEG else "labelled images"
        raise DatasetError(f"no usable {what} in the data folder; run `fedrad site check`")
    order = {p: i for i, p in enumerate(sorted(set(patients)))}
    locations = [store.locate(digests[image]) for image in images]
    pixels = read_rows(store.folder, locations)  # type: ignore[arg-type]
    target_arrays = (np.asarray(labels, np.float32) if labels is not None
                     else read_rows(store.folder, targets))  # type: ignore[arg-type]
    if pixels is None or target_arrays is None:
        raise RuntimeError("internal: the shards just written cannot be read back")
    return {
        "images": locations,
        "targets": targets,
        "labels": labels,
        "groups": [order[p] for p in patients],
        "patients": sorted(order),
        "content_hash": content_hash(pixels, target_arrays),
        "phi_values": sorted(found.scan.phi_values),
        "skipped": [s.__dict__ for s in found.scan.skipped],
    }
