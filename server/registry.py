"""The run folder: config, per-round metrics (JSON lines + TensorBoard), checkpoints, ε.

Layout of `<server home>/runs/<run id>/`:
  config.json        the run config used (flat)
  metrics.jsonl      one JSON object per completed round (also the live progress feed)
  epsilon.json       ε spent per site, latest
  checkpoints/       round-NNN.pt global weights (plain PyTorch state dicts)
  registry.json      checkpoint sha256 per round, run status
  tensorboard/       event files
  report.html        written when the run ends
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.audit import AuditLog, digest
from server.checkpoints import (
    CheckpointError,
    decrypt_state,
    key_path,
    load_or_create_key,
    read_key,
    write_encrypted_state,
)

SERVER_HOME_ENV = "FEDRAD_SERVER_HOME"


class RunFolderError(LookupError):
    """A run folder that does not exist or cannot be used as asked."""


def server_home() -> Path:
    """Where the server keeps runs: $FEDRAD_SERVER_HOME, else ./fedrad-server."""
    return Path(os.environ.get(SERVER_HOME_ENV, "fedrad-server")).resolve()


def registered_sites() -> dict[int, str]:
    """node id → site name of every site `fedrad server start` registered (nodes.json in
    the server home): names bound to node keys, not to what a site says of itself."""
    path = server_home() / "nodes.json"
    if not path.exists():
        return {}
    return {int(record["node_id"]): site
            for site, record in json.loads(path.read_text()).items()}


@dataclass
class SiteRound:
    """One site's part in one round (numbers and fixed status words only)."""

    site_id: str
    status: str
    train: dict[str, float] = field(default_factory=dict)
    evaluation: dict[str, float] = field(default_factory=dict)


@dataclass
class RoundRecord:
    """A completed round, as written to metrics.jsonl."""

    server_round: int
    wall_seconds: float
    slowest_site_seconds: float
    sites_expected: int
    sites_trained: int
    secagg: bool
    update_norm: float
    score_metric: str  # the task's headline metric (eval-dice, eval-auroc-macro)
    pooled_score: float  # that metric, averaged over sites weighted by examples
    sites: dict[str, SiteRound]
    failures: list[str]
    central_epsilon: float | None = None  # central DP: ε spent by the releases so far
    exchanges: int = 1  # data-dependent message exchanges (key adverts, recovery, last eval)

    @property
    def overhead_seconds(self) -> float:
        return self.wall_seconds - self.slowest_site_seconds


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


