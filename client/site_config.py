"""The hospital's own settings, from the SuperNode's `--node-config`.

These never come from the server: the data location, the site's name and the
site's total privacy budget are the hospital's to set.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.labels import KEY_COLUMNS
from client.site_policy import SitePolicy
from common.config import ConfigError

_ALLOWED = {
    "site-id", "data-dir", "work-dir", "epsilon-budget", "labels-file", "labels-key", "device",
    "threads", "ingest-workers", "model-verify-key", "val-fraction", *SitePolicy.keys(),
    "site-certificate", "node-key", "consortium-ca",  # the kit's identity (client.secure_sum)
}
AUDIT_FILE = "audit.jsonl"  # the site's own audit log, in its work folder
_SITE_ID_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_")


@dataclass(frozen=True)
class SiteConfig:
    """Parsed node config of one hospital site."""

    site_id: str
    data_dir: Path
    work_dir: Path
    epsilon_budget: float
    labels_file: Path | None
    labels_key: str
    device: str
    threads: int  # torch CPU threads; 0 = torch's default
    ingest_workers: int = 1  # processes that decode files not yet in the cache
    val_fraction: float = 0.25  # the site's own held-out share of patients
    policy: SitePolicy = SitePolicy()  # what this site accepts (client.site_policy)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> SiteConfig:
        """Parse and check the SuperNode's node_config."""
        unknown = sorted(set(raw) - _ALLOWED)
        if unknown:
            raise ConfigError(
                f"unknown node-config key(s) {unknown}; allowed: {sorted(_ALLOWED)}"
            )
        missing = sorted({"site-id", "data-dir", "work-dir", "epsilon-budget"} - set(raw))
        if missing:
            raise ConfigError(
                f"node-config is missing {missing}; start the SuperNode with e.g. "
                "--node-config 'site-id=\"hospital-a\" data-dir=\"/dicom\" "
                "work-dir=\"/var/lib/fedrad\" epsilon-budget=10.0'"
            )
        site_id = str(raw["site-id"])
        if not site_id or not set(site_id) <= _SITE_ID_CHARS or len(site_id) > 64:
            raise ConfigError(
                f"site-id must be 1-64 characters of a-z, 0-9, '-' or '_', got {site_id!r}"
            )
        budget = raw["epsilon-budget"]
        if isinstance(budget, bool) or not isinstance(budget, int | float) or budget <= 0:
            raise ConfigError(f"epsilon-budget must be a number > 0, got {budget!r}")
        device = str(raw.get("device", "auto"))
        if device not in {"auto", "cpu", "cuda"}:
            raise ConfigError(f"device must be one of auto, cpu, cuda; got {device!r}")
        data_dir = Path(str(raw["data-dir"])).expanduser()
        if not data_dir.is_dir():
            raise ConfigError(f"data-dir {data_dir} is not a folder; point it at the DICOM export")
        if raw.get("labels-key", "sop_instance_uid") not in KEY_COLUMNS:
            raise ConfigError(
                f"labels-key must be one of {list(KEY_COLUMNS)}, got {raw.get('labels-key')!r}"
            )
        threads = raw.get("threads", 0)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise ConfigError(f"threads must be an integer >= 0, got {threads!r}")
        workers = raw.get("ingest-workers", 1)
        if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 64:
            raise ConfigError(f"ingest-workers must be an integer 1..64, got {workers!r}")
        val_fraction = raw.get("val-fraction", 0.25)
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, int | float) \
                or not 0.05 <= val_fraction <= 0.5:
            raise ConfigError(f"val-fraction must be a number in [0.05, 0.5], got "
                              f"{val_fraction!r}")
        labels = raw.get("labels-file")
        return cls(
            site_id=site_id,
            data_dir=data_dir,
            work_dir=Path(str(raw["work-dir"])).expanduser(),
            epsilon_budget=float(budget),
            labels_file=Path(str(labels)) if labels else None,
            labels_key=str(raw.get("labels-key", "sop_instance_uid")),
            device=device,
            threads=threads,
            ingest_workers=workers,
            val_fraction=float(val_fraction),
            policy=SitePolicy.from_mapping(raw),
        )
