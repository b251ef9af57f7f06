"""An append-only, hash-chained audit log (one JSON object per line).

Each entry records who did what and when, and what was sent: sizes and SHA-256
hashes, never contents. Every entry carries the SHA-256 of the previous entry's line
(`prev`) and of its own canonical form (`hash`), so `verify` detects an edited,
deleted, inserted or reordered entry, and a truncated tail when the caller compares
the last hash with one kept elsewhere (the run registry keeps it for the server's log).

Used on both sides: the server logs runs, rounds, sites and checkpoints in its home;
a site logs what it trained and sent in its work folder. Entries are plain metadata
and pass the same rule as everything else: no identifier from a patient's data.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

GENESIS = "0" * 64
_RESERVED = {"seq", "time", "event", "prev", "hash"}


class AuditError(ValueError):
    """The audit log was altered; the message names the first bad line."""


def _canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True).encode()


def digest(data: bytes) -> str:
    """SHA-256 of bytes, for "what was sent" fields."""
    return hashlib.sha256(data).hexdigest()


def digest_arrays(arrays: Iterable[np.ndarray]) -> str:
    """`digest` of the arrays' bytes laid end to end, hashed in place (no model-sized copy)."""
    sha = hashlib.sha256()
    for array in arrays:
        sha.update(np.ascontiguousarray(array).data)
    return sha.hexdigest()


@dataclass(frozen=True)
class Head:
    """Where a log ends: its number of entries and its last hash."""

    entries: int
    last_hash: str


class AuditLog:
    """Append entries to `path`; the file is created 0600 and only ever appended to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._known: tuple[int, Head] | None = None  # (file size, head) after our last write

    def head(self) -> Head:
        """The verified end of the log (raises AuditError if the log was altered).

        The whole chain is read once; after that only when the file's size is not the
        one this object last left it at (another writer, or tampering).
        """
        size = self.path.stat().st_size if self.path.exists() else 0
        if self._known is not None and self._known[0] == size:
            return self._known[1]
        head = verify(self.path)
        self._known = (size, head)
        return head

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Add one entry; `fields` must be JSON values and must not reuse reserved names."""
        clash = _RESERVED & set(fields)
        if clash:
            raise ValueError(f"audit fields may not be named {sorted(clash)}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "ab") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # other processes append too
            head = self.head()
            entry: dict[str, Any] = {"seq": head.entries + 1, "time": round(time.time(), 3),
                                     "event": event, "prev": head.last_hash, **fields}
            entry["hash"] = digest(_canonical(entry))
            handle.write(_canonical(entry) + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
            self._known = (self.path.stat().st_size, Head(head.entries + 1, entry["hash"]))
        return entry


def verify(path: Path, expected: Head | None = None) -> Head:
    """Check every link of the chain; with `expected`, also that nothing was cut off."""
    previous, count = GENESIS, 0
    if path.exists():
        for number, line in enumerate(path.read_bytes().splitlines(), start=1):
            try:
                entry = json.loads(line)
            except ValueError as exc:
                raise AuditError(f"{path}, line {number}: not a JSON entry") from exc
            claimed = entry.pop("hash", None)
            if entry.get("prev") != previous:
                raise AuditError(f"{path}, line {number}: chain broken (an entry before it "
                                 "was deleted, inserted or reordered)")
            if entry.get("seq") != number:
                raise AuditError(f"{path}, line {number}: sequence number "
                                 f"{entry.get('seq')!r}, expected {number}")
            if claimed != digest(_canonical(entry)):
                raise AuditError(f"{path}, line {number}: entry was edited (hash mismatch)")
            previous, count = claimed, number
    head = Head(count, previous)
    if expected is not None and (head.entries < expected.entries or (
            head.entries == expected.entries and head.last_hash != expected.last_hash)):
        raise AuditError(f"{path}: ends at entry {head.entries}, but {expected.entries} "
                         "were recorded elsewhere (entries were cut off the end)")
    return head
