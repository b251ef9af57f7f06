"""The site's preprocessing cache: content-hashed shards in the site's work folder.

Three layers, all under `<work>/cache/`, all site-local (mode 0600: the notes hold
the header identifiers the PHI guard needs):

- `index.json`: data-folder path -> (size, mtime_ns, sha256 of the file's bytes).
  A file whose size and mtime are unchanged keeps its hash; any other file is
  hashed again when it is read, so a touched or copied file whose bytes are the
  same is still recognised.
- `shards/<settings>/<batch>.json|.<dtype>.npy`: per file, keyed by content hash, what the
  scan found (`FileNote`) and the preprocessed array. A pass that meets new files
  decodes only those and writes one new shard with them.
- `datasets/<key>.json`: how one exact set of (path, content hash) pairs and settings
  assembles into a dataset (which shards, in which order), so a later epoch or round
  reads two files and decodes nothing.

Changing a preprocessing setting changes `<settings>` and the dataset key; changing
a file's bytes changes its hash. Either way nothing stale is read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.dicom_scan import FileEntry, FileNote

CACHE_VERSION = 2


def write_private(path: Path, payload: bytes) -> None:
    """Write atomically, readable by the site's own user only."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(payload)
    tmp.replace(path)


def _write_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
    np.save(tmp, array)
    tmp.chmod(0o600)
    tmp.replace(path)


class ContentIndex:
    """Data-folder path -> content hash, trusted while size and mtime are unchanged."""

    def __init__(self, cache_dir: Path) -> None:
        self._path = cache_dir / "index.json"
        try:
            self._entries: dict[str, list] = json.loads(self._path.read_text())
        except (OSError, ValueError):
            self._entries = {}
        self._changed = False

    def known(self, entry: FileEntry) -> str | None:
        """The file's content hash when its size and mtime match what was hashed."""
        row = self._entries.get(entry.rel)
        if row and row[0] == entry.size and row[1] == entry.mtime_ns:
            return str(row[2])
        return None

    def record(self, entry: FileEntry, digest: str) -> None:
        self._entries[entry.rel] = [entry.size, entry.mtime_ns, digest]
        self._changed = True

    def save(self, present: Iterable[FileEntry]) -> None:
        """Persist, forgetting files that are gone."""
        keep = {entry.rel for entry in present}
        if self._changed or set(self._entries) - keep:
            self._entries = {k: v for k, v in self._entries.items() if k in keep}
            self._path.parent.mkdir(parents=True, exist_ok=True)
            write_private(self._path, json.dumps(self._entries).encode())


@dataclass(frozen=True)
class Shard:
    """One file's cached outcome: its note, its preprocessed array and decode result."""

    note: FileNote
    shape: tuple[int, ...]  # the decoded frame's rows and columns; () when not decoded
    error: str  # why decoding failed; "" when it did not
    array: np.ndarray | None


Location = tuple[str, str, int]  # (batch, dtype, row) of one shard's array


def _stack_path(folder: Path, batch: str, dtype: str) -> Path:
    return folder / f"{batch}.{dtype}.npy"


def read_rows(folder: Path, locations: list[Location]) -> np.ndarray | None:
    """The arrays at these locations, stacked in order (memory-mapped reads); None if gone."""
    stacks: dict[tuple[str, str], np.ndarray] = {}
    try:
        for batch, dtype, _ in locations:
            if (batch, dtype) not in stacks:
                stacks[batch, dtype] = np.load(_stack_path(folder, batch, dtype), mmap_mode="r")
        return np.stack([stacks[batch, dtype][row] for batch, dtype, row in locations])
    except (OSError, ValueError, IndexError):
        return None


class ShardStore:
    """Per-file shards for one set of preprocessing settings, keyed by content hash.

    A batch is `<batch>.json` (digest -> note, decode result, location) plus one
    stacked `<batch>.<dtype>.npy` per array type.
    """

    def __init__(self, cache_dir: Path, settings: str) -> None:
        self.folder = cache_dir / "shards" / settings
        self._meta: dict[str, dict] = {}
        for meta_path in sorted(self.folder.glob("*.json")) if self.folder.is_dir() else ():
            try:
                batch = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                continue  # a damaged shard is decoded again, never trusted
            for digest, meta in batch.items():
                self._meta[digest] = {**meta, "batch": meta_path.stem}

    def digests(self) -> frozenset[str]:
        """Content hashes this store holds a shard for."""
        return frozenset(self._meta)

    def locate(self, digest: str) -> Location | None:
        meta = self._meta.get(digest)
        if meta is None or meta["row"] is None:
            return None
        return meta["batch"], meta["stack"], meta["row"]

    def get(self, digest: str) -> Shard | None:
        meta = self._meta.get(digest)
        if meta is None:
            return None
        array = None
        location = self.locate(digest)
        if location is not None:
            rows = read_rows(self.folder, [location])
            if rows is None:
                return None
            array = rows[0]
        note = dict(meta["note"])
        note["phi_values"] = tuple(note["phi_values"])
        return Shard(FileNote(**note), tuple(meta["shape"]), meta["error"], array)

    def add(self, shards: dict[str, Shard]) -> None:
        """Write the new files' shards as one batch: one stacked array per dtype."""
        if not shards:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256("|".join(sorted(shards)).encode()).hexdigest()[:24]
        stacks: dict[str, list[np.ndarray]] = {}
        batch = {}
        for digest, shard in shards.items():
            row = stack = None
            if shard.array is not None:
                stack = str(shard.array.dtype)
                row = len(stacks.setdefault(stack, []))
                stacks[stack].append(shard.array)
            batch[digest] = {"note": dict(shard.note.__dict__), "shape": list(shard.shape),
                             "error": shard.error, "stack": stack, "row": row}
        for dtype, arrays in stacks.items():
            _write_npy(_stack_path(self.folder, name, dtype), np.stack(arrays))
        write_private(self.folder / f"{name}.json", json.dumps(batch).encode())
        self._meta.update({d: {**m, "batch": name} for d, m in batch.items()})


class DatasetStore:
    """Assembled datasets, one per exact (files, contents, settings) key.

    Only the assembly is kept (which shards, in which order, the patient groups, the
    skip list): the arrays stay in the shards, written once.
    """

    def __init__(self, cache_dir: Path) -> None:
        self._folder = cache_dir / "datasets"

    def load(self, key: str) -> dict | None:
        try:
            return dict(json.loads((self._folder / f"{key}.json").read_text()))
        except (OSError, ValueError):
            return None

    def save(self, key: str, meta: dict) -> None:
        self._folder.mkdir(parents=True, exist_ok=True)
        write_private(self._folder / f"{key}.json", json.dumps(meta).encode())


def dataset_key(settings: str, files: list[tuple[FileEntry, str]]) -> str:
    digest = hashlib.sha256(settings.encode())
    for entry, content in files:
        digest.update(f"|{entry.rel}|{content}".encode())
    return digest.hexdigest()


def settings_tag(**settings: object) -> str:
    text = "|".join(f"{k}={settings[k]}" for k in sorted(settings))
    return hashlib.sha256(f"v{CACHE_VERSION}|{text}".encode()).hexdigest()[:16]
