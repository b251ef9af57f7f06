from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from client.dataset import DataSpec, load_site_dataset
from client.dicom_scan import SEG_STORAGE, scan_folder
from client.pixels import projection_image
from client.site_check import check_site
from fedrad.phantoms import SITE_STYLES, image_dataset

REAL_SITES = {  # site: (images, lung SEGs), from ../shared/data/README.md
    "radiopaedia": (114, 67),
    "eurorad": (79, 28),
    "literature_other": (21, 19),
}


@pytest.mark.parametrize("style", SITE_STYLES, ids=lambda s: s.name)
def test_pixels_round_trip_every_site_style(style, tmp_path) -> None:
    """MONOCHROME1, 8/12/10-bit, RLE and implicit VR all decode to the same convention."""
    truth = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    patient = {"name": "A^B^ZZCANARY", "id": "CANARY-X", "birth": "19600101", "sex": "F",
               "study_date": "20240101"}
    ds = image_dataset(style, np.random.default_rng(0), patient, truth, "1.2.3", 1)
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    decoded = projection_image(tmp_path / "x.dcm")
    top = 2**style.bits_stored - 1
    expected = np.clip(truth * style.contrast, 0, 1)
    assert np.abs(decoded - expected).max() <= 0.5 / top + 1e-6
    assert decoded[-1, -1] > decoded[0, 0]  # brighter = denser whatever the photometric


def test_generated_sites_read_completely(phantom_sites) -> None:
    for site, folder in phantom_sites.items():
        summary = check_site(folder)
        assert summary["images"] == 12, site
        assert summary["masks_matched"] == 12, site
        assert summary["labelled"] == 12, site
        assert summary["patients"] == 6, site
        assert summary["skipped"] == [], site
        assert summary["phi_fields_in_headers"] > 0


@pytest.mark.parametrize("site", sorted(REAL_SITES))
def test_real_cxr_sites(site, cxr_root, tmp_path) -> None:
    images, segs = REAL_SITES[site]
    folder = cxr_root / site
    summary = check_site(folder)
    assert summary["images"] == images
    assert summary["masks_matched"] == segs
    with (folder / "labels.csv").open() as handle:
        assert summary["labelled"] == sum(1 for _ in csv.DictReader(handle)) == images
    assert summary["skipped"] == []
    dataset = load_site_dataset(folder, tmp_path, DataSpec(image_size=128))
    assert dataset.images.shape == (segs, 1, 128, 128)
    lungs = dataset.targets.astype(bool)
    # Brighter = denser at every site (eurorad is MONOCHROME1): lungs are darker.
    assert dataset.images[lungs].mean() < dataset.images[~lungs].mean() - 0.03
    assert 0.0 <= dataset.images.min() and dataset.images.max() <= 1.0


def _image_and_foreign_seg(folder: Path) -> tuple[Path, Path]:
    """An image, and a SEG that references some other image."""
    images, segs = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "labels.csv"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.SOPClassUID == SEG_STORAGE:
            ref = ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
            segs.append((path, ref.ReferencedSOPInstanceUID))
        else:
            images.append((path, ds.SOPInstanceUID))
    image, uid = images[0]
    return image, next(path for path, ref in segs if ref != uid)


