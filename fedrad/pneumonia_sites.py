"""PneumoniaMNIST as three DICOM hospitals: a classification task with enough data.

`../shared/data/pneumoniamnist/pneumoniamnist.npz` holds real paediatric chest X-rays
(28 px, label 1 = pneumonia) in MedMNIST's train / val / test splits. `write_sites` turns
them into three hospital exports that differ as the CXR sites do (folder layout,
MONOCHROME1, 8/12/10 bits, RLE, implicit VR: fedrad.phantoms' SITE_STYLES) and are
non-IID on purpose: different sizes and class balances per site (`SHARES`).

- `<out>/train/<site>/`: the site's training export, drawn from MedMNIST's train and val
  splits (a site holds out its own validation patients from it, as every site does);
- `<out>/test/<site>/`: held-out test images from MedMNIST's test split only, for
  `fedrad evaluate` and reports; never trained on.

MedMNIST has no patient ids, so each image is its own synthetic patient (PatientID
`CANARY-...`, PatientName `...^ZZCANARY`, as every test dataset here); ids are unique
across splits and sites, so no patient is in two splits or two sites. labels.csv holds
`label_pneumonia` keyed by SOPInstanceUID.

Usage: python -m fedrad.pneumonia_sites --npz FILE --out DIR [--limit N]
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from fedrad.phantoms import SITE_STYLES, UID_PREFIX, SiteStyle, export_paths, image_dataset

LABEL = "label_pneumonia"
# Share of MedMNIST's (normal, pneumonia) training images each site gets: a large
# site with the most normals, a larger one that is nearly all pneumonia, a small one.
SHARES = {"hospital-a": (0.50, 0.20), "hospital-b": (0.20, 0.60), "hospital-c": (0.30, 0.20)}
SPLITS = ("train", "test")


class PneumoniaDataError(ValueError):
    """The .npz is not PneumoniaMNIST as expected; the message names what is missing."""


def load_npz(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (images uint8 (N, 28, 28), labels (N,))} for train, val and test."""
    try:
        data = np.load(path)  # allow_pickle stays False: arrays only
        out = {split: (np.asarray(data[f"{split}_images"]),
                       np.asarray(data[f"{split}_labels"]).reshape(-1))
               for split in ("train", "val", "test")}
    except (OSError, KeyError, ValueError) as exc:
        raise PneumoniaDataError(f"{path}: expected PneumoniaMNIST's train/val/test_images "
                                 f"and _labels arrays ({exc})") from exc
    for split, (images, labels) in out.items():
        if images.ndim != 3 or len(images) != len(labels) or not set(np.unique(labels)) <= {
                0, 1}:
            raise PneumoniaDataError(f"{path}: {split} split: expected (N, H, W) images and "
                                     "N labels in {0, 1}")
    return out


def assign(labels: np.ndarray, shares: dict[str, tuple[float, float]],
           rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Indices of `labels` for each site: per class, shuffled, cut by the site's share."""
    out: dict[str, list[np.ndarray]] = {site: [] for site in shares}
    for cls in (0, 1):
        members = rng.permutation(np.nonzero(labels == cls)[0])
        cuts = np.cumsum([0.0] + [share[cls] for share in shares.values()])
        cuts = np.round(cuts / cuts[-1] * len(members)).astype(int)
        for (site, _), lo, hi in zip(shares.items(), cuts[:-1], cuts[1:], strict=True):
            out[site].append(members[lo:hi])
    return {site: np.sort(np.concatenate(parts)) for site, parts in out.items()}


def _write(root: Path, style: SiteStyle, images: np.ndarray, labels: np.ndarray,
           rng: np.random.Generator, prefix: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for seq, (pixels, label) in enumerate(zip(images, labels, strict=True), start=1):
        birth = dt.date(2012, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 5)))
        patient = {"name": f"CHILD^{prefix}{seq:05d}^ZZCANARY",
                   "id": f"CANARY-{prefix}{seq:05d}",
                   "birth": birth.strftime("%Y%m%d"), "sex": "FM"[int(rng.integers(2))],
                   "study_date": (dt.date(2018, 1, 1) + dt.timedelta(
                       days=int(rng.integers(0, 365)))).strftime("%Y%m%d")}
        image = image_dataset(style, rng, patient, pixels.astype(np.float32) / 255.0,
                               generate_uid(prefix=UID_PREFIX), seq)
        path, _ = export_paths(style, root, image, seq)
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save_as(path, enforce_file_format=True)
        rows.append({"sop_instance_uid": str(image.SOPInstanceUID),
                     "accession_number": str(image.AccessionNumber), LABEL: str(int(label))})
    with (root / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_sites(npz: Path, out: Path, *, limit: int = 0, seed: int = 0
                ) -> dict[str, dict[str, Path]]:
    """Write {split: {site: folder}}; `limit` > 0 keeps that many images per site and
    split (tests), a random subset of it."""
    data = load_npz(npz)
    rng = np.random.default_rng(seed)
    styles = {style.name: style for style in SITE_STYLES}
    train_images = np.concatenate([data["train"][0], data["val"][0]])
    train_labels = np.concatenate([data["train"][1], data["val"][1]])
    test_images, test_labels = data["test"]
    even = {site: (1.0, 1.0) for site in SHARES}  # the test split: a third each
    picked = {"train": (train_images, train_labels, assign(train_labels, SHARES, rng)),
              "test": (test_images, test_labels, assign(test_labels, even, rng))}
    folders: dict[str, dict[str, Path]] = {split: {} for split in SPLITS}
    for split, (images, labels, by_site) in picked.items():
        for number, (site, index) in enumerate(by_site.items()):
            if limit:
                index = np.sort(rng.permutation(index)[:limit])
            prefix = f"{'TR' if split == 'train' else 'TE'}{'ABC'[number]}"
            folder = out / split / site
            _write(folder, styles[site], images[index], labels[index], rng, prefix)
            folders[split][site] = folder
    return folders


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--npz", type=Path, required=True, help="pneumoniamnist.npz")
    parser.add_argument("--out", type=Path, required=True, help="a new folder")
    parser.add_argument("--limit", type=int, default=0, help="images per site and split")
    args = parser.parse_args(argv)
    for split, sites in write_sites(args.npz, args.out, limit=args.limit).items():
        for site, folder in sites.items():
            count = sum(1 for p in folder.rglob("*") if p.is_file()) - 1
            print(f"{split}/{site}: {count} images in {folder}")


if __name__ == "__main__":
    main()
