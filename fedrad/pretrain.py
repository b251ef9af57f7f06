"""`fedrad pretrain`: a prior for a run's model that costs no hospital any privacy.

The coordinator trains the run config's model centrally, without DP, on data that is no
hospital's patients: the project's phantom radiographs (fedrad.radiographs, written as
three hospitals by fedrad.phantoms; lung-seg), or a folder of site folders the
consortium may pool (public data, e.g. PneumoniaMNIST written by fedrad.pneumonia_sites).
The best epoch on that data's own held-out part is written as a plain state dict (what
`init-weights` loads) with a provenance file beside it:

  <out>        the state dict (torch.save; torch.load(..., weights_only=True))
  <out>.json   what it is: the architecture (MONAI class and arguments), the data it saw,
               epochs, the held-out score, the state dict's sha256, the fedrad version

A run whose `init-weights` names such a file refuses it when the provenance names another
architecture, and records the provenance in its registry.json. Nothing downloads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from common import keys
from common.config import (
    PHANTOM_PRIOR,
    AugmentConfig,
    Intensity,
    RunConfig,
    Task,
    Trainable,
)
from common.models import architecture, provenance_path
from common.weights import from_arrays, plain_state_dict
from fedrad.in_memory import load_sites, train_pooled

PROVENANCE_FORMAT = "fedrad-prior/1"


class PretrainError(ValueError):
    """A prior that cannot be made for this config; the message says what to do."""


def randomised(settings: AugmentConfig) -> AugmentConfig:
    """Domain randomisation for a prior: every image augmented, a wider affine (15°, 15 %
    scale, 10 % shift, or the config's if wider) and strong intensity (gamma, blur, noise,
    contrast; client.augmentation). Measured once on the real CXR sites (bench/RESULTS.md,
    tenth session, on the demo's phantoms): the prior alone scored Dice 0.51 with the
    recipe's mild augmentation, 0.56 with strong intensity, 0.62 with both."""
    return dataclasses.replace(settings, enabled=True, probability=1.0,
                               rotation=max(settings.rotation, 15.0),
                               scale=max(settings.scale, 0.15),
                               shift=max(settings.shift, 0.1), intensity=Intensity.STRONG)


def pretrain(config: RunConfig, out: Path, *, data: Path | None, patients: int,
             epochs: int, randomise: bool = True, say: Any = print) -> dict[str, Any]:
    """Train `config`'s model on phantoms (data=None) or on `data`'s site folders; write
    the best epoch's state dict to `out` and its provenance; return the provenance.
    `randomise` (default): domain randomisation (`randomised`), which a phantom-trained
    prior needs to transfer to real radiographs; else the config's own augmentation."""
    if out.exists():
        raise PretrainError(f"{out} exists; choose a new --out file")
    if data is None and config.task is not Task.LUNG_SEG:
        raise PretrainError(f"the built-in phantoms have lung masks only (task lung-seg); "
                            f"for task {config.task.value} pass --data with site folders "
                            "of data the consortium may pool")
    central = dataclasses.replace(
        config, dp=dataclasses.replace(config.dp, enabled=False,
                                       trainable=Trainable.ALL),
        augment=randomised(config.augment) if randomise else config.augment,
        init_weights="")
    with tempfile.TemporaryDirectory(prefix="fedrad-pretrain-") as scratch:
        if data is None:
            from fedrad.phantoms import write_consortium
            from fedrad.radiographs import ANATOMY, radiograph

            data = Path(scratch) / "phantoms"
            say(f"generating {patients} phantom patients x 2 radiographs x 3 hospitals")
            write_consortium(data, patients=patients, images_per_patient=2, seed=1234,
                             anatomy=radiograph)
            source = {"kind": "fedrad phantoms", "anatomy": ANATOMY,
                      "patients_per_site": patients, "seed": 1234}
        else:
            source = {"kind": "pooled site folders", "folder": data.name}
        sites = load_sites(central, data, Path(scratch) / "cache")
        source["images"] = sum(a.num_train + len(a.val_set) for a in sites.values())
        curve = train_pooled(central, sites, epochs,
                             lambda e, s: say(f"epoch {e}/{epochs}: held-out "
                                              f"{keys.headline_metric(config.task)} {s:.3f}"))
    template = plain_state_dict(next(iter(sites.values())).model)
    state = from_arrays(template, curve.best_weights)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(state), out)
    network, kwargs = architecture(config)
    provenance = {
        "format": PROVENANCE_FORMAT,
        "architecture": {"class": f"{network.__module__}.{network.__name__}",
                         "kwargs": kwargs},
        "task": config.task.value, "image_size": config.image_size,
        "data": source, "epochs": epochs, "best_epoch": curve.best_round,
        "augment": {k: v.value if isinstance(v, Intensity) else v
                    for k, v in dataclasses.asdict(central.augment).items()},
        "held_out": {"metric": keys.headline_metric(config.task), "score": curve.best},
        "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
        "privacy": "no hospital data: no DP needed, no ε spent",
    }
    provenance_path(out).write_text(json.dumps(provenance, indent=1, sort_keys=True))
    return provenance


PRIOR_PATIENTS, PRIOR_EPOCHS = 60, 8  # what bench/dp_utility.py measured the prior with


def resolve_prior(values: dict[str, Any], folder: Path, *, patients: int = PRIOR_PATIENTS,
                  epochs: int = PRIOR_EPOCHS, say: Any = print) -> dict[str, Any]:
    """`init-weights = "phantom-prior"` in a run config: the config's model pretrained
    on phantoms with domain randomisation (`pretrain`), made once per architecture, image
    size and task in `folder` (the server home's priors/) and reused, so a shipped config
    can start from a prior that costs no hospital any privacy. Other values pass as they
    are. Returns the values with init-weights set to the file."""
    if values.get("init-weights") != PHANTOM_PRIOR:
        return values
    config = RunConfig.from_mapping({**values, "init-weights": ""})
    network, kwargs = architecture(config)
    from fedrad.radiographs import ANATOMY

    key = json.dumps([f"{network.__module__}.{network.__name__}", kwargs, config.task.value,
                      config.image_size, patients, epochs, ANATOMY], sort_keys=True,
                     default=str)
    path = folder / f"phantom-prior-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    if not path.exists():
        say(f"init-weights = \"{PHANTOM_PRIOR}\": pretraining {path.name} on phantoms "
            f"({patients} patients x 3 hospitals, {epochs} epochs; once per architecture)")
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as scratch:  # complete files or none
            made = Path(scratch) / path.name
            pretrain(config, made, data=None, patients=patients, epochs=epochs, say=say)
            provenance_path(made).replace(provenance_path(path))
            made.replace(path)
    return {**values, "init-weights": str(path)}
