"""optimizer-state = kept: a site's local optimiser moments between rounds, on its own disk.

Saved after round r's training and loaded before a later round's, under the fedrad run
(the run folder's id: a resumed run's `resume-from`), so a restarted site worker, a site
without a worker and a resumed run all continue from the moments the uninterrupted run
had after the round it resumes from. The moments are post-processing of the site's
(DP-noised) gradients; the files are the site's own (0600) and never leave it. Each run
keeps its last KEPT_ROUNDS rounds, and the KEPT_RUNS most recently used runs are kept.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Any

import torch

FOLDER = "optimizer"
KEPT_ROUNDS = 3
KEPT_RUNS = 4
_NAME = re.compile(r"^round-(\d+)\.pt$")


def _run_folder(work_dir: Path, run: str) -> Path:
    if not run.isdigit():
        raise ValueError(f"run id {run!r} is not a run id (digits only)")
    return work_dir / FOLDER / f"run-{run}"


def load(work_dir: Path, run: str, server_round: int) -> dict[str, Any] | None:
    """The moments saved after the latest round before `server_round` (None: none yet)."""
    folder = _run_folder(work_dir, run)
    rounds = sorted(int(m.group(1)) for p in folder.glob("round-*.pt")
                    if (m := _NAME.match(p.name)) and int(m.group(1)) < server_round) \
        if folder.exists() else []
    if not rounds:
        return None
    state: dict[str, Any] = torch.load(folder / f"round-{rounds[-1]}.pt", map_location="cpu",
                                       weights_only=True)
    return state


def save(work_dir: Path, run: str, server_round: int, state: dict[str, Any]) -> None:
    """Keep the moments after `server_round` (0600); prune older rounds and runs."""
    folder = _run_folder(work_dir, run)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path = folder / f"round-{server_round}.pt"
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(buffer.getvalue())
    os.replace(tmp, path)
    saved = sorted(int(m.group(1)) for p in folder.glob("round-*.pt")
                   if (m := _NAME.match(p.name)))
    for old in saved[:-KEPT_ROUNDS]:
        (folder / f"round-{old}.pt").unlink(missing_ok=True)
    runs = sorted((p for p in folder.parent.glob("run-*") if p.is_dir()),
                  key=lambda p: p.stat().st_mtime)
    for stale in runs[:-KEPT_RUNS]:
        for file in stale.glob("*"):
            file.unlink(missing_ok=True)
        stale.rmdir()
