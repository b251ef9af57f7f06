"""`fedrad models export --format monai-bundle`: a global model as a MONAI bundle, the
format MONAI Deploy and the MONAI model zoo load.

  configs/metadata.json   the bundle specification's keys (versions, task, description,
                          network_data_format: modality, channels, spatial shape, value
                          range, channel definitions), `not_for_clinical_use`, and under
                          "fedrad" the model's provenance (run, round, sites counted, ε per
                          site, metrics; fedrad.model_registry.describe)
  configs/inference.json  `python -m monai.bundle run --config_file configs/inference.json
                          --input_file IMAGE.dcm --output_file OUT.npy`, from the bundle
                          folder: reads one DICOM projection image, feeds it as the sites
                          did, writes the sigmoid output (and the mask, for segmentation)
  models/model.pt         the state dict, for `network_def`
  models/model.ts         TorchScript with the metadata embedded (MONAI's
                          save_net_with_metadata), what MONAI Deploy loads
  scripts/                fedrad's intensity rule (client/intensity.py, copied as is) and
                          a MONAI transform that applies it to a DICOM file
  configs/manifest.json   sha256 of every file above; configs/manifest.sig is the
                          consortium's Ed25519 signature over it (`verify_bundle`)

A bundle runs with MONAI, PyTorch and pydicom alone: nothing of fedrad is imported.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import monai
import numpy as np
import pydicom
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

import client.intensity
from common.config import RunConfig, Task
from common.models import build_model
from fedrad.model_registry import ModelRegistryError, describe, resolve, signed_text

MANIFEST, SIGNATURE = "configs/manifest.json", "configs/manifest.sig"
TRANSFORM = '''"""MONAI transform: a DICOM projection image (CR/DX) as fedrad's sites feed it."""

import numpy as np
import pydicom
import torch
from monai.transforms import MapTransform

from .intensity import dataset_unit_range


class LoadProjectiond(MapTransform):
    """Read the DICOM file at d[key]: (1, rows, columns) float32 in [0, 1]."""

    def __init__(self, keys, voi_window=False):
        super().__init__(keys)
        self.voi_window = voi_window

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            image = dataset_unit_range(pydicom.dcmread(d[key]), voi_window=self.voi_window)
            d[key] = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
        return d
