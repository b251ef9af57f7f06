"""What this site has already served, so a server cannot replay or repeat a request.

- A training request is served once per (run, round): a replayed signed model would
  otherwise be trained on again and charge the patients' ε again.
- Evaluations are served at most `max-evaluations-per-round` times per (run, round): the
  validation patients' metrics are not DP-noised, so evaluating many models of one round
  (or the same model many times) would be an unmetered channel.
- The validation split is the site's own: seeded from a secret kept in the work folder
  (created once, mode 0600), never from the run's `seed`, so the server cannot choose
  which patients are held out.

`ServedLog.claim` checks and records under an exclusive lock before any compute.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
from pathlib import Path

SERVED_FILE = "served.json"
SECRET_FILE = "site.secret"  # noqa: S105 - a file name


class AlreadyServed(RuntimeError):
    """The request repeats what the site served before, or exceeds its per-round cap."""


class ServedLog:
    """Per-run, per-round counts of served requests, in `<work-dir>/served.json`."""

    def __init__(self, work_dir: Path) -> None:
        self.path = work_dir / SERVED_FILE

    def claim(self, run_id: int, server_round: int, purpose: str, limit: int) -> int:
        """Count one more `purpose` request for (run, round); AlreadyServed past `limit`."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(f".{SERVED_FILE}.lock"), os.O_RDWR | os.O_CREAT,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = json.loads(self.path.read_text()) if self.path.exists() else {}
            key = f"{run_id}:{server_round}:{purpose}"
            count = int(data.get(key, 0)) + 1
            if count > limit:
                raise AlreadyServed(f"{purpose} of run {run_id} round {server_round} was "
                                    f"served {count - 1} time(s); this site allows {limit}")
            data[key] = count
            tmp = self.path.with_name(f".{SERVED_FILE}.{os.getpid()}.tmp")
            tmp_fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(tmp_fd, "w") as handle:
                json.dump(data, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
            return count
        finally:
            os.close(fd)


def site_secret(work_dir: Path) -> bytes:
    """The site's own 32-byte secret (created once, mode 0600)."""
    path = work_dir / SECRET_FILE
    if not path.exists():
        work_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process made it first
        else:
            with os.fdopen(fd, "wb") as handle:
                handle.write(os.urandom(32))
    secret = path.read_bytes()
    if len(secret) != 32:
        raise RuntimeError(f"{path} is not a 32-byte site secret; remove it to make a new "
                           "one (the validation split changes with it)")
    return secret


def split_seed(work_dir: Path) -> int:
    """The seed of the site's train/validation split, derived from its own secret."""
    digest = hmac.new(site_secret(work_dir), b"fedrad validation split",
                      hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "little")
