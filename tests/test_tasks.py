"""Each task end to end at one site: its dataset, DP training and its metrics."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from client.dataset import DatasetError, DataSpec, load_site_dataset
from client.training import ClassificationAlgo, SegmentationAlgo, build_algo
from common.config import RunConfig
from tests.conftest import shared_data


def _rank_auroc(truth: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney U / (n_pos * n_neg), ties counted half: the textbook AUROC."""
    positive, negative = score[truth > 0.5], score[truth <= 0.5]
    wins = (positive[:, None] > negative[None, :]).sum()
    ties = (positive[:, None] == negative[None, :]).sum()
    return float((wins + 0.5 * ties) / (len(positive) * len(negative)))


def test_classification_learns_and_reports_per_label_metrics(phantom_sites, tmp_path) -> None:
    torch.set_num_threads(2)
    config = RunConfig.from_mapping({
        "task": "cxr-classify", "model": "densenet121", "labels": "label_nodule",
        "image-size": 32, "local-epochs": 2, "batch-size": 4, "learning-rate": 0.003,
        "val-fraction": 0.34, "threshold": 0.4,
    })
    spec = DataSpec(task=config.task, image_size=32, labels=config.labels)
    dataset = load_site_dataset(phantom_sites["hospital-b"], tmp_path, spec)
    assert dataset.targets.shape == (12, 1) and set(np.unique(dataset.targets)) <= {0.0, 1.0}
    algo = build_algo(config, dataset, torch.device("cpu"))
    assert isinstance(algo, ClassificationAlgo)
    result = algo.train(server_round=1, noise_multiplier=1.0)
    assert result.steps > 0 and np.isfinite(result.loss)
    evaluation = algo.evaluate()
    _, logits, targets = algo.predict()
    score = torch.sigmoid(logits)[:, 0].numpy()
    truth = targets[:, 0].numpy()
    positive = truth > 0.5
    if positive.any() and (~positive).any():
        assert evaluation.metrics["eval-auroc:label_nodule"] == pytest.approx(
            _rank_auroc(truth, score), abs=1e-6)
        assert evaluation.metrics["eval-auroc-macro"] == evaluation.metrics[
            "eval-auroc:label_nodule"]
    if positive.any():
        assert evaluation.metrics["eval-sensitivity:label_nodule"] == pytest.approx(
            ((score > 0.4) & positive).sum() / positive.sum())
    if (~positive).any():
        assert evaluation.metrics["eval-specificity:label_nodule"] == pytest.approx(
            ((score <= 0.4) & ~positive).sum() / (~positive).sum())


def test_classification_labels_must_exist_and_unlabelled_images_are_reported(
        phantom_sites, tmp_path) -> None:
    folder = tmp_path / "site"
    shutil.copytree(phantom_sites["hospital-a"], folder)
    lines = (folder / "labels.csv").read_text().splitlines()
    lines[1] = ",".join(lines[1].split(",")[:-1] + [""])  # one image without a label
    lines[2] = ",".join(lines[2].split(",")[:-1] + ["maybe"])  # one bad value
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    spec = DataSpec(task=RunConfig.from_mapping({"task": "cxr-classify", "model": "densenet121"})
                    .task, image_size=32, labels=("label_nodule",))
    dataset = load_site_dataset(folder, tmp_path / "work", spec)
    assert len(dataset.targets) == 10
    reasons = sorted(s.reason for s in dataset.skipped)
    assert reasons == ["labels.csv: a label is not 0 or 1",
                       "labels.csv: empty label (unlabelled image)"]
    from client.labels import LabelsError

    with pytest.raises(LabelsError, match=r"no column\(s\) \['label_covid'\]"):
        load_site_dataset(folder, tmp_path / "work", DataSpec(
            task=spec.task, image_size=32, labels=("label_covid",)))