'''


def _tensor(kind: str, fmt: str, channels: dict[int, str], size: int, value_range: list
            ) -> dict[str, Any]:
    return {"type": kind, "format": fmt, "modality": "CR/DX", "num_channels": len(channels),
            "spatial_shape": [size, size], "dtype": "float32", "value_range": value_range,
            "is_patch_data": False, "channel_def": {str(k): v for k, v in channels.items()}}


def metadata(description: dict[str, Any], config: RunConfig, *, clinical_use: bool
             ) -> dict[str, Any]:
    """The bundle specification's metadata.json for one described model."""
    size = config.image_size
    segmentation = config.task is Task.LUNG_SEG
    output = (_tensor("image", "segmentation", {0: "lung (sigmoid probability)"}, size, [0, 1])
              if segmentation else
              {**_tensor("probabilities", "classes", dict(enumerate(config.labels)), size,
                         [0, 1]), "spatial_shape": []})
    what = ("lung segmentation of chest radiographs" if segmentation else
            "chest radiograph findings: " + ", ".join(config.labels))
    epsilons = description["dp"]["epsilon_per_site"]
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
                  "0.8.1/meta_schema_20220324.json",
        "version": f"{description['run_id']}.{description['round']}",
        "changelog": {f"{description['run_id']}.{description['round']}":
                      f"fedrad model {description['name']}"},
        "monai_version": monai.__version__, "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "optional_packages_version": {"pydicom": pydicom.__version__},
        "required_packages_version": {"pydicom": pydicom.__version__},
        "name": f"fedrad {config.task.value} {description['name']}",
        "task": what,
        "description": (f"Trained by federated learning (fedrad, {description['strategy']}) "
                        f"across {len(description['sites'])} sites, round "
                        f"{description['round']} of run {description['run_id']}; "
                        + (f"differential privacy at ε {sorted(set(epsilons.values()))} per "
                           "site" if epsilons else "no differential privacy")),
        "authors": "the consortium that trained it with fedrad",
        "copyright": "the consortium's members",
        "data_source": f"the private archives of {len(description['sites'])} hospitals; no "
                       "image left its hospital",
        "data_type": "dicom",
        "image_classes": "one channel, Modality LUT applied, scaled to [0, 1] over the range "
                         "BitsStored allows (or the VOI window), MONOCHROME1 inverted, "
                         f"area-resized to {size} x {size}",
        "pred_classes": output["channel_def"],
        "intended_use": ("research only; not for clinical use" if not clinical_use else
                         "as the consortium's clinical validation states"),
        "not_for_clinical_use": not clinical_use,
        "eval_metrics": {str(description["metrics"]["score_metric"]):
                         description["metrics"]["pooled_score"]},
        "network_data_format": {
            "inputs": {"image": _tensor("image", "magnitude", {0: "image"}, size, [0, 1])},
            "outputs": {"pred": output}},
        "fedrad": description,
    }


def inference(config: RunConfig, architecture: dict[str, Any]) -> dict[str, Any]:
    """configs/inference.json: one DICOM file in, the model's output as a .npy out."""
    post: list[dict[str, Any]] = [{"_target_": "Activations", "sigmoid": True}]
    return {
        "imports": ["$import numpy", "$import torch", "$import scripts.projection"],
        "bundle_root": ".",
        "device": "$torch.device('cpu')",
        "input_file": "",
        "output_file": "prediction.npy",
        "threshold": config.threshold,
        "network_def": {"_target_": architecture["class"], **architecture["kwargs"]},
        "network": "$torch.jit.load(@bundle_root + '/models/model.ts', "
                   "map_location=@device).eval()",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "scripts.projection.LoadProjectiond", "keys": "image",
             "voi_window": config.voi_window},
            {"_target_": "Resized", "keys": "image",
             "spatial_size": [config.image_size, config.image_size], "mode": "area"}]},
        "postprocessing": {"_target_": "Compose", "transforms": post},
        "predict": "$lambda d: @postprocessing(@network(d['image'][None].float())[0]"
                   ".detach())",
        "run": ["$numpy.save(@output_file, "
                "@predict(@preprocessing({'image': @input_file})).numpy())"],
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_bundle(home: Path, name: str, out: Path, signing_key: Ed25519PrivateKey, *,
                  clinical_use: bool = False) -> Path:
    """Write the bundle of model `name` (RUN, RUN:ROUND, RUN:best) into `out`."""
    from monai.data import save_net_with_metadata

    run, ref = resolve(home, name)
    if out.exists() and any(out.iterdir()):
        raise ModelRegistryError(f"{out} is not empty; choose a new --out folder")
    config = RunConfig.from_mapping(run.read_json("config.json"))
    if config.task is Task.VOLUME_SEG:
        raise ModelRegistryError("a MONAI bundle export reads DICOM projection images (CR/DX);"
                                 f" model {name} is for 3D volumes: export --format fedrad")
    state = run.load_checkpoint(ref.server_round)  # checks the registry's sha256
    network = build_model(config)
    network.load_state_dict(state)
    network.eval()
    description = describe(run, ref)
    meta = metadata(description, config, clinical_use=clinical_use)
    for folder in ("configs", "models", "scripts"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    torch.save(dict(state), out / "models" / "model.pt")
    example = torch.zeros(1, 1, config.image_size, config.image_size)
    with torch.no_grad():
        traced = torch.jit.trace(network, example)
    save_net_with_metadata(traced, str(out / "models" / "model"), include_config_vals=False,
                           append_timestamp=False, meta_values=meta)
    (out / "configs" / "metadata.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    (out / "configs" / "inference.json").write_text(
        json.dumps(inference(config, description["architecture"]), indent=1))
    shutil.copyfile(Path(client.intensity.__file__), out / "scripts" / "intensity.py")
    (out / "scripts" / "projection.py").write_text(TRANSFORM)
    (out / "scripts" / "__init__.py").write_text("")
    files = sorted(p for p in out.rglob("*") if p.is_file())
    manifest = json.dumps({str(p.relative_to(out)): _sha256(p) for p in files}, indent=1,
                          sort_keys=True)
    (out / MANIFEST).write_text(manifest)
    signature = signing_key.sign(manifest.encode())
    (out / SIGNATURE).write_text(base64.urlsafe_b64encode(signature).decode() + "\n")
    return out


def verify_bundle(folder: Path, verify_key: Ed25519PublicKey) -> dict[str, Any]:
    """The bundle's metadata, once its signature and every file's sha256 check out."""
    text = signed_text(folder, MANIFEST, SIGNATURE, verify_key, "bundle")
    listed: dict[str, str] = json.loads(text)
    present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()
               and "__pycache__" not in p.parts} - {MANIFEST, SIGNATURE}
    changed = sorted(n for n, digest in listed.items()
                     if not (folder / n).is_file() or _sha256(folder / n) != digest)
    added = sorted(present - set(listed))
    if changed or added:
        raise ModelRegistryError(f"{folder}: files differ from the signed manifest (changed "
                                 f"or missing {changed}, not signed {added}); do not use it")
    meta: dict[str, Any] = json.loads((folder / "configs" / "metadata.json").read_text())
    return meta
