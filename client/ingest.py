"""Read a site's files into the content-hashed cache: each file read once, hashed,
described (client.dicom_scan) and decoded and resized from that same read.

Files whose content is already in the cache are not decoded again; the rest are
read by one process or by forked worker processes (node config `ingest-workers`).
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from client.cache import ContentIndex, Shard, ShardStore
from client.dicom_scan import FileEntry, ImageRef, ScanResult, SegRef, examine
from client.pixels import (
    PixelError,
    nifti_mask,
    projection_pixels,
    resize_area,
    resize_nearest,
    seg_pixels,
)

Progress = Callable[[int, int], None]  # (files done, files to do)
PARALLEL_MIN_FILES_PER_WORKER = 16  # below this, a worker costs more than it saves


@dataclass
class Ingested:
    """A scan of the data folder with every file's shard (note, decode result, array)."""

    scan: ScanResult
    shards: dict[Path, Shard]
    digests: dict[Path, str]
    store: ShardStore
    decoded: int  # files decoded in this pass (not found in the cache)


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
              known: frozenset[str], progress: Progress) -> list[tuple[str, Shard | None]]:
    """`_read_file` over many files, in `workers` forked processes when that pays;
    `progress(done, total)` as files are decoded."""
    workers = min(workers, len(paths) // PARALLEL_MIN_FILES_PER_WORKER)
    progress(0, len(paths))
    if workers < 2 or "fork" not in mp.get_all_start_methods():
        _init_worker(known)
        read = []
        for done, path in enumerate(paths, start=1):
            read.append(_read_file(path, image_size, voi_window))
            progress(done, len(paths))
        return read
    chunk = max(1, min(64, len(paths) // (workers * 4)))
    batches = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
    # fork: workers inherit the imported decoders at no cost; they run only pydicom and
    # numpy code (no torch, no BLAS: see resize_area), so forking is safe here.
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"),
                             initializer=_init_worker, initargs=(known,)) as pool:
        out: list[tuple[str, Shard | None]] = []
        for batch in pool.map(_read_batch, batches, [image_size] * len(batches),
                              [voi_window] * len(batches)):
            out.extend(batch)
            progress(len(out), len(paths))
        return out


def ingest(root: Path, entries: list[FileEntry], index: ContentIndex, store: ShardStore,
           image_size: int, voi_window: bool, workers: int,
           progress: Progress = lambda done, total: None) -> Ingested:
    """Every file's shard, from the cache where its content is known, decoded otherwise."""
    digests: dict[Path, str | None] = {e.path: index.known(e) for e in entries}
    shards: dict[Path, Shard] = {}
    for entry in entries:
        digest = digests[entry.path]
        shard = store.get(digest) if digest else None
        if shard is not None:
            shards[entry.path] = shard
    unread = [entry for entry in entries if entry.path not in shards]
    new: dict[str, Shard] = {}
    done = _read_all([entry.path for entry in unread], image_size, voi_window, workers,
                     store.digests(), progress)
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
    store.add(new)
    index.save(entries)
    return Ingested(scan, shards, {p: str(d) for p, d in digests.items()}, store, len(new))
