"""Progress of long work: every file is counted once, and the count reaches the total."""

from __future__ import annotations

from pathlib import Path

from client.dataset import DataSpec, load_site_dataset
from client.dicom_scan import walk_files
from client.site_check import check_site


def test_site_check_counts_every_dicom_file_once(cxr_root: Path) -> None:
    site = cxr_root / "literature_other"
    seen: list[int] = []
    summary = check_site(site, progress=seen.append)
    dicom = [e for e in walk_files(site) if e.path.suffix == ".dcm"]
    assert seen == list(range(1, len(dicom) + 1))
    assert summary["images"] > 0


def test_first_ingestion_reports_progress_and_a_cached_one_none(cxr_root: Path,
                                                               tmp_path: Path) -> None:
    site = cxr_root / "eurorad"
    calls: list[tuple[int, int]] = []
    spec = DataSpec(image_size=32)
    load_site_dataset(site, tmp_path, spec, progress=lambda d, t: calls.append((d, t)))
    total = len(walk_files(site))
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    again: list[tuple[int, int]] = []
    load_site_dataset(site, tmp_path, spec, progress=lambda d, t: again.append((d, t)))
    assert again == []  # from the cache: nothing to decode
