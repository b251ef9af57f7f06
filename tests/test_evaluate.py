"""`fedrad models export` and `fedrad evaluate` on real federated models: numbers checked
against independent computations, signatures enforced, PHI absent from the output."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from client.dataset import DataSpec, load_site_dataset
from common.config import Task
from fedrad import processes as proc
from fedrad.dicom_results import read_probabilities
from fedrad.model_registry import load_exported
from tests.inprocess import signing_keys

FEDRAD = [sys.executable, "-m", "fedrad.cli"]
def _evaluate(*args: str) -> subprocess.CompletedProcess[str]:
    # One thread on both sides: an undertrained model's scores differ by ~1e-6, and the
    # same kernels on the same threads give the same floats (so the same ranks).
    return subprocess.run([*FEDRAD, "evaluate", *args], capture_output=True, text=True,
                          check=False, env=proc.child_env({"OMP_NUM_THREADS": "1"}),
                          timeout=300)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _data(folder, task: Task, tmp, labels=()):
    return load_site_dataset(folder, tmp, DataSpec(task=task, image_size=32, labels=labels))


def test_segmentation_dice_and_hd95_per_site_and_pooled(exported, phantom_sites,
                                                        tmp_path) -> None:
    folder = exported["folders"]["seg"]
    result = _evaluate(str(folder), "--data", str(phantom_sites["hospital-a"]), "--data",
                       str(phantom_sites["hospital-b"]), "--verify-key",
                       str(exported["public"]), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    model = load_exported(folder)
    dice_all = []
    for site in ("hospital-a", "hospital-b"):
        data = _data(phantom_sites[site], Task.LUNG_SEG, tmp_path / site)
        with torch.no_grad():
            predicted = torch.sigmoid(model(torch.from_numpy(data.images))).numpy() > 0.5
        truth = data.targets > 0
        inter = (predicted & truth).sum(axis=(1, 2, 3))
        dice = 2 * inter / (predicted.sum(axis=(1, 2, 3)) + truth.sum(axis=(1, 2, 3)))
        dice_all += dice.tolist()
        assert report["per_site"][site]["n_images"] == len(data.images) == 12
        assert report["per_site"][site]["dice_mean"] == pytest.approx(dice.mean(), abs=1e-5)
    assert report["n_images"] == 24
    assert report["dice_mean"] == pytest.approx(np.mean(dice_all), abs=1e-5)
    low, high = report["dice_ci"]
    assert low <= report["dice_mean"] <= high and high - low > 0
    assert report["dice"]["median"] == pytest.approx(np.median(dice_all), abs=1e-5)
    assert report["hd95"]["n"] + report["hd95_undefined"] == 24
    assert "ZZCANARY" not in result.stdout and "CANARY-" not in result.stdout


def _auroc(scores: np.ndarray, truth: np.ndarray) -> float:
    """Mann-Whitney: the chance a positive outranks a negative (ties count half)."""
    pos, neg = scores[truth > 0.5], scores[truth <= 0.5]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def test_classification_auroc_with_bootstrap_ci_sensitivity_and_calibration(
        exported, phantom_sites, tmp_path, one_thread) -> None:
    folder = exported["folders"]["cls"]
    result = _evaluate(str(folder), "--data", str(phantom_sites["hospital-c"]),
                       "--verify-key", str(exported["public"]), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    data = _data(phantom_sites["hospital-c"], Task.CXR_CLASSIFY, tmp_path,
                 labels=("label_nodule",))
    with torch.no_grad():
        scores = torch.sigmoid(load_exported(folder)(torch.from_numpy(data.images))).numpy()
    truth = data.targets[:, 0]
    assert report["n_images"] == 12
    expected = _auroc(scores[:, 0], truth)
    assert report["auroc"]["label_nodule"] == pytest.approx(expected, abs=1e-6)
    assert report["auroc"]["macro"] == pytest.approx(expected, abs=1e-6)
    low, high = report["auroc_ci"]["label_nodule"]
    assert 0 <= low <= expected <= high <= 1
    label = report["labels"]["label_nodule"]
    positive = truth > 0.5
    assert label["sensitivity"] == pytest.approx(
        ((scores[:, 0] > 0.5) & positive).sum() / positive.sum())
    assert label["specificity"] == pytest.approx(
        ((scores[:, 0] <= 0.5) & ~positive).sum() / (~positive).sum())
    counts = label["reliability"]["count"]
    assert sum(counts) == 12 and len(counts) == 10
    # ECE = Σ_bins (n_b / N) |mean predicted_b - observed_b|
    ece = sum(c / 12 * abs(p - o) for c, p, o in zip(
        counts, label["reliability"]["mean_predicted"], label["reliability"]["observed"],
        strict=True) if c)
    assert label["ece"] == pytest.approx(ece, abs=1e-5)


def test_a_model_whose_signature_or_weights_do_not_verify_is_refused(exported, tmp_path,
                                                                     phantom_sites) -> None:
    import shutil

    folder = tmp_path / "tampered"
    shutil.copytree(exported["folders"]["seg"], folder)
    state = torch.load(folder / "model.pt", weights_only=True)
    first = next(iter(state))
    state[first] = state[first] + 0.01
    torch.save(state, folder / "model.pt")
    data = ["--data", str(phantom_sites["hospital-a"])]
    tampered = _evaluate(str(folder), *data, "--verify-key", str(exported["public"]))
    assert tampered.returncode == 1
    assert "model.pt differs from the sha256" in tampered.stderr
    _, other = signing_keys(tmp_path)
    foreign = _evaluate(str(exported["folders"]["seg"]), *data, "--verify-key", str(other))
    assert foreign.returncode == 1 and "signature does not verify" in foreign.stderr
    unchecked = _evaluate(str(exported["folders"]["seg"]), *data)
    assert unchecked.returncode == 1 and "--verify-key" in unchecked.stderr


def _study(cxr_root, tmp_path):
    """A real radiopaedia study (CR, its own folder), plus a broken file beside it."""
    import shutil

    source = next(p for p in sorted((cxr_root / "radiopaedia").glob("*/*")) if p.is_dir())
    study = tmp_path / "study"
    shutil.copytree(source, study)
    (study / "broken.dcm").write_bytes(b"not a dicom file")
    return study


def _model_input(path, size: int = 32) -> np.ndarray:
    import pydicom

    from client.pixels import projection_pixels, resize_area

    return resize_area(projection_pixels(pydicom.dcmread(path)), size)


def test_predict_writes_a_dicom_seg_a_pacs_can_read(exported, cxr_root, tmp_path) -> None:
    import highdicom as hd
    import pydicom

    study, out = _study(cxr_root, tmp_path), tmp_path / "out"
    result = subprocess.run([*FEDRAD, "predict", str(exported["folders"]["seg"]), str(study),
                             "--out", str(out), "--verify-key", str(exported["public"])],
                            capture_output=True, text=True, check=False, env=proc.child_env({}))
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    images = [p for p in study.rglob("*.dcm") if p.name != "broken.dcm"]
    assert len(results["images"]) == len(images) >= 1
    assert results["skipped"][0]["file"] == "broken.dcm"
    model = load_exported(exported["folders"]["seg"])
    for entry in results["images"]:
        source_path = next(p for p in images if str(pydicom.dcmread(
            p, stop_before_pixels=True).SOPInstanceUID) == entry["sop_instance_uid"])
        source = pydicom.dcmread(source_path)
        seg = hd.seg.segread(out / entry["seg_file"])
        assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
        referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
        assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert seg.StudyInstanceUID == source.StudyInstanceUID
        assert (seg.Rows, seg.Columns) == (source.Rows, source.Columns)
        assert seg.SegmentSequence[0].SegmentLabel == "Lung"
        with torch.no_grad():
            mask = (torch.sigmoid(model(torch.from_numpy(_model_input(source_path)[None, None])))
                    [0, 0].numpy() > 0.5)
        rows, cols = source.Rows, source.Columns
        expected = mask[(np.arange(rows) * 32) // rows][:, (np.arange(cols) * 32) // cols]
        np.testing.assert_array_equal(seg.pixel_array.reshape(rows, cols), expected)
        assert entry["foreground_fraction"] == pytest.approx(mask.mean())
        assert (out / entry["overlay"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_classification_results_carry_uids_not_phi(exported, cxr_root,
                                                           tmp_path) -> None:
    study, out = _study(cxr_root, tmp_path), tmp_path / "out"
    result = subprocess.run([*FEDRAD, "predict", str(exported["folders"]["cls"]), str(study),
                             "--out", str(out), "--verify-key", str(exported["public"])],
                            capture_output=True, text=True, check=False, env=proc.child_env({}))
    assert result.returncode == 0, result.stderr
    text = (out / "results.json").read_text()
    assert "ZZCANARY" not in text and "CANARY-" not in text
    assert "ZZCANARY" not in result.stdout + result.stderr
    results = json.loads(text)
    model = load_exported(exported["folders"]["cls"])
    import pydicom

    for entry in results["images"]:
        path = next(p for p in study.rglob("*.dcm") if p.name != "broken.dcm" and str(
            pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            == entry["sop_instance_uid"])
        with torch.no_grad():
            p = float(torch.sigmoid(model(torch.from_numpy(_model_input(path)[None, None]))))
        assert entry["labels"]["label_nodule"]["probability"] == pytest.approx(p, abs=1e-5)
        assert entry["labels"]["label_nodule"]["positive"] == (p > 0.5)
        sr = pydicom.dcmread(out / entry["sr_file"])  # the findings as DICOM SR (TID 1500)
        assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
        assert str(sr.SOPInstanceUID) == entry["sr_sop_instance_uid"]
        assert read_probabilities(sr) == {"label_nodule": pytest.approx(p, abs=1e-5)}
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
        assert (evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
                .ReferencedSOPInstanceUID == entry["sop_instance_uid"])
        assert (sr.VerificationFlag, sr.CompletionFlag) == ("UNVERIFIED", "COMPLETE")
        png = (out / entry["overlay"]).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    refused = subprocess.run([*FEDRAD, "predict", str(exported["folders"]["cls"]), str(study),
                              "--out", str(tmp_path / "x")], capture_output=True, text=True,
                             check=False, env=proc.child_env({}))
    assert refused.returncode == 1 and "--verify-key" in refused.stderr
    assert not (tmp_path / "x").exists()