def test_hostile_inputs_are_reported_and_the_scan_completes(phantom_sites, tmp_path) -> None:
    source = phantom_sites["hospital-b"]
    image, seg = _image_and_foreign_seg(source)
    root = tmp_path / "hostile"
    root.mkdir()
    shutil.copy(image, root / "good.dcm")
    (root / "empty.dcm").write_bytes(b"")
    (root / "notes.dcm").write_text("this is not DICOM\n")
    data = image.read_bytes()
    (root / "truncated.dcm").write_bytes(data[: len(data) // 2])
    shutil.copy(image, root / "duplicate.dcm")
    no_pixels = pydicom.dcmread(image)
    del no_pixels.PixelData
    no_pixels.SOPInstanceUID = no_pixels.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.1"
    no_pixels.save_as(root / "nopixels.dcm")
    bad_bits = pydicom.dcmread(image)
    bad_bits.BitsAllocated = 12
    bad_bits.SOPInstanceUID = bad_bits.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.2"
    bad_bits.save_as(root / "badbits.dcm")
    shutil.copy(seg, root / "orphan-seg.dcm")
    summary = check_site(root)
    reasons = {entry["file"]: entry["reason"] for entry in summary["skipped"]}
    expected = {
        "empty.dcm": "empty file",
        "notes.dcm": "not a DICOM file",
        "truncated.dcm": "",
        "good.dcm": "duplicate SOPInstanceUID",  # "duplicate.dcm" sorts first and is kept
        "nopixels.dcm": "without PixelData",
        "badbits.dcm": "unsupported BitsAllocated/BitsStored 12/12",
        "orphan-seg.dcm": "SEG references an image that is not in the data folder",
    }
    for name, reason in expected.items():
        assert name in reasons, name
        assert reason in reasons[name], (name, reasons[name])
    assert summary["images"] == 1  # only one copy of the good image is usable
    assert len(summary["skipped"]) == len(expected)


def _shard_batches(work: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((work / "cache" / "shards").rglob("*.json"),
                                                      key=lambda p: p.stat().st_mtime_ns)]


def test_cache_is_reused_and_invalidated(phantom_sites, tmp_path) -> None:
    folder, work = tmp_path / "site", tmp_path / "work"
    shutil.copytree(phantom_sites["hospital-c"], folder)
    first = load_site_dataset(folder, work, DataSpec(image_size=64))
    second = load_site_dataset(folder, work, DataSpec(image_size=64))
    assert np.array_equal(first.images, second.images)
    assert first.content_hash == second.content_hash
    assert len(_shard_batches(work)) == 1 and len(list(work.glob("cache/datasets/*.json"))) == 1
    # Touched (new mtime, same bytes): recognised by content, nothing decoded again.
    victim = sorted(folder.rglob("*.dcm"))[0]
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10**9))
    touched = load_site_dataset(folder, work, DataSpec(image_size=64))
    assert touched.content_hash == first.content_hash
    assert len(_shard_batches(work)) == 1 and len(list(work.glob("cache/datasets/*.json"))) == 1
    # One file's content changes (same size): only that file is decoded again.
    ds = pydicom.dcmread(victim)
    if ds.SOPClassUID == SEG_STORAGE:
        ds.SeriesDescription = (str(ds.get("SeriesDescription", "")) + "x")[:1]
    ds.InstanceNumber = int(ds.get("InstanceNumber", 1) or 1) + 1
    ds.save_as(victim)
    load_site_dataset(folder, work, DataSpec(image_size=64))
    batches = _shard_batches(work)
    assert len(batches) == 2 and len(batches[-1]) == 1
    assert len(list(work.glob("cache/datasets/*.json"))) == 2
    # A new file: only it is decoded; a preprocessing change: a new settings folder.
    shutil.copy(victim, folder / "copy-of-a-file")  # a duplicate SOP Instance, reported
    grown = load_site_dataset(folder, work, DataSpec(image_size=64))
    duplicates = [s.file for s in grown.skipped if "duplicate SOPInstanceUID" in s.reason]
    assert len(duplicates) == 1 and duplicates[0] in {"copy-of-a-file",
                                                      str(victim.relative_to(folder))}
    assert len(_shard_batches(work)) == 2  # same bytes as a known file: nothing decoded
    smaller = load_site_dataset(folder, work, DataSpec(image_size=32))
    assert smaller.images.shape[-1] == 32
    assert len(list((work / "cache" / "shards").iterdir())) == 2
    assert all(p.stat().st_mode & 0o077 == 0 for p in (work / "cache").rglob("*.json"))


