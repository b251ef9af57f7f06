"""Checkpoints at rest: AES-256-GCM, bound to their run and round, hashes in the registry."""

from __future__ import annotations

import pytest
import torch

from server.checkpoints import CheckpointError
from server.registry import RunFolder


def _run(tmp_path, run_id=5) -> RunFolder:
    return RunFolder.create(tmp_path / "home", run_id, {"num-rounds": 2})


def test_round_trip_private_key_and_registry_hash(tmp_path) -> None:
    run = _run(tmp_path)
    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}
    sha = run.save_checkpoint(1, state)
    loaded = run.load_checkpoint(1)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    registry = run.read_json("registry.json")
    assert registry["checkpoints"]["1"]["sha256"] == sha
    assert registry["checkpoints"]["1"]["encryption"] == "AES-256-GCM"
    key = tmp_path / "home" / "keys" / "checkpoint.key"
    assert oct(key.stat().st_mode & 0o777) == "0o600" and len(key.read_bytes()) == 32
    blob = (run.checkpoints / "round-001.pt.enc").read_bytes()
    assert b"arange" not in blob and state["w"].numpy().tobytes() not in blob


def test_altered_moved_or_foreign_checkpoints_do_not_load(tmp_path, monkeypatch) -> None:
    run = _run(tmp_path)
    run.save_checkpoint(1, {"w": torch.zeros(4)})
    run.save_checkpoint(2, {"w": torch.ones(4)})
    path = run.checkpoints / "round-001.pt.enc"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="differs from the hash"):
        run.load_checkpoint(1)
    # Round 2's file under round 1's name, with the registry updated to match: still refused,
    # because the round is authenticated inside the ciphertext.
    path.write_bytes((run.checkpoints / "round-002.pt.enc").read_bytes())
    registry = run.read_json("registry.json")
    registry["checkpoints"]["1"]["sha256"] = registry["checkpoints"]["2"]["sha256"]
    (run.root / "registry.json").write_text(__import__("json").dumps(registry))
    with pytest.raises(CheckpointError, match="does not decrypt"):
        run.load_checkpoint(1)
    monkeypatch.setenv("FEDRAD_CHECKPOINT_KEY", str(tmp_path / "other.key"))
    with pytest.raises(CheckpointError, match="not found"):
        run.load_checkpoint(2)
    (tmp_path / "other.key").write_bytes(b"\x01" * 32)
    with pytest.raises(CheckpointError, match="does not decrypt"):
        run.load_checkpoint(2)
