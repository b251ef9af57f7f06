"""`fedrad models ...`: the global models every run folder holds, and their export.

A model is named `RUN` (the run's last checkpoint), `RUN:ROUND`, or `RUN:best` (the round
with the best pooled validation score, tagged by the ServerApp as the run goes). Export verifies the
checkpoint against the sha256 in the run's registry.json, decrypts it, and writes:

  model.pt     a plain PyTorch state dict (torch.load(..., weights_only=True))
  model.json   what it is and how to feed it: the MONAI class and its arguments, the
               preprocessing (image size, intensity scaling, VOI window), labels,
               threshold, the run, round, metrics and ε per site; model.pt's sha256
  model.sig    the consortium's Ed25519 signature over model.json (which holds the
               sha256 of model.pt), checked by `fedrad predict` before any use

Loading needs MONAI and PyTorch only (see `load_exported`, which imports neither fedrad
package nor anything of the run).
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from common.config import RunConfig, Task
from common.models import architecture
from server.registry import RunFolder

FORMAT = "fedrad-model/1"
BEST = "best"  # RUN:best


class ModelRegistryError(LookupError):
    """No such model, or a model file that does not verify."""


@dataclass(frozen=True)
class ModelRef:
    run_id: str
    server_round: int

    @property
    def name(self) -> str:
        return f"{self.run_id}:{self.server_round}"


def resolve(home: Path, name: str) -> tuple[RunFolder, ModelRef]:
    """`RUN`, `RUN:ROUND` or `RUN:best` → the run folder and the checkpoint meant."""
    run_id, _, round_text = name.partition(":")
    try:
        run = RunFolder.open(home, run_id)
    except LookupError as exc:
        raise ModelRegistryError(str(exc)) from exc
    registry = run.read_json("registry.json")
    rounds = sorted(int(r) for r in registry["checkpoints"])
    if not rounds:
        raise ModelRegistryError(f"run {run_id} has no checkpoint yet")
    if not round_text:
        return run, ModelRef(run_id, rounds[-1])
    if round_text == BEST:
        if "best" not in registry:
            raise ModelRegistryError(f"run {run_id} has no evaluated round yet, so no best "
                                     f"model; name a round (it has rounds {rounds})")
        return run, ModelRef(run_id, int(registry["best"]["round"]))
    if not round_text.isdigit() or int(round_text) not in rounds:
        raise ModelRegistryError(f"run {run_id} has no checkpoint for round {round_text!r}; "
                                 f"it has rounds {rounds} (or name {run_id}:best)")
    return run, ModelRef(run_id, int(round_text))


def _round_row(run: RunFolder, server_round: int) -> dict[str, Any]:
    return next((r for r in run.rounds() if r["server_round"] == server_round), {})


def describe(run: RunFolder, ref: ModelRef) -> dict[str, Any]:
    """Everything known of one global model (no data, no PHI: config and numbers)."""
    flat = run.read_json("config.json")
    config = RunConfig.from_mapping(flat)
    registry = run.read_json("registry.json")
    row = _round_row(run, ref.server_round)
    network, kwargs = architecture(config)
    return {
        "format": FORMAT,
        "name": ref.name,
        "run_id": ref.run_id,
        "round": ref.server_round,
        "run_status": registry["status"],
        "best_round": registry.get("best", {}).get("round"),
        "pooled_baseline": registry.get("pooled_baseline"),
        "init_weights": registry.get("init_weights"),
        "checkpoint_sha256": registry["checkpoints"][str(ref.server_round)]["sha256"],
        "task": config.task.value,
        "run_config": flat,  # the whole typed config, flat (settings only, no data)
        "architecture": {"class": f"{network.__module__}.{network.__name__}",
                         "kwargs": kwargs},
        "preprocessing": {
            "input": "one grayscale channel" + (", 3D volume (D, H, W)"
                                                 if config.task is Task.VOLUME_SEG else ""),
            "image_size": config.image_size,
            "intensity": "Modality LUT (RescaleSlope/Intercept) applied, then scaled to "
                         "[0, 1] over " + ("the image's VOI window (WindowCenter/Width, "
                                           "linear), else " if config.voi_window else "")
                         + "the range BitsStored allows; MONOCHROME1 inverted; clipped",
            "resize": "area averaging to image_size x image_size",
        },
        "output": ({"kind": "sigmoid per label", "labels": list(config.labels)}
                   if config.task is Task.CXR_CLASSIFY else
                   {"kind": "sigmoid foreground probability",
                    "foreground_values": list(config.foreground)}),
        "threshold": config.threshold,
        "strategy": config.strategy.name.value,
        "dp": {"enabled": config.dp.enabled, "target_epsilon": config.dp.target_epsilon,
               "epsilon_per_site": {s: v["train"]["epsilon-total"]
                                    for s, v in row.get("sites", {}).items()
                                    if "epsilon-total" in v["train"]}},
        "secagg": config.secagg.enabled,
        "metrics": {"score_metric": row.get("score_metric"),
                    "pooled_score": row.get("pooled_score"),
                    "per_site": {s: v["evaluation"] for s, v in row.get("sites", {}).items()}},
        "sites": sorted(row.get("sites", {})),
    }


def list_models(home: Path, *, all_rounds: bool = False) -> list[dict[str, Any]]:
    out = []
    for run in RunFolder.all(home):
        registry = run.read_json("registry.json")
        rounds = sorted(int(r) for r in registry["checkpoints"])
        config = run.read_json("config.json")
        best = registry.get("best", {}).get("round")
        shown = rounds if all_rounds else sorted({rounds[-1], best} - {None}) if rounds else []
        for server_round in shown:
            row = _round_row(run, server_round)
            out.append({
                "name": f"{run.run_id}:{server_round}", "task": config["task"],
                "model": config["model"], "strategy": config.get("strategy", "fedavg"),
                "run_status": registry["status"],
        "best_round": registry.get("best", {}).get("round"),
        "pooled_baseline": registry.get("pooled_baseline"),
        "init_weights": registry.get("init_weights"), "rounds": f"{server_round}/"
                f"{config['num-rounds']}", "metric": row.get("score_metric", ""),
                "pooled_score": row.get("pooled_score"),
                "sha256": registry["checkpoints"][str(server_round)]["sha256"][:16],
                "best": best == server_round,
            })
    return out


def export(home: Path, name: str, out: Path, signing_key: Ed25519PrivateKey) -> Path:
    """Write model.pt, model.json and model.sig into `out` (a new or empty folder)."""
    run, ref = resolve(home, name)
    if out.exists() and any(out.iterdir()):
        raise ModelRegistryError(f"{out} is not empty; choose a new --out folder")
    state = run.load_checkpoint(ref.server_round)  # checks the registry's sha256
    out.mkdir(parents=True, exist_ok=True)
    torch.save(dict(state), out / "model.pt")
    description = describe(run, ref)
    description["state_dict_sha256"] = hashlib.sha256((out / "model.pt").read_bytes()
                                                      ).hexdigest()
    text = json.dumps(description, indent=1, sort_keys=True)
    (out / "model.json").write_text(text)
    signature = signing_key.sign(text.encode())
    (out / "model.sig").write_text(base64.urlsafe_b64encode(signature).decode() + "\n")
    return out


def signed_text(folder: Path, document: str, signature: str, verify_key: Ed25519PublicKey,
                what: str) -> str:
    """`folder/document`'s text, once `folder/signature` (the consortium's Ed25519 signature
    over it, urlsafe base64) verifies; else an error that says not to use `what`."""
    try:
        text = (folder / document).read_text()
        signed = base64.urlsafe_b64decode((folder / signature).read_text().strip())
    except (OSError, ValueError) as exc:
        raise ModelRegistryError(f"{folder}: not a signed fedrad {what} ({document}, "
                                 f"{signature}): {exc}") from exc
    try:
        verify_key.verify(signed, text.encode())
    except InvalidSignature as exc:
        raise ModelRegistryError(f"{folder}/{signature}: the signature does not verify with "
                                 f"the consortium key; do not use this {what}") from exc
    return text


def verify_export(folder: Path, verify_key: Ed25519PublicKey) -> dict[str, Any]:
    """model.json, once its signature and model.pt's hash check out; else an error."""
    text = signed_text(folder, "model.json", "model.sig", verify_key, "model")
    try:
        data = (folder / "model.pt").read_bytes()
    except OSError as exc:
        raise ModelRegistryError(f"{folder}: not a fedrad model export (model.pt): {exc}"
                                 ) from exc
    description: dict[str, Any] = json.loads(text)
    if hashlib.sha256(data).hexdigest() != description["state_dict_sha256"]:
        raise ModelRegistryError(f"{folder}/model.pt differs from the sha256 its signed "
                                 "model.json names; do not use this model")
    return description


def load_exported(folder: Path) -> torch.nn.Module:
    """An exported model with MONAI and PyTorch only, from model.json's description."""
    import importlib

    description = json.loads((folder / "model.json").read_text())
    module_name, _, class_name = description["architecture"]["class"].rpartition(".")
    network = getattr(importlib.import_module(module_name), class_name)
    model: torch.nn.Module = network(**description["architecture"]["kwargs"])
    model.load_state_dict(torch.load(folder / "model.pt", map_location="cpu",
                                     weights_only=True))
    return model.eval()
