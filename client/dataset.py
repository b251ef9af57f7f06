"""A site's training data: images and lung masks at a fixed size, split by patient.

Each file is read once, hashed, described and decoded in that read; the
results go to the site's content-hashed cache (client/cache.py), so later
epochs and rounds never decode again and new files are the only ones decoded.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from client.cache import (
    ContentIndex,
    DatasetStore,
    Shard,
    ShardStore,
    dataset_key,
    read_rows,
    settings_tag,
)
from client.dicom_scan import ImageRef, ScanResult, SegRef, Skipped, examine, walk_files
from client.pixels import (
    PixelError,
    check_geometry,
    nifti_mask,
    projection_pixels,
    resize_area,
    resize_nearest,
    seg_pixels,
)

LOG = logging.getLogger("fedrad.client")
PARALLEL_MIN_FILES_PER_WORKER = 16  # below this, a worker costs more than it saves


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


@dataclass
class _Decoder:
    """Decodes and resizes each image and SEG in the scan's own read (one read per file)."""

    image_size: int
    voi_window: bool
    done: dict[Path, tuple[tuple[int, ...], str, np.ndarray | None]] = field(default_factory=dict)

    def __call__(self, kind: str, ref: ImageRef | SegRef, ds: pydicom.Dataset | None) -> None:
        try:
            if isinstance(ref, SegRef):
                mask = nifti_mask(ref.path) if ds is None else seg_pixels(ds)
                self.done[ref.path] = (mask.shape, "", resize_nearest(mask, self.image_size))
            elif ds is not None:
                pixels = projection_pixels(ds, voi_window=self.voi_window)
                self.done[ref.path] = (pixels.shape, "", resize_area(pixels, self.image_size))
        except PixelError as exc:
            self.done[ref.path] = ((), str(exc), None)


_known_digests: frozenset[str] = frozenset()  # per worker process, set by _init_worker


def _init_worker(known: frozenset[str]) -> None:
    global _known_digests
    _known_digests = known


def _read_file(path: Path, image_size: int, voi_window: bool) -> tuple[str, Shard | None]:
    """One file: read once and hash; unless its content is already cached, describe it
    and decode and resize its pixels from that same read."""
    data = path.read_bytes()
    digest = _sha256(data)
    if digest in _known_digests:
        return digest, None
    return digest, _decode(path, data, image_size, voi_window)


def _decode(path: Path, data: bytes, image_size: int, voi_window: bool) -> Shard:
    decoder = _Decoder(image_size, voi_window)
    note = examine(path, data, visit=decoder)
    shape, error, array = decoder.done.get(path, ((), "", None))
    return Shard(note, tuple(shape), error, array)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_batch(paths: list[Path], image_size: int, voi_window: bool
                ) -> list[tuple[str, Shard | None]]:
    return [_read_file(path, image_size, voi_window) for path in paths]


