"""A site's training data: images and lung masks at a fixed size, split by patient.

The decoded, resized arrays are cached in the site's work folder under a key
derived from every file's path, size and modification time plus the
preprocessing settings, so later rounds never decode again; any change to a
file or a setting gives a new key.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F

from client.dicom_scan import ImageRef, ScanResult, SegRef, Skipped, iter_files, scan_folder
from client.pixels import PixelError, check_geometry, projection_pixels, seg_pixels

LOG = logging.getLogger("fedrad.client")
CACHE_VERSION = 1


@dataclass(frozen=True)
class SiteDataset:
    """Arrays ready for training; nothing in it identifies a patient."""

    images: np.ndarray  # (N, 1, S, S) float32 in [0, 1]
    masks: np.ndarray  # (N, 1, S, S) uint8
    groups: np.ndarray  # (N,) int: patient index, for grouped splits
    content_hash: str  # identifies this dataset in the privacy ledger
    phi_values: frozenset[str]
    skipped: tuple[Skipped, ...]

    def split(self, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Train/validation indices with every patient on one side only."""
        patients = np.unique(self.groups)
        rng = np.random.default_rng(seed)
        order = rng.permutation(patients)
        n_val = min(max(1, round(len(patients) * val_fraction)), len(patients) - 1)
        val_patients = set(order[:n_val].tolist())
        is_val = np.array([g in val_patients for g in self.groups])
        return np.nonzero(~is_val)[0], np.nonzero(is_val)[0]


def _cache_key(root: Path, image_size: int, voi_window: bool) -> str:
    digest = hashlib.sha256(f"v{CACHE_VERSION}|size={image_size}|voi={voi_window}".encode())
    for path in iter_files(root):
        stat = path.stat()
        digest.update(f"|{path.relative_to(root)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def _resize(array: np.ndarray, size: int, *, nearest: bool) -> np.ndarray:
    tensor = torch.from_numpy(array.astype(np.float32))[None, None]
    mode = "nearest" if nearest else "area"
    return F.interpolate(tensor, size=(size, size), mode=mode)[0, 0].numpy()


@dataclass
class _Decoded:
    """Pixels decoded during the scan (one read per file)."""

    images: dict[str, np.ndarray] = field(default_factory=dict)
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # by referenced image UID
    errors: dict[Path, str] = field(default_factory=dict)
    voi_window: bool = False

    def __call__(self, kind: str, ref: ImageRef | SegRef, ds: pydicom.Dataset) -> None:
        try:
            if isinstance(ref, SegRef):
                self.masks[ref.referenced_sop_uid] = seg_pixels(ds)
            else:
                self.images[ref.sop_instance_uid] = projection_pixels(
                    ds, voi_window=self.voi_window
                )
        except PixelError as exc:
            self.errors[ref.path] = str(exc)


def _pair(scan: ScanResult, decoded: _Decoded, image_size: int
          ) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    segs_by_image = {seg.referenced_sop_uid: seg for seg in scan.segs}
    image_uids = {image.sop_instance_uid for image in scan.images}
    for orphan in scan.segs:
        if orphan.referenced_sop_uid not in image_uids:
            scan.skip(orphan.path, "SEG references an image that is not in the data folder")
    images, masks, patients = [], [], []
    for image in scan.images:
        seg = segs_by_image.get(image.sop_instance_uid)
        if seg is None:
            scan.skip(image.path, "image has no lung SEG (not usable for segmentation)")
            continue
        problem = decoded.errors.get(image.path) or decoded.errors.get(seg.path)
        if problem:
            scan.skip(image.path, problem)
            continue
        pixels = decoded.images[image.sop_instance_uid]
        try:
            mask = decoded.masks[image.sop_instance_uid]
            check_geometry(mask.shape, pixels.shape)
        except PixelError as exc:
            scan.skip(seg.path, str(exc))
            continue
        images.append(_resize(pixels, image_size, nearest=False))
        masks.append((_resize(mask, image_size, nearest=True) > 0.5).astype(np.uint8))
        patients.append(image.patient_key)
    return images, masks, patients


def load_site_dataset(root: Path, work_dir: Path, image_size: int, *,
                      voi_window: bool = False) -> SiteDataset:
    """Scan, decode and resize a site's data, or load it from the cache."""
    key = _cache_key(root, image_size, voi_window)
    cache_dir = work_dir / "cache"
    arrays_path, meta_path = cache_dir / f"{key}.npz", cache_dir / f"{key}.json"
    if arrays_path.is_file() and meta_path.is_file():
        with np.load(arrays_path) as cached:
            meta = json.loads(meta_path.read_text())
            LOG.info("dataset: %d images from cache", len(cached["images"]))
            return SiteDataset(
                images=cached["images"],
                masks=cached["masks"],
                groups=cached["groups"],
                content_hash=str(meta["content_hash"]),
                phi_values=frozenset(meta["phi_values"]),
                skipped=tuple(Skipped(**s) for s in meta["skipped"]),
            )
    decoded = _Decoded(voi_window=voi_window)
    scan = scan_folder(root, visit=decoded)
    images, masks, patients = _pair(scan, decoded, image_size)
    if not images:
        raise ValueError("no usable image/mask pairs in the data folder; run `fedrad site check`")
    index = {p: i for i, p in enumerate(sorted(set(patients)))}
    dataset = SiteDataset(
        images=np.stack(images)[:, None].astype(np.float32),
        masks=np.stack(masks)[:, None],
        groups=np.array([index[p] for p in patients], dtype=np.int64),
        content_hash="",
        phi_values=frozenset(scan.phi_values),
        skipped=tuple(scan.skipped),
    )
    content = hashlib.sha256(dataset.images.tobytes() + dataset.masks.tobytes()).hexdigest()
    dataset = SiteDataset(**{**dataset.__dict__, "content_hash": content})
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f"{key}.tmp.npz"
    np.savez(tmp, images=dataset.images, masks=dataset.masks, groups=dataset.groups)
    tmp.replace(arrays_path)
    meta_path.write_text(
        json.dumps(
            {
                "content_hash": content,
                "phi_values": sorted(dataset.phi_values),
                "skipped": [s.__dict__ for s in dataset.skipped],
            }
        )
    )
    meta_path.chmod(0o600)
    LOG.info("dataset: %d images decoded, %d files skipped", len(images), len(scan.skipped))
    return dataset
