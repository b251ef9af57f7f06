"""`fedrad models export --format monai-bundle`: the bundle runs with MONAI alone (a
subprocess in which importing any fedrad package fails) on a real DICOM image and gives
what `fedrad predict` gives; its metadata passes MONAI's own network check; its files are
signed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from common.model_signing import load_verify_key
from fedrad import processes as proc
from fedrad.model_registry import ModelRegistryError
from fedrad.monai_bundle import verify_bundle

FEDRAD = [sys.executable, "-m", "fedrad.cli"]
RUNS = {"seg": "1", "cls": "2"}  # the run ids of the `exported` fixture
# Runs `python -m monai.bundle run ...` with every fedrad package blocked from import.
MONAI_ALONE = """
import runpy, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"fedrad", "client", "common", "server"}:
            raise ImportError("the bundle imported a fedrad module: " + name)
sys.meta_path.insert(0, Block())
sys.argv = ["monai.bundle", "run", "--config_file", "configs/inference.json",
            "--input_file", sys.argv[1], "--output_file", sys.argv[2]]
runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
"""
SPEC_KEYS = {"version", "monai_version", "pytorch_version", "numpy_version",
             "optional_packages_version", "task", "description", "authors", "copyright",
             "network_data_format"}
TENSOR_KEYS = {"type", "format", "modality", "num_channels", "spatial_shape", "dtype",
               "value_range", "is_patch_data", "channel_def"}


def _bundle(exported, kind: str, out: Path, *extra: str) -> Path:
    consortium = exported["tmp"] / "consortium"
    done = subprocess.run([*FEDRAD, "models", "export", RUNS[kind], "--format", "monai-bundle",
                           "--out", str(out), "--consortium", str(consortium), "--json",
                           *extra], capture_output=True, text=True, check=False,
                          env=proc.child_env({}), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert {"configs/metadata.json", "configs/inference.json", "models/model.pt",
            "models/model.ts"} <= set(json.loads(done.stdout)["files"])
    return out


def _run_bundle(bundle: Path, image: Path, out: Path) -> np.ndarray:
    done = subprocess.run([sys.executable, "-c", MONAI_ALONE, str(image), str(out)],
                          cwd=bundle, capture_output=True, text=True, check=False,
                          env=proc.child_env({"OMP_NUM_THREADS": "1"}), timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return np.load(out)


def _one_image_study(cxr_root: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A real eurorad image (DX, MONOCHROME1, 12-bit, RLE) alone in a study folder."""
    source = next(p for p in sorted((cxr_root / "eurorad").iterdir())
                  if p.suffix != ".csv"
                  and pydicom.dcmread(p, stop_before_pixels=True).Modality == "DX")
    study = tmp_path / "study"
    study.mkdir()
    (study / "image.dcm").write_bytes(source.read_bytes())
    return study, study / "image.dcm"


def _predict(exported, kind: str, study: Path, out: Path) -> dict:
    done = subprocess.run([*FEDRAD, "predict", str(exported["folders"][kind]), str(study),
                           "--out", str(out), "--verify-key", str(exported["public"]),
                           "--json"], capture_output=True, text=True, check=False,
                          env=proc.child_env({"OMP_NUM_THREADS": "1"}), timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_segmentation_bundle_runs_with_monai_alone_and_matches_predict(
        exported, cxr_root: Path, tmp_path: Path) -> None:
    bundle = _bundle(exported, "seg", tmp_path / "bundle")
    study, image = _one_image_study(cxr_root, tmp_path)
    probability = _run_bundle(bundle, image, tmp_path / "out.npy")
    assert probability.shape == (1, 32, 32) and 0 <= probability.min() <= probability.max() <= 1
    results = _predict(exported, "seg", study, tmp_path / "predicted")
    entry = results["images"][0]
    mask = probability[0] > json.loads((bundle / "configs/inference.json").read_text()
                                       )["threshold"]
    assert entry["foreground_fraction"] == pytest.approx(mask.mean(), abs=2 / mask.size)
    seg = hd.seg.segread(tmp_path / "predicted" / entry["seg_file"])
    source = pydicom.dcmread(image, stop_before_pixels=True)
    rows, cols = int(source.Rows), int(source.Columns)
    upscaled = mask[(np.arange(rows) * 32) // rows][:, (np.arange(cols) * 32) // cols]
    agreement = (seg.pixel_array.reshape(rows, cols) == upscaled).mean()
    assert agreement > 0.995, agreement  # only pixels at p = threshold ± 1e-6 may differ


def test_classification_bundle_gives_predicts_probabilities(
        exported, cxr_root: Path, tmp_path: Path) -> None:
    bundle = _bundle(exported, "cls", tmp_path / "bundle")
    study, image = _one_image_study(cxr_root, tmp_path)
    probability = _run_bundle(bundle, image, tmp_path / "out.npy")
    results = _predict(exported, "cls", study, tmp_path / "predicted")
    expected = [v["probability"] for v in results["images"][0]["labels"].values()]
    np.testing.assert_allclose(probability, expected, atol=1e-5)


def test_bundle_metadata_follows_the_specification_and_monai_checks_the_network(
        exported, tmp_path: Path) -> None:
    from monai.bundle import verify_net_in_out

    bundle = _bundle(exported, "seg", tmp_path / "bundle")
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert SPEC_KEYS <= set(meta)
    for tensor in (meta["network_data_format"]["inputs"]["image"],
                   meta["network_data_format"]["outputs"]["pred"]):
        assert TENSOR_KEYS <= set(tensor)
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [32, 32]
    assert meta["not_for_clinical_use"] is True
    provenance = meta["fedrad"]
    assert provenance["run_id"] == "1" and provenance["sites"] == ["site-1", "site-2", "site-3"]
    assert "epsilon_per_site" in provenance["dp"]
    assert "ZZCANARY" not in json.dumps(meta) and "CANARY-" not in json.dumps(meta)
    # MONAI builds network_def from the config and runs it on the declared input
    verify_net_in_out(net_id="network_def", meta_file=str(bundle / "configs/metadata.json"),
                      config_file=str(bundle / "configs/inference.json"), n=1)
    clinical = _bundle(exported, "cls", tmp_path / "clinical", "--clinical-use")
    assert json.loads((clinical / "configs/metadata.json").read_text()
                      )["not_for_clinical_use"] is False


def test_bundle_signature_catches_a_changed_preprocessing_script(
        exported, tmp_path: Path) -> None:
    bundle = _bundle(exported, "seg", tmp_path / "bundle")
    key = load_verify_key(exported["public"])
    assert verify_bundle(bundle, key)["fedrad"]["run_id"] == "1"
    script = bundle / "scripts" / "intensity.py"
    script.write_text(script.read_text().replace("1.0 - out", "out"))  # no MONOCHROME1 flip
    with pytest.raises(ModelRegistryError, match=r"changed or missing \['scripts/intensity.py'"):
        verify_bundle(bundle, key)
