"""A hostile export (generated here, seeded) neither ends a site's scan nor exhausts its
memory: every hostile file is skipped with its reason, the good files are all used, in
`fedrad site check` and in training's ingestion alike."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest

from client.dataset import DataSpec, load_site_dataset
from client.limits import MAX_INFLATED_BYTES
from fedrad import processes as proc

# `fedrad site check` in a process of its own, whose peak RSS is the only child's.
MEASURED = """
import resource, subprocess, sys
out = subprocess.run([sys.executable, "-m", "fedrad.cli", "site", "check", "--data",
                      sys.argv[1], "--json"], capture_output=True, text=True, check=True)
print(out.stdout + "peak-kib=" + str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
"""
GOOD_SITE = "literature_other"
RLE_SITE = "eurorad"
BOMB_BYTES = MAX_INFLATED_BYTES + (64 << 20)


def _mutants(source: list[Path], out: Path, rng: np.random.Generator) -> list[str]:
    """Truncations, byte flips (RLE offsets and data included) and random files."""
    names = []
    for i, path in enumerate(source):
        data = bytearray(path.read_bytes())
        cut = out / f"truncated-{i}.dcm"
        cut.write_bytes(bytes(data[:int(rng.integers(200, len(data)))]))
        for j in range(3):
            flipped = bytearray(data)
            start = len(data) - int(rng.integers(1000, min(len(data) - 400, 60000)))
            for offset in rng.integers(start, len(data), 12):
                flipped[offset] ^= int(rng.integers(1, 256))
            (out / f"flipped-{i}-{j}.dcm").write_bytes(bytes(flipped))
            names.append(f"flipped-{i}-{j}.dcm")
        names.append(cut.name)
    (out / "random.dcm").write_bytes(rng.bytes(5000))
    (out / "empty.dcm").write_bytes(b"")
    return [*names, "random.dcm", "empty.dcm"]


def _absurd_headers(template: Path, out: Path) -> list[str]:
    cases = {"huge-rows.dcm": {"Rows": 65535, "Columns": 65535},
             "huge-frames.dcm": {"NumberOfFrames": 100000},
             "absurd-bits.dcm": {"BitsStored": 40}}
    for name, values in cases.items():
        ds = pydicom.dcmread(template)
        for key, value in values.items():
            setattr(ds, key, value)
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(out / name)
    return list(cases)


def _deflate_bomb(path: Path) -> None:
    """A Part-10 file in Deflated Explicit VR LE whose dataset inflates past the limit."""
    syntax = b"1.2.840.10008.1.2.1.99\0"
    element = struct.pack("<HH2sH", 0x0002, 0x0010, b"UI", len(syntax)) + syntax
    meta = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(element)) + element
    body = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with path.open("wb") as handle:
        handle.write(b"\0" * 128 + b"DICM" + meta)
        handle.write(body.compress(struct.pack("<HH2sHI", 0x0011, 0x1010, b"OB", 0,
                                               BOMB_BYTES)))
        zeros = bytes(1 << 24)
        for _ in range(BOMB_BYTES // len(zeros)):
            handle.write(body.compress(zeros))
        handle.write(body.flush())


def _nifti_bombs(out: Path) -> list[str]:
    import gzip

    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape((4096, 4096, 4096))
    header.set_data_dtype(np.uint8)
    claims = out / "1.2.3.4.5.nii"  # a header claiming 68 G voxels, 16 bytes of data
    claims.write_bytes(header.binaryblock + b"\0" * 4 + bytes(16))
    bomb = out / "1.2.3.4.6.nii.gz"
    with gzip.open(bomb, "wb", compresslevel=9) as handle:
        zeros = bytes(1 << 24)
        for _ in range(BOMB_BYTES // len(zeros)):
            handle.write(zeros)
    return [claims.name, bomb.name]


@pytest.fixture(scope="module")
def hostile_site(cxr_root, tmp_path_factory) -> tuple[Path, list[str]]:
    rng = np.random.default_rng(20261201)
    site = tmp_path_factory.mktemp("hostile") / "site"
    shutil.copytree(cxr_root / GOOD_SITE, site)
    bad = site / "incoming"
    bad.mkdir()
    rle = sorted(p for p in (cxr_root / RLE_SITE).iterdir() if p.is_file())[:6]
    images = sorted(p for p in (cxr_root / GOOD_SITE).rglob("*.dcm"))[:4]
    hostile = _mutants(rle + images, bad, rng)
    hostile += _absurd_headers(images[0], bad)
    _deflate_bomb(bad / "deflate-bomb.dcm")
    hostile += ["deflate-bomb.dcm", *_nifti_bombs(bad)]
    (bad / "loop").symlink_to("..", target_is_directory=True)
    (bad / "outside").symlink_to("/etc", target_is_directory=True)
    (bad / "passwd.dcm").symlink_to("/etc/passwd")
    return site, hostile


def test_site_check_survives_a_hostile_export_with_bounded_memory(hostile_site,
                                                                  cxr_root) -> None:
    site, hostile = hostile_site
    result = subprocess.run([sys.executable, "-c", MEASURED, str(site)], capture_output=True,
                            text=True, timeout=600, env=proc.child_env({}), check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    out, _, peak = result.stdout.rpartition("peak-kib=")
    peak_kib = int(peak)
    summary = json.loads(out)
    clean = json.loads(subprocess.run(
        [sys.executable, "-m", "fedrad.cli", "site", "check", "--data",
         str(cxr_root / GOOD_SITE), "--json"], capture_output=True, text=True, timeout=600,
        env=proc.child_env({}), check=True).stdout)
    # every good image still counts (a mutant whose flips hit nothing checked may too)
    assert summary["images"] >= clean["images"] > 0
    assert summary["masks_matched"] >= clean["masks_matched"] > 0
    reasons = {Path(s["file"]).name: s["reason"] for s in summary["skipped"]}
    for name in ("deflate-bomb.dcm", "1.2.3.4.6.nii.gz"):
        assert "decompression bomb" in reasons[name], reasons.get(name)
    assert "exceeds the site's limit" in reasons["1.2.3.4.5.nii"]
    assert "exceeds the site's limit" in reasons["huge-rows.dcm"]
    assert "exceeds the site's limit" in reasons["huge-frames.dcm"]
    assert "BitsAllocated/BitsStored" in reasons["absurd-bits.dcm"]
    assert "symbolic link loop" in reasons["loop"]
    assert "outside the data folder" in reasons["outside"]
    assert "outside the data folder" in reasons["passwd.dcm"]
    usable_mutants = [n for n in hostile if n not in reasons]
    # a flipped byte may land where nothing checks it: such a file decodes (to noise)
    assert all(n.startswith("flipped-") for n in usable_mutants), usable_mutants
    assert peak_kib < 1_500_000, f"peak RSS {peak_kib} KiB"


def test_training_ingestion_survives_the_same_export(hostile_site, cxr_root,
                                                     tmp_path) -> None:
    site, _ = hostile_site
    spec = DataSpec(image_size=64)
    hostile = load_site_dataset(site, tmp_path / "hostile-work", spec)
    clean = load_site_dataset(cxr_root / GOOD_SITE, tmp_path / "clean-work", spec)
    assert len(hostile.groups) >= len(clean.groups) > 0
    skipped = {Path(s.file).name for s in hostile.skipped}
    assert {"deflate-bomb.dcm", "loop", "outside", "huge-rows.dcm"} <= skipped
    assert not os.path.exists(tmp_path / "hostile-work" / "etc")
