"""The site's own log file (stays at the hospital; holds counts and key names only)."""

from __future__ import annotations

import logging
from pathlib import Path

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(work_dir: Path) -> None:
    """Send the `fedrad` loggers to work_dir/site.log as well (once per process)."""
    logger = logging.getLogger("fedrad")
    if any(getattr(h, "fedrad_site", False) for h in logger.handlers):
        return
    work_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(work_dir / "site.log")
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.fedrad_site = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
