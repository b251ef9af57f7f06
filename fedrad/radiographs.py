"""Phantom radiographs for a prior that costs no privacy (`fedrad pretrain`).

fedrad.phantoms' `chest_phantom` draws the demo's hospitals: small dark lungs in an oval
body on black, easy to learn and quick to train on. A prior trained on it transfers
poorly to real radiographs (Dice 0.60 on the real CXR sites, bench/RESULTS.md). Real PA
chest films differ from it in ways a segmentation network keys on, and `radiograph`
draws those:

- framing: the chest fills the film (body wider than the image, shoulders at the top);
- lungs that fill most of the chest, narrow at the apex and widest at the base, with
  the heart bulging into the left lung down to the diaphragm;
- lung texture: vessels brighter towards the hila, ribs crossing the lung fields;
- opacities (consolidation, ground glass) inside the lungs, often basal: part of the
  lung in the mask, as in a manual lung mask of a COVID-19 film;
- devices and labels (ECG leads, wires, a side marker), soft edges (blur), exposure,
  gamma and noise per image.

Geometry is in units of the image side; every draw comes from `rng`, so a seed gives
the same films. No pixel or statistic of any site is computed into it: the shapes are
textbook anatomy, drawn by eye against the public benchmark films of ../shared/data/cxr,
and the generator was compared once on that benchmark's validation patients
(bench/RESULTS.md, eleventh session), which a consortium should not do on its own.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import GaussianSmooth

from fedrad.phantoms import posed_grid

ANATOMY = "radiograph/1"  # recorded in a prior's provenance and its cache key


def _smooth(image: np.ndarray, sigma: float) -> np.ndarray:
    out = GaussianSmooth(sigma=sigma)(torch.from_numpy(image[None].astype(np.float32)))
    return np.asarray(out[0], dtype=np.float32)


def _texture(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """A smooth random field scaled to [-1, 1]."""
    field = _smooth(rng.normal(0.0, 1.0, (size, size)), sigma)
    return field / (np.abs(field).max() + 1e-6)


def _lungs(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, top: float,
           bottom: float) -> np.ndarray:
    """Both lung fields: narrow apex, convex lateral border, domed base (the left
    hemidiaphragm, image right, a little higher)."""
    lungs = np.zeros(yy.shape, dtype=bool)
    for side in (-1, 1):  # -1: the patient's right lung, image left
        inner = 0.5 + side * rng.uniform(0.04, 0.08)
        width = rng.uniform(0.28, 0.40)
        base = bottom + rng.uniform(-0.04, 0.04) + (0.03 if side < 0 else 0.0)
        depth = np.clip((yy - top) / (base - top), 0, 1)
        lateral = inner + side * width * np.sqrt(depth) * rng.uniform(0.9, 1.05)
        inside = (yy > top) & (side * (xx - inner) > 0) & (side * (xx - lateral) < 0)
        dome = base - rng.uniform(0.04, 0.10) * np.clip(
            1 - side * (xx - inner) / width, 0, 1) ** 2
        lungs |= inside & (yy < dome)
    return lungs


def _devices(rng: np.random.Generator, image: np.ndarray, yy: np.ndarray,
             xx: np.ndarray) -> None:
    """ECG electrodes, lead wires and a side marker, drawn into `image`."""
    for _ in range(int(rng.integers(0, 6))):
        cy, cx = rng.uniform(0.05, 0.95, 2)
        radius = rng.uniform(0.008, 0.025)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < radius**2] = rng.uniform(0.8, 1.0)
    for _ in range(int(rng.integers(0, 3))):
        a, b, c = rng.uniform(-1, 1, 3)
        wire = 0.5 + 0.4 * a * (xx - 0.5) + b * (xx - 0.5) ** 2 + 0.2 * c
        image[np.abs(yy - wire) < 0.004] = 0.9
    if rng.random() < 0.5:
        cy = rng.uniform(0.02, 0.2)
        cx = rng.uniform(0.02, 0.2) if rng.random() < 0.5 else rng.uniform(0.8, 0.98)
        image[(np.abs(yy - cy) < 0.025) & (np.abs(xx - cx) < 0.05)] = 1.0


def radiograph(rng: np.random.Generator, size: int, nodule: bool) -> tuple[
    np.ndarray, np.ndarray
]:
    """One PA chest film in [0, 1] (brighter = denser) and its lung mask (uint8); with
    `nodule` a round opacity inside a lung (lung in the mask)."""
    yy, xx = posed_grid(rng, size, degrees=8, scales=(0.85, 1.15), shift=0.06)
    half_width = rng.uniform(0.46, 0.62)
    shoulders = np.sqrt(np.clip(1 - ((yy - 0.6) / 0.75) ** 2, 0, 1))
    body = (np.abs(xx - 0.5) < half_width * shoulders) & (yy > rng.uniform(-0.1, 0.08))
    level = rng.uniform(0.45, 0.65)
    image = np.where(body, level, rng.uniform(0.0, 0.08)).astype(np.float32)
    image += body * rng.uniform(0.05, 0.2) * np.clip(np.abs(xx - 0.5) / half_width, 0, 1) ** 2
    top, bottom = rng.uniform(0.08, 0.18), rng.uniform(0.68, 0.82)
    lungs = _lungs(rng, yy, xx, top, bottom)
    heart_x, heart_y = 0.5 + rng.uniform(0.03, 0.09), bottom - rng.uniform(0.02, 0.10)
    heart = ((xx - heart_x) / rng.uniform(0.15, 0.22)) ** 2 + \
        ((yy - heart_y) / rng.uniform(0.14, 0.20)) ** 2 <= 1
    mediastinum = (np.abs(xx - 0.5) < rng.uniform(0.05, 0.08)) & body
    lungs &= ~heart & ~mediastinum
    air = level - rng.uniform(0.2, 0.4) + 0.06 * _texture(rng, size, size / 40) \
        + 0.04 * _texture(rng, size, size / 12)
    air += rng.uniform(0.0, 0.12) * np.clip(1 - np.abs(xx - 0.5) / 0.35, 0, 1)  # hila
    image = np.where(lungs, air, image)
    if rng.random() < 0.7:  # consolidation / ground glass, basal more often than not
        patches = _texture(rng, size, size / rng.uniform(8, 20))
        cut = rng.uniform(0.1, 0.6)
        density = np.clip((patches - cut) / (1 - cut), 0, 1) * rng.uniform(0.15, 0.45)
        if rng.random() < 0.7:
            density *= 0.4 + 0.6 * np.clip((yy - top) / (bottom - top), 0, 1)
        image += lungs * density
    if nodule and lungs.any():
        ys, xs = np.nonzero(lungs)
        pick = int(rng.integers(len(ys)))
        radius = rng.uniform(0.02, 0.045) * size
        blob = (np.arange(size)[:, None] - ys[pick]) ** 2 + \
            (np.arange(size)[None, :] - xs[pick]) ** 2 <= radius**2
        image[blob & lungs] += rng.uniform(0.15, 0.3)
    image[heart & body] = np.maximum(image[heart & body], level + rng.uniform(0.0, 0.15))
    image[mediastinum] = level + rng.uniform(0.05, 0.2)
    belly = body & (yy > bottom - 0.05) & ~lungs
    image[belly] = np.maximum(image[belly], level + rng.uniform(0.0, 0.12))
    ribs = yy + rng.uniform(0.2, 0.5) * (xx - 0.5) ** 2 - 0.08 * np.abs(xx - 0.5)
    ribs = np.clip(np.sin(ribs * np.pi * rng.uniform(10, 16) + rng.uniform(0, 2 * np.pi))
                   * 1.6 - 0.6, 0, 1)
    image += rng.uniform(0.06, 0.2) * ribs * body * (np.abs(xx - 0.5) > 0.05)
    clavicles = np.abs(yy - (top + rng.uniform(-0.02, 0.05)
                             + 0.3 * (np.abs(xx - 0.5) - 0.15) ** 2)) < 0.015
    image += rng.uniform(0.08, 0.2) * (clavicles & (np.abs(xx - 0.5) < 0.35))
    _devices(rng, image, yy, xx)
    image = _smooth(image, rng.uniform(0.5, 1.5) * size / 128)
    image = np.clip(image * rng.uniform(0.8, 1.2) + rng.uniform(-0.1, 0.1), 0, 1) \
        ** rng.uniform(0.7, 1.4)
    image = image + rng.normal(0, rng.uniform(0.005, 0.03), image.shape)
    return np.clip(image, 0, 1).astype(np.float32), lungs.astype(np.uint8)