class RunFolder:
    """Everything the server keeps about one run."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.audit = AuditLog(root.parent.parent / "audit.jsonl")  # the server home's log
        self.run_id = root.name
        self.checkpoints = root / "checkpoints"
        self.metrics_path = root / "metrics.jsonl"
        self._writer: Any = None

    @classmethod
    def open(cls, home: Path, run_id: str) -> RunFolder:
        """An existing run's folder; RunFolderError naming the folder when there is none.
        A run id is digits only (Flower's): `../x` or an absolute path is refused, so a
        run config's resume-from cannot reach outside the server home's runs."""
        if not str(run_id).isdigit():
            raise RunFolderError(f"run id {run_id!r} is not a run id (digits only)")
        folder = cls(home / "runs" / str(run_id))
        if not (folder.root / "registry.json").exists():
            known = sorted(p.name for p in (home / "runs").glob("*") if p.is_dir()) \
                if (home / "runs").exists() else []
            raise RunFolderError(f"no run {run_id} in {home / 'runs'} (runs there: "
                                 f"{', '.join(known) or 'none'})")
        return folder

    @classmethod
    def all(cls, home: Path) -> list[RunFolder]:
        """Every run folder under the server home, oldest run id first."""
        root = home / "runs"
        folders = [p for p in root.glob("*") if (p / "registry.json").exists()] \
            if root.exists() else []
        return [cls(p) for p in sorted(folders, key=lambda p: (len(p.name), p.name))]

    def last_round(self) -> int:
        """The last round whose checkpoint was saved (0: none yet)."""
        return max((int(r) for r in self.read_json("registry.json")["checkpoints"]), default=0)

    def drop_rounds_after(self, server_round: int) -> None:
        """Forget rounds recorded after `server_round` (a round cut short by a crash had
        its metrics written but no checkpoint); a resumed run records them again."""
        kept = [row for row in self.rounds() if row["server_round"] <= server_round]
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in kept))
        os.replace(tmp, self.metrics_path)

    def resumed_by(self, flwr_run_id: int, from_round: int) -> None:
        """Record that Flower run `flwr_run_id` continues this run after `from_round`."""
        registry = self.read_json("registry.json")
        registry["status"] = "running"
        registry.setdefault("resumed", []).append({"flwr_run_id": str(flwr_run_id),
                                                   "after_round": from_round})
        _write_json(self.root / "registry.json", registry)
        self.audit.append("run-resumed", run_id=self.run_id, flwr_run_id=str(flwr_run_id),
                          after_round=from_round)

    @classmethod
    def create(cls, home: Path, run_id: int, flat_config: dict[str, Any]) -> RunFolder:
        folder = cls(home / "runs" / str(run_id))
        folder.checkpoints.mkdir(parents=True, exist_ok=True)
        _write_json(folder.root / "config.json", flat_config)
        _write_json(folder.root / "registry.json",
                    {"run_id": str(run_id), "status": "running", "checkpoints": {}})
        folder.metrics_path.touch()
        folder.audit.append("run-started", run_id=str(run_id),
                            config_sha256=digest((folder.root / "config.json").read_bytes()))
        return folder

    def _tensorboard(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.root / "tensorboard"))
        return self._writer

    def record_round(self, record: RoundRecord) -> None:
        row = asdict(record)
        row["overhead_seconds"] = record.overhead_seconds
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(row, sort_keys=True) + "\n")
        writer = self._tensorboard()
        step = record.server_round
        writer.add_scalar("round/wall_seconds", record.wall_seconds, step)
        writer.add_scalar("round/overhead_seconds", record.overhead_seconds, step)
        writer.add_scalar(f"global/pooled_{record.score_metric}", record.pooled_score, step)
        for site_id, site in record.sites.items():
            for name, value in {**site.train, **site.evaluation}.items():
                writer.add_scalar(f"{site_id}/{name}", value, step)
        writer.flush()
        epsilon = {
            site_id: site.train["epsilon-total"]
            for site_id, site in record.sites.items()
            if "epsilon-total" in site.train
        }
        previous = self.read_json("epsilon.json") or {}
        _write_json(self.root / "epsilon.json", {**previous, **epsilon})
        self.audit.append("round-completed", run_id=self.run_id, round=record.server_round,
                          sites={s: site.status for s, site in record.sites.items()},
                          update_norm=record.update_norm)

    def save_checkpoint(self, server_round: int, state: OrderedDict[str, torch.Tensor]) -> str:
        """Encrypt (AES-256-GCM, server/checkpoints.py) and keep the file's sha256."""
        key = load_or_create_key(key_path(self.root.parent.parent))
        path = self.checkpoints / f"round-{server_round:03d}.pt.enc"
        sha, size = write_encrypted_state(path, state, key, self.run_id, server_round)
        registry = self.read_json("registry.json")
        registry["checkpoints"][str(server_round)] = {"file": path.name, "sha256": sha,
                                                      "encryption": "AES-256-GCM"}
        _write_json(self.root / "registry.json", registry)
        self.audit.append("checkpoint-saved", run_id=self.run_id, round=server_round,
                          file=path.name, sha256=sha, bytes=size)
        return sha

    def tag_best(self, server_round: int, metric: str, score: float) -> int:
        """Tag `server_round` as the run's best model if its pooled validation `metric`
        (higher is better: Dice, AUROC) beats the best so far; the best round after it.
        Call after the round's checkpoint is saved: the tag names a checkpoint."""
        registry = self.read_json("registry.json")
        if str(server_round) not in registry["checkpoints"]:
            raise RunFolderError(f"run {self.run_id}: round {server_round} has no checkpoint "
                                 "to tag as best")
        best = registry.get("best")
        if np.isfinite(score) and (best is None or score > best["score"]):
            best = {"round": server_round, "metric": metric, "score": score}
            registry["best"] = best
            _write_json(self.root / "registry.json", registry)
            self.audit.append("best-round", run_id=self.run_id, round=server_round,
                              metric=metric, score=score)
        return 0 if best is None else int(best["round"])

    def record_prior(self, prior: dict[str, Any]) -> None:
        """The initial weights the run started from (file, sha256, `fedrad pretrain`'s
        provenance: what data it saw), so every model of the run says what it builds on."""
        registry = self.read_json("registry.json")
        registry["init_weights"] = prior
        _write_json(self.root / "registry.json", registry)
        self.audit.append("run-prior", run_id=self.run_id, file=prior["file"],
                          sha256=prior["sha256"])

    def record_pooled_baseline(self, metric: str, score: float, source: str) -> None:
        """What pooling the same sites' training patients reached (bench/pooled_baseline.py
        --run-dir), so reports and `fedrad evaluate` state the run's ratio to it."""
        registry = self.read_json("registry.json")
        registry["pooled_baseline"] = {"metric": metric, "score": score, "source": source}
        _write_json(self.root / "registry.json", registry)

    def record_dp_curve(self, points: list[dict[str, Any]], source: str) -> None:
        """Utility vs ε measured on the consortium's sites (bench/dp_utility.py --record):
        each point's mode, start, dp-trainable, ε (None: no DP) and range of score ÷ the
        pooled no-DP baseline over seeds. The report places the run on it."""
        registry = self.read_json("registry.json")
        registry["dp_curve"] = {"points": points, "source": source}
        _write_json(self.root / "registry.json", registry)

    def stopped_early(self, after_round: int, best_round: int, patience: int) -> None:
        """Record that the run stopped before num-rounds: no better model in `patience`."""
        registry = self.read_json("registry.json")
        registry["stopped_early"] = {"after_round": after_round, "best_round": best_round,
                                     "patience": patience}
        _write_json(self.root / "registry.json", registry)
        self.audit.append("run-stopped-early", run_id=self.run_id, after_round=after_round,
                          best_round=best_round, patience=patience)

    def save_server_state(self, server_round: int, state: dict[str, torch.Tensor]) -> None:
        """The strategy's and central DP's state after a round (encrypted like the model),
        so that a resumed run continues exactly where this one stopped."""
        key = load_or_create_key(key_path(self.root.parent.parent))
        path = self.checkpoints / f"round-{server_round:03d}.state.enc"
        sha, _ = write_encrypted_state(path, OrderedDict(state), key,
                                       f"{self.run_id}/server-state", server_round)
        registry = self.read_json("registry.json")
        registry["checkpoints"][str(server_round)]["server_state"] = {
            "file": path.name, "sha256": sha}
        _write_json(self.root / "registry.json", registry)

    def load_server_state(self, server_round: int) -> dict[str, torch.Tensor]:
        entry = self.read_json("registry.json")["checkpoints"][str(server_round)]
        if "server_state" not in entry:
            return {}
        data = (self.checkpoints / entry["server_state"]["file"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != entry["server_state"]["sha256"]:
            raise CheckpointError(f"run {self.run_id} round {server_round}: server state "
                                  "file differs from the hash in registry.json")
        key = read_key(key_path(self.root.parent.parent))
        return dict(decrypt_state(data, key, f"{self.run_id}/server-state", server_round))

    def load_checkpoint(self, server_round: int) -> OrderedDict[str, torch.Tensor]:
        """The decrypted state dict, after checking the file against the registry's hash."""
        entry = self.read_json("registry.json")["checkpoints"][str(server_round)]
        data = (self.checkpoints / entry["file"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CheckpointError(f"run {self.run_id} round {server_round}: checkpoint file "
                                  "differs from the hash in registry.json")
        key = read_key(key_path(self.root.parent.parent))
        return decrypt_state(data, key, self.run_id, server_round)

    def finish(self, status: str) -> None:
        self.audit.append("run-finished", run_id=self.run_id, status=status)
        head = self.audit.head()
        registry = self.read_json("registry.json")
        registry["status"] = status
        registry["audit"] = {"entries": head.entries, "last_hash": head.last_hash}
        _write_json(self.root / "registry.json", registry)
        if self._writer is not None:
            self._writer.close()

    def write_json(self, name: str, data: Any) -> None:
        _write_json(self.root / name, data)

    def read_json(self, name: str) -> Any:
        path = self.root / name
        return json.loads(path.read_text()) if path.exists() else None

    def rounds(self) -> list[dict[str, Any]]:
        text = self.metrics_path.read_text() if self.metrics_path.exists() else ""
        return [json.loads(line) for line in text.splitlines() if line.strip()]
