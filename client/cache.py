"""The site's preprocessing cache: content-hashed shards in the site's work folder.

Three layers, all under `<work>/cache/`, all site-local (mode 0600: the notes hold
the header identifiers the PHI guard needs):

- `index.json`: data-folder path -> (size, mtime_ns, sha256 of the file's bytes).
  A file whose size and mtime are unchanged keeps its hash; any other file is
  hashed again when it is read, so a touched or copied file whose bytes are the
  same is still recognised.
- `shards/<settings>/<batch>.npz|.json`: per file, keyed by content hash, what the
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
from typing import Any

import numpy as np

from client.dicom_scan import FileEntry, FileNote

CACHE_VERSION = 2


def _write_private(path: Path, payload: bytes) -> None:
    """Write atomically, readable by the site's own user only."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(payload)
    tmp.replace(path)


def _write_npz(path: Path, arrays: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    tmp.chmod(0o600)
    tmp.replace(path)


class ContentIndex:
    """Data-folder path -> content hash, trusted while size and mtime are unchanged."""

    def __init__(self, cache_dir: Path, root: Path) -> None:
        self._path = cache_dir / "index.json"
        self._root = root
        try:
            self._entries: dict[str, list] = json.loads(self._path.read_text())
        except (OSError, ValueError):
            self._entries = {}
        self._changed = False

    def known(self, entry: FileEntry) -> str | None:
        """The file's content hash when its size and mtime match what was hashed."""
        row = self._entries.get(str(entry.path.relative_to(self._root)))
        if row and row[0] == entry.size and row[1] == entry.mtime_ns:
            return str(row[2])
        return None

    def record(self, entry: FileEntry, digest: str) -> None:
        self._entries[str(entry.path.relative_to(self._root))] = [entry.size, entry.mtime_ns,
                                                                  digest]
        self._changed = True

    def save(self, present: Iterable[FileEntry]) -> None:
        """Persist, forgetting files that are gone."""
        keep = {str(entry.path.relative_to(self._root)) for entry in present}
        if self._changed or set(self._entries) - keep:
            self._entries = {k: v for k, v in self._entries.items() if k in keep}
            self._path.parent.mkdir(parents=True, exist_ok=True)
            _write_private(self._path, json.dumps(self._entries).encode())


@dataclass(frozen=True)
class Shard:
    """One file's cached outcome: its note, its preprocessed array and decode result."""

    note: FileNote
    shape: tuple[int, ...]  # the decoded frame's rows and columns; () when not decoded
    error: str  # why decoding failed; "" when it did not
    array: np.ndarray | None


class ShardStore:
    """Per-file shards for one set of preprocessing settings, keyed by content hash."""

    def __init__(self, cache_dir: Path, settings: str) -> None:
        self._folder = cache_dir / "shards" / settings
        self._meta: dict[str, dict] = {}
        self._where: dict[str, Path] = {}
        for meta_path in sorted(self._folder.glob("*.json")) if self._folder.is_dir() else ():
            try:
                batch = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                continue  # a damaged shard is decoded again, never trusted
            for digest, meta in batch.items():
                self._meta[digest] = meta
                self._where[digest] = meta_path.with_suffix(".npz")
        self._open: dict[Path, dict[str, np.ndarray]] = {}

    def digests(self) -> frozenset[str]:
        """Content hashes this store holds a shard for."""
        return frozenset(self._meta)

    def arrays(self, digests: list[str]) -> np.ndarray | None:
        """The shards' arrays stacked in this order, or None when one is missing."""
        try:
            return np.stack([
                self._stack(self._where[d], self._meta[d]["stack"])[self._meta[d]["row"]]
                for d in digests
            ])
        except (OSError, KeyError, ValueError, IndexError, TypeError):
            return None

    def get(self, digest: str) -> Shard | None:
        meta = self._meta.get(digest)
        if meta is None:
            return None
        array = None
        if meta["row"] is not None:
            try:
                array = self._stack(self._where[digest], meta["stack"])[meta["row"]]
            except (OSError, KeyError, ValueError, IndexError):
                return None
        note = dict(meta["note"])
        note["phi_values"] = tuple(note["phi_values"])
        return Shard(FileNote(**note), tuple(meta["shape"]), meta["error"], array)

    def _stack(self, npz_path: Path, name: str) -> np.ndarray:
        if npz_path not in self._open:
            with np.load(npz_path) as stacks:
                self._open[npz_path] = {key: stacks[key] for key in stacks.files}
        return self._open[npz_path][name]

    def add(self, shards: dict[str, Shard]) -> None:
        """Write the new files' shards as one batch: one stacked array per dtype."""
        if not shards:
            return
        self._folder.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256("|".join(sorted(shards)).encode()).hexdigest()[:24]
        stacks: dict[str, list[np.ndarray]] = {}
        meta = {}
        for digest, shard in shards.items():
            row = stack = None
            if shard.array is not None:
                stack = str(shard.array.dtype)
                row = len(stacks.setdefault(stack, []))
                stacks[stack].append(shard.array)
            note = dict(shard.note.__dict__)
            meta[digest] = {"note": note, "shape": list(shard.shape), "error": shard.error,
                            "stack": stack, "row": row}
        _write_npz(self._folder / f"{name}.npz",
                   {dtype: np.stack(arrays) for dtype, arrays in stacks.items()})
        _write_private(self._folder / f"{name}.json", json.dumps(meta).encode())

    def close(self) -> None:
        self._open.clear()


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
        _write_private(self._folder / f"{key}.json", json.dumps(meta).encode())


def dataset_key(settings: str, root: Path, files: list[tuple[FileEntry, str]]) -> str:
    digest = hashlib.sha256(settings.encode())
    for entry, content in files:
        digest.update(f"|{entry.path.relative_to(root)}|{content}".encode())
    return digest.hexdigest()


def settings_tag(**settings: object) -> str:
    text = "|".join(f"{k}={settings[k]}" for k in sorted(settings))
    return hashlib.sha256(f"v{CACHE_VERSION}|{text}".encode()).hexdigest()[:16]