def test_worker_processes_give_the_same_dataset(phantom_sites, tmp_path, monkeypatch) -> None:
    import client.ingest

    monkeypatch.setattr(client.ingest, "PARALLEL_MIN_FILES_PER_WORKER", 4)  # 25 files
    folder = phantom_sites["hospital-b"]  # MONOCHROME1, 12-bit RLE
    one = load_site_dataset(folder, tmp_path / "one", DataSpec(image_size=48), workers=1)
    many = load_site_dataset(folder, tmp_path / "many", DataSpec(image_size=48), workers=3)
    assert one.content_hash == many.content_hash
    assert np.array_equal(one.images, many.images) and np.array_equal(one.groups, many.groups)
    assert one.phi_values == many.phi_values and one.skipped == many.skipped


def test_split_keeps_each_patient_on_one_side(phantom_sites, tmp_path) -> None:
    dataset = load_site_dataset(phantom_sites["hospital-a"], tmp_path, DataSpec(image_size=64))
    train, val = dataset.split(0.25, seed=3)
    assert len(train) + len(val) == len(dataset.groups) and len(val) > 0
    assert not set(dataset.groups[train]) & set(dataset.groups[val])


def test_scan_collects_identifiers_but_never_exposes_ids(phantom_sites) -> None:
    scan = scan_folder(phantom_sites["hospital-a"])
    assert any("ZZCANARY" in value for value in scan.phi_values)
    assert all("CANARY" not in image.patient_key for image in scan.images)


def test_labels_by_accession_number_and_bad_keys(phantom_sites, tmp_path) -> None:
    from client.labels import LabelsError, load_labels

    folder = phantom_sites["hospital-a"]
    rows = list(csv.DictReader((folder / "labels.csv").open()))
    by_accession = tmp_path / "by-accession.csv"
    with by_accession.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["accession_number", "label_nodule"])
        writer.writeheader()
        for row in rows[:5]:
            writer.writerow({k: row[k] for k in ("accession_number", "label_nodule")})
    summary = check_site(folder, by_accession, "accession_number")
    assert summary["labelled"] == 5
    with pytest.raises(LabelsError, match="no column 'study_instance_uid'"):
        load_labels(by_accession, "study_instance_uid")
    with pytest.raises(LabelsError, match="must be one of"):
        load_labels(by_accession, "patient_id")
    (tmp_path / "dup.csv").write_text("sop_instance_uid,x\n1.2,1\n1.2,0\n")
    with pytest.raises(LabelsError, match="line 3: sop_instance_uid value repeated"):
        load_labels(tmp_path / "dup.csv")


def test_voi_window_when_the_task_asks_for_it(tmp_path) -> None:
    from client.pixels import projection_pixels

    style = SITE_STYLES[1]  # hospital-b: DX, MONOCHROME1, 12-bit, carries a VOI window
    truth = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    patient = {"name": "A^B^ZZCANARY", "id": "CANARY-X", "birth": "19600101", "sex": "F",
               "study_date": "20240101"}
    ds = image_dataset(style, np.random.default_rng(0), patient, truth, "1.2.3", 1)
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    ds = pydicom.dcmread(tmp_path / "x.dcm")
    ds.WindowCenter, ds.WindowWidth = 1024, 1024  # stored values 512..1535 span the window
    full = projection_pixels(ds)
    windowed = projection_pixels(ds, voi_window=True)
    stored = ds.pixel_array.astype(np.float64)
    expected = np.clip((stored - (1024 - 0.5 - 511.5)) / 1023, 0, 1)
    assert np.abs(windowed - (1 - expected)).max() < 1e-4  # MONOCHROME1 still inverted
    # Clipped tails: stored values above the window go to 0 (MONOCHROME1), below it to 1.
    assert (windowed == 0).mean() == pytest.approx((stored >= 1535).mean(), abs=0.01)
    assert (windowed == 1).mean() == pytest.approx((stored <= 512).mean(), abs=0.01)
    assert (windowed == 1).mean() > 0.01
    # Full range: at most the ramp's own end point sits at a bound, nothing is clipped.
    assert (full == 0).mean() < 0.001 and full.max() < 0.95
    del ds.WindowCenter, ds.WindowWidth
    assert np.array_equal(projection_pixels(ds, voi_window=True), full)


