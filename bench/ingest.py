"""First-pass ingestion speed of fedrad vs. a bare pydicom loop, and the cache's speed-up.

Usage: python bench/ingest.py [DATA]   (default ../shared/data/cxr, one sub-folder per site)

fedrad's first pass = `load_site_dataset` on every site with an empty work folder: one read
per file, its content hash, header checks, PHI collection, pixel decoding (Modality LUT,
MONOCHROME1), resizing to 128 px, SEG pairing and writing the content-hashed cache. It runs
with one process (the default) and, as a second figure, with one worker per CPU
(node config `ingest-workers`). The baseline is the limit on this machine:
`pydicom.dcmread(f).pixel_array` over the same DICOM files. Both are timed alternately, best
of REPEATS, in one process. MONAI's `LoadImage(reader="PydicomReader")` is timed as well.
The last line is `ingest_over_raw=<fedrad files/s / raw files/s>`.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pydicom

from client.dataset import DataSpec, load_site_dataset
from client.dicom_scan import NON_DICOM_NAMES, iter_files

REPEATS = 7
SIZE = 128


def main() -> None:
    warnings.simplefilter("ignore")
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / \
        "shared" / "data" / "cxr"
    sites = sorted(p for p in root.iterdir() if p.is_dir())
    files = [f for f in iter_files(root) if f.name not in NON_DICOM_NAMES]
    workers = os.cpu_count() or 1
    raw_best = first_best = cached_best = parallel_best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        for path in files:
            pydicom.dcmread(path).pixel_array  # noqa: B018 - the decode is the work
        raw_best = min(raw_best, time.perf_counter() - start)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            start = time.perf_counter()
            for site in sites:
                load_site_dataset(site, work / site.name, DataSpec(image_size=SIZE))
            first_best = min(first_best, time.perf_counter() - start)
            start = time.perf_counter()
            for site in sites:
                load_site_dataset(site, work / site.name, DataSpec(image_size=SIZE))
            cached_best = min(cached_best, time.perf_counter() - start)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            start = time.perf_counter()
            for site in sites:
                load_site_dataset(site, work / site.name, DataSpec(image_size=SIZE),
                                  workers=workers)
            parallel_best = min(parallel_best, time.perf_counter() - start)
    from monai.transforms import LoadImage

    loader = LoadImage(reader="PydicomReader", image_only=True)
    failures = 0
    start = time.perf_counter()
    for path in files:
        try:
            loader(str(path))
        except Exception:  # noqa: BLE001 - counted: MONAI cannot read some SEGs
            failures += 1
    monai = time.perf_counter() - start
    n = len(files)
    print(f"files={n} sites={len(sites)} repeats={REPEATS} (best of)")
    print(f"raw pydicom    {n / raw_best:8.1f} files/s")
    print(f"fedrad first   {n / first_best:8.1f} files/s")
    print(f"fedrad first, {workers} workers {n / parallel_best:8.1f} files/s")
    print(f"fedrad cached  {n / cached_best:8.1f} files/s")
    print(f"monai LoadImage{n / monai:8.1f} files/s (single run; {failures} files it "
          "could not read; raw values, no MONOCHROME1 or bit-depth handling)")
    print(f"monai_over_raw={raw_best / monai:.3f}")
    print(f"ingest_over_raw_{workers}_workers={raw_best / parallel_best:.3f}")
    print(f"cached_speedup={first_best / cached_best:.1f}")
    print(f"ingest_over_raw={raw_best / first_best:.3f}")


if __name__ == "__main__":
    main()
