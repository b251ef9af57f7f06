"""PneumoniaMNIST as three DICOM hospitals (fedrad.pneumonia_sites): what `fedrad site
check` reads of them, and that no patient is in two splits or two sites."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest

from client.dataset import DataSpec, load_site_dataset
from common.config import Task
from fedrad.pneumonia_sites import LABEL, SHARES, PneumoniaDataError, assign, write_sites
from tests.conftest import shared_data

LIMIT = 40


@pytest.fixture(scope="module")
def npz() -> Path:
    path = shared_data() / "pneumoniamnist" / "pneumoniamnist.npz"
    if not path.exists():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="module")
def written(npz: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    return write_sites(npz, tmp_path_factory.mktemp("pneumonia"), limit=LIMIT)


def test_site_check_reads_every_image_and_label_of_every_site(written) -> None:
    for split, sites in written.items():
        for site, folder in sites.items():
            out = subprocess.run([sys.executable, "-m", "fedrad.cli", "site", "check",
                                  "--data", str(folder), "--json"], capture_output=True,
                                 text=True, check=True)
            report = json.loads(out.stdout)
            assert report["images"] == LIMIT and report["labelled"] == LIMIT, (split, site)
            assert report["patients"] == LIMIT and report["skipped"] == []


def test_no_patient_is_in_two_splits_or_two_sites(written) -> None:
    owners: dict[str, set[tuple[str, str]]] = {}
    pixels: Counter[bytes] = Counter()
    for split, sites in written.items():
        for site, folder in sites.items():
            for path in folder.rglob("*"):
                if path.is_file() and path.name != "labels.csv":
                    ds = pydicom.dcmread(path)
                    assert "ZZCANARY" in str(ds.PatientName)
                    owners.setdefault(str(ds.PatientID), set()).add((split, site))
                    pixels[ds.SOPInstanceUID.encode()] += 1
    assert len(owners) == 2 * 3 * LIMIT
    assert all(len(places) == 1 for places in owners.values())
    assert all(pid.startswith("CANARY-") for pid in owners)
    assert max(pixels.values()) == 1


def test_sites_differ_in_size_and_class_balance_as_shares_say(npz) -> None:
    labels = np.load(npz)["train_labels"].reshape(-1)
    by_site = assign(labels, SHARES, np.random.default_rng(0))
    index = np.concatenate(list(by_site.values()))
    assert sorted(index.tolist()) == list(range(len(labels)))  # every image once
    normal = {site: float((labels[i] == 0).mean()) for site, i in by_site.items()}
    sizes = {site: len(i) for site, i in by_site.items()}
    assert normal["hospital-a"] > 2 * normal["hospital-b"]  # non-IID class balance
    assert sizes["hospital-b"] > 2 * sizes["hospital-c"]  # and size


def test_the_sites_load_as_a_classification_dataset_with_the_labels_written(written) -> None:
    folder = written["train"]["hospital-b"]  # MONOCHROME1, 12 bit, RLE
    data = load_site_dataset(folder, folder.parent / "cache-b",
                             DataSpec(task=Task.CXR_CLASSIFY, image_size=32, labels=(LABEL,)))
    with (folder / "labels.csv").open() as handle:
        written_labels = sorted(int(row[LABEL]) for row in csv.DictReader(handle))
    assert data.images.shape == (LIMIT, 1, 32, 32)
    assert sorted(data.targets[:, 0].astype(int).tolist()) == written_labels
    assert 0.05 < float(data.images.mean()) < 0.95  # MONOCHROME1 undone, not inverted


def test_a_file_that_is_not_pneumoniamnist_is_refused_by_name(tmp_path) -> None:
    bad = tmp_path / "other.npz"
    np.savez(bad, images=np.zeros((2, 28, 28)))
    with pytest.raises(PneumoniaDataError, match="other.npz.*train/val/test_images"):
        write_sites(bad, tmp_path / "out")