def _read_all(paths: list[Path], image_size: int, voi_window: bool, workers: int,
              known: frozenset[str]) -> list[tuple[str, Shard | None]]:
    """`_read_file` over many files, in `workers` forked processes when that pays."""
    workers = min(workers, len(paths) // PARALLEL_MIN_FILES_PER_WORKER)
    if workers < 2 or "fork" not in mp.get_all_start_methods():
        _init_worker(known)
        return _read_batch(paths, image_size, voi_window)
    chunk = max(1, min(64, len(paths) // (workers * 4)))
    batches = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
    # fork: workers inherit the imported decoders at no cost; they run only pydicom and
    # numpy code (no torch, no BLAS: see resize_area), so forking is safe here.
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"),
                             initializer=_init_worker, initargs=(known,)) as pool:
        done = pool.map(_read_batch, batches, [image_size] * len(batches),
                        [voi_window] * len(batches))
        return [item for batch in done for item in batch]


def _pair(scan: ScanResult, shards: dict[Path, Shard]) -> list[tuple[Path, Path, str]]:
    """(image, SEG, patient key) for every usable pair; everything else is reported."""
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


def _array(shard: Shard) -> np.ndarray:
    if shard.array is None:  # _pair only pairs shards that decoded
        raise RuntimeError("internal: paired a file without pixels")
    return shard.array


def _assemble(shard_folder: Path, meta: dict) -> SiteDataset | None:
    images = read_rows(shard_folder, [tuple(loc) for loc in meta["images"]])
    masks = read_rows(shard_folder, [tuple(loc) for loc in meta["masks"]])
    if images is None or masks is None:
        return None
    return SiteDataset(
        images=images[:, None].astype(np.float32, copy=False),
        masks=masks[:, None],
        groups=np.asarray(meta["groups"], dtype=np.int64),
        content_hash=str(meta["content_hash"]),
        phi_values=frozenset(meta["phi_values"]),
        skipped=tuple(Skipped(**s) for s in meta["skipped"]),
    )


def load_site_dataset(root: Path, work_dir: Path, image_size: int, *,
                      voi_window: bool = False, workers: int = 1) -> SiteDataset:
    """Scan, decode and resize a site's data, or take it from the cache (see client.cache).

    Files not in the cache are read by `workers` processes (node config
    `ingest-workers`). Measured on the 2-vCPU development machine, a second worker
    made the first pass slower (bench/RESULTS.md), so one is the default.
    """
    cache_dir = work_dir / "cache"
    settings = settings_tag(image_size=image_size, voi_window=voi_window)
    entries = walk_files(root)
    index = ContentIndex(cache_dir)
    known = [index.known(entry) for entry in entries]
    datasets = DatasetStore(cache_dir)
    if all(known):
        key = dataset_key(settings, [(e, str(d)) for e, d in zip(entries, known, strict=True)])
        meta = datasets.load(key)
        cached = _assemble(cache_dir / "shards" / settings, meta) if meta else None
        if cached is not None:
            LOG.info("dataset: %d images from cache", len(cached.groups))
            return cached
    digests = {entry.path: digest for entry, digest in zip(entries, known, strict=True)}
    store = ShardStore(cache_dir, settings)
    shards: dict[Path, Shard] = {}
    for entry in entries:
        digest = digests[entry.path]
        shard = store.get(digest) if digest else None
        if shard is not None:
            shards[entry.path] = shard
    unread = [entry for entry in entries if entry.path not in shards]
    new: dict[str, Shard] = {}
    done = _read_all([entry.path for entry in unread], image_size, voi_window, workers,
                     store.digests())
    for entry, (digest, fresh) in zip(unread, done, strict=True):
        index.record(entry, digest)
        digests[entry.path] = digest
        shard = fresh if fresh is not None else store.get(digest)  # None: bytes cached before
        if shard is None:  # ... but their shard cannot be read back: decode them here
            fresh = shard = _decode(entry.path, entry.path.read_bytes(), image_size, voi_window)
        if fresh is not None:
            new[digest] = fresh
        shards[entry.path] = shard
    scan = ScanResult(root=root)
    for entry in entries:
        scan.add(entry.path, shards[entry.path].note)
    scan.log()
    pairs = _pair(scan, shards)
    store.add(new)
    index.save(entries)
    if not pairs:
        raise ValueError("no usable image/mask pairs in the data folder; run `fedrad site check`")
    order = {p: i for i, p in enumerate(sorted({patient for _, _, patient in pairs}))}
    images = np.stack([_array(shards[image]) for image, _, _ in pairs])[:, None]
    masks = np.stack([_array(shards[seg]) for _, seg, _ in pairs])[:, None]
    meta = {
        "images": [store.locate(str(digests[image])) for image, _, _ in pairs],
        "masks": [store.locate(str(digests[seg])) for _, seg, _ in pairs],
        "groups": [order[patient] for _, _, patient in pairs],
        "content_hash": hashlib.sha256(images.tobytes() + masks.tobytes()).hexdigest(),
        "phi_values": sorted(scan.phi_values),
        "skipped": [s.__dict__ for s in scan.skipped],
    }
    key = dataset_key(settings, [(e, str(digests[e.path])) for e in entries])
    datasets.save(key, meta)
    LOG.info("dataset: %d images (%d files decoded), %d files skipped", len(pairs), len(new),
             len(scan.skipped))
    return SiteDataset(images=images.astype(np.float32, copy=False), masks=masks,
                       groups=np.asarray(meta["groups"], dtype=np.int64),
                       content_hash=str(meta["content_hash"]),
                       phi_values=frozenset(scan.phi_values), skipped=tuple(scan.skipped))