def _ct_site(tmp_path):
    ct = shared_data() / "ct"
    if not ct.is_dir():
        pytest.skip(f"{ct} not found (set FEDRAD_SHARED_DATA)")
    site = tmp_path / "ct-site"
    site.mkdir()
    for name in ("example_ct_sm.nii.gz", "example_seg.nii.gz", "example_mr_sm.nii.gz",
                 "example_seg_mr.nii.gz"):
        os.symlink(ct / name, site / name)
    (site / "volumes.csv").write_text(
        "image,label_map,patient\n"
        "example_ct_sm.nii.gz,example_seg.nii.gz,ct-patient\n"
        "example_mr_sm.nii.gz,example_seg_mr.nii.gz,mr-patient\n"
        "missing.nii.gz,example_seg.nii.gz,ghost\n"
        "example_ct_sm.nii.gz,example_seg_mr.nii.gz,mismatch\n"
    )
    return site


def test_volume_dataset_from_the_shared_ct_and_mr(tmp_path) -> None:
    site = _ct_site(tmp_path)
    spec = DataSpec(task=RunConfig.from_mapping({"task": "volume-seg"}).task, image_size=24,
                    foreground=(5,))
    dataset = load_site_dataset(site, tmp_path / "work", spec)
    assert dataset.images.shape == (2, 1, 24, 24, 24)
    assert dataset.targets.shape == (2, 1, 24, 24, 24)
    assert 0.0 <= dataset.images.min() and dataset.images.max() <= 1.0
    assert all(0.005 < mask.mean() < 0.5 for mask in dataset.targets)  # an organ, not all
    assert [s.file for s in dataset.skipped] == ["volumes.csv:4", "volumes.csv:5"]
    assert "cannot be read" in dataset.skipped[0].reason
    assert "label map is (20, 91, 117), image is (30, 101, 122)" in dataset.skipped[1].reason
    again = load_site_dataset(site, tmp_path / "work", spec)
    assert again.content_hash == dataset.content_hash
    with pytest.raises(DatasetError, match="none of the foreground values"):
        load_site_dataset(site, tmp_path / "work", DataSpec(task=spec.task, image_size=24,
                                                            foreground=(250,)))


@pytest.mark.parametrize("model", ["unet", "segresnet"])
def test_3d_segmentation_trains_with_dp(model, tmp_path) -> None:
    torch.set_num_threads(2)
    site = _ct_site(tmp_path)
    config = RunConfig.from_mapping({"task": "volume-seg", "model": model, "image-size": 16,
                                     "foreground": "5", "batch-size": 1, "val-fraction": 0.5,
                                     "learning-rate": 0.01, "local-epochs": 2})
    dataset = load_site_dataset(site, tmp_path / "work", DataSpec(
        task=config.task, image_size=16, foreground=config.foreground))
    algo = build_algo(config, dataset, torch.device("cpu"))
    assert isinstance(algo, SegmentationAlgo)
    result = algo.train(server_round=1, noise_multiplier=0.5)
    assert result.steps >= 2 and np.isfinite(result.loss)
    metrics = algo.evaluate().metrics
    assert 0.0 <= metrics["eval-dice"] <= 1.0


def test_init_weights_from_a_local_file_for_transfer_learning(tmp_path) -> None:
    """Backbone tensors load by name and shape; a head for other labels keeps its init;
    a file for another model is refused by name."""
    from common.models import ModelError, build_model, load_pretrained

    three = RunConfig.from_mapping({"task": "cxr-classify", "model": "densenet121",
                                    "labels": "a,b,c", "seed": 1})
    source = build_model(three)
    torch.save({f"_module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "w.pt")
    one = RunConfig.from_mapping({"task": "cxr-classify", "model": "densenet121",
                                  "labels": "label_covid", "seed": 2})
    target = build_model(one)
    head = {k: v.clone() for k, v in target.state_dict().items() if k.startswith("class_layers")}
    load_pretrained(target, tmp_path / "w.pt")
    state, reference = target.state_dict(), source.state_dict()
    backbone = [k for k in state if k.startswith("features")]
    assert backbone and all(torch.equal(state[k], reference[k]) for k in backbone)
    assert all(torch.equal(state[k], v) for k, v in head.items())  # other shape: untouched
    torch.save(build_model(RunConfig.from_mapping({})).state_dict(), tmp_path / "unet.pt")
    with pytest.raises(ModelError, match="no tensor matches"):
        load_pretrained(target, tmp_path / "unet.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot be read as a PyTorch state dict"):
        load_pretrained(target, tmp_path / "junk.pt")