def test_seg_with_other_geometry_is_refused(phantom_sites, tmp_path) -> None:
    """A SEG whose image has other rows/columns is reported, never stretched to fit."""
    source = phantom_sites["hospital-c"]
    _, seg = _image_and_foreign_seg(source)
    referenced = pydicom.dcmread(seg, stop_before_pixels=True)
    uid = referenced.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0] \
        .ReferencedSOPInstanceUID
    small = image_dataset(SITE_STYLES[2], np.random.default_rng(1),
                           {"name": "A^B^ZZCANARY", "id": "CANARY-Y", "birth": "19600101",
                            "sex": "M", "study_date": "20240101"},
                           np.zeros((64, 64), np.float32), "1.2.3", 1)
    small.SOPInstanceUID = small.file_meta.MediaStorageSOPInstanceUID = uid
    root = tmp_path / "site"
    root.mkdir()
    small.save_as(root / "image.dcm", enforce_file_format=True)
    shutil.copy(seg, root / "seg.dcm")
    summary = check_site(root)
    assert summary["images"] == 1 and summary["masks_matched"] == 0
    assert summary["skipped"] == [{"file": "seg.dcm", "reason": "mask is 128x128, image is 64x64"}]
    with pytest.raises(ValueError, match="no usable image/mask pairs"):
        load_site_dataset(root, tmp_path / "work", DataSpec(image_size=32))


def test_masks_kept_as_nifti_pair_like_dicom_seg(phantom_sites, tmp_path) -> None:
    """A site that keeps masks as <SOPInstanceUID>.nii[.gz] gets the same training pairs."""
    import nibabel as nib

    from client.pixels import seg_pixels

    source = phantom_sites["hospital-a"]
    with_seg = load_site_dataset(source, tmp_path / "seg-work", DataSpec(image_size=64))
    folder = tmp_path / "site"
    shutil.copytree(source, folder)
    segs = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "labels.csv"
            and pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID == SEG_STORAGE]
    for number, seg in enumerate(segs):
        ds = pydicom.dcmread(seg)
        uid = ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0] \
            .ReferencedSOPInstanceUID
        voxels = seg_pixels(ds).T[:, :, None]  # NIfTI (i, j) = (column, row)
        suffix = ".nii.gz" if number % 2 else ".nii"
        nib.save(nib.Nifti1Image(voxels, np.eye(4)), str(seg.parent / f"{uid}{suffix}"))
        seg.unlink()
    (folder / "notes.nii").write_bytes(b"not named after an image")
    with_nifti = load_site_dataset(folder, tmp_path / "nifti-work", DataSpec(image_size=64))
    assert np.array_equal(with_nifti.targets, with_seg.targets)
    assert np.array_equal(with_nifti.images, with_seg.images)
    assert [s.file for s in with_nifti.skipped] == ["notes.nii"]
    assert "rename it after that image's SOPInstanceUID" in with_nifti.skipped[0].reason
    summary = check_site(folder)
    assert summary["masks_matched"] == 12 and len(summary["skipped"]) == 1
    # A NIfTI mask of other geometry is reported like a SEG of other geometry.
    victim = sorted(folder.rglob("*.nii.gz"))[0]
    nib.save(nib.Nifti1Image(np.ones((10, 12, 1), np.uint8), np.eye(4)), str(victim))
    summary = check_site(folder)
    assert summary["masks_matched"] == 11
    assert any(s["reason"] == "mask is 12x10, image is 128x128" for s in summary["skipped"])
