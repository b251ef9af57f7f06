from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest

from client.dicom_scan import scan_folder
from client.volumes import VolumeError, build_volume, group_series, load_nifti
from fedrad.phantoms import write_ct_series
from tests.conftest import shared_data


def _order(volume) -> list[int]:
    return [int(round(v / 10)) for v in volume.array[:, 0, 0]]


def test_series_is_sorted_by_geometry_not_names(tmp_path) -> None:
    write_ct_series(tmp_path / "ct", slices=12, spacing=2.5, pixel_spacing=1.5)
    scan = scan_folder(tmp_path / "ct")
    (series,) = group_series(scan.images).values()
    volume = build_volume([image.path for image in series])
    assert volume.array.shape == (12, 48, 48)
    assert _order(volume) == list(range(12))  # InstanceNumber runs the other way
    assert volume.spacing == pytest.approx((2.5, 1.5, 1.5))
    assert volume.array.min() == -1000  # signed pixels, in HU
    assert np.allclose(volume.direction[:, 2], [0, 0, 1], atol=1e-6)
    assert volume.report is not None and volume.report.missing == volume.report.duplicates == 0
    assert not volume.report.uneven


def test_missing_slice_is_refused(tmp_path) -> None:
    paths = write_ct_series(tmp_path / "ct", slices=10)
    by_index = sorted(paths, key=lambda p: -pydicom.dcmread(p).InstanceNumber)
    by_index[4].unlink()  # the fifth slice along the normal
    remaining = [p for p in paths if p.exists()]
    with pytest.raises(VolumeError, match=r"1 missing slice\(s\)"):
        build_volume(remaining)


def test_duplicate_slice_is_reported_and_dropped(tmp_path) -> None:
    paths = write_ct_series(tmp_path / "ct", slices=8)
    copy = tmp_path / "ct" / "copy.dcm"
    shutil.copy(paths[0], copy)
    volume = build_volume([*paths, copy])
    assert volume.array.shape[0] == 8
    assert volume.report is not None and volume.report.duplicates == 1


def test_uneven_spacing_is_reported(tmp_path) -> None:
    paths = write_ct_series(tmp_path / "ct", slices=8, spacing=2.0)
    moved = pydicom.dcmread(paths[0])
    position = [float(v) for v in moved.ImagePositionPatient]
    moved.ImagePositionPatient = [position[0], position[1], position[2] + 0.3]
    moved.save_as(paths[0])
    volume = build_volume(paths)
    assert volume.report is not None and volume.report.uneven


CT = shared_data() / "ct"


@pytest.mark.skipif(not CT.is_dir(), reason="ct/ data not found (set FEDRAD_SHARED_DATA)")
@pytest.mark.parametrize(
    ("image", "labels", "shape", "n_labels"),
    [("example_ct_sm.nii.gz", "example_seg.nii.gz", (122, 101, 30), 41),
     ("example_mr_sm.nii.gz", "example_seg_mr.nii.gz", (117, 91, 20), 23)],
)
def test_nifti_volumes_load_with_shape_and_spacing(image, labels, shape, n_labels) -> None:
    volume = load_nifti(CT / image)
    label_map = load_nifti(CT / labels)
    assert volume.array.shape == tuple(reversed(shape))  # (Z, Y, X)
    assert volume.spacing == pytest.approx((3.0, 3.0, 3.0))
    assert label_map.array.shape == volume.array.shape
    assert len(np.unique(label_map.array)) == n_labels + 1  # + background


def test_site_check_reports_volumes_and_broken_series(tmp_path) -> None:
    from client.site_check import check_site

    write_ct_series(tmp_path / "site" / "good", slices=6, seed=1)
    broken = write_ct_series(tmp_path / "site" / "broken", slices=6, seed=2)
    sorted(broken, key=lambda p: -pydicom.dcmread(p).InstanceNumber)[2].unlink()
    summary = check_site(tmp_path / "site")
    assert summary["volumes"] == 1
    assert summary["images"] == 11
    (entry,) = summary["skipped"]
    assert "series of 5 slices" in entry["reason"] and "missing slice" in entry["reason"]
