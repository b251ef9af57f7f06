"""Global-model checkpoints encrypted at rest (AES-256-GCM, `cryptography`).

The key is 32 random bytes in a file readable by the server's user only: by default
`$FEDRAD_SERVER_HOME/keys/checkpoint.key`, or `$FEDRAD_CHECKPOINT_KEY` (a deployment
points it into the consortium folder). It is created on first use and never
overwritten. A checkpoint file is nonce (12 bytes) + ciphertext; the run id and round
are authenticated as associated data, so a file renamed to another round or run, or
altered by one bit, does not decrypt.

The file is written as `torch.save` produces it, encrypted on the way (GCM's streaming
form, whose output is AESGCM's: ciphertext then tag) and hashed on the way, so saving never
holds the serialised model, its ciphertext and their concatenation at once.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
from collections import OrderedDict
from pathlib import Path
from typing import IO

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_ENV = "FEDRAD_CHECKPOINT_KEY"
NONCE_BYTES = 12


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be decrypted with this key (altered, moved or foreign)."""


def key_path(server_home: Path) -> Path:
    return Path(os.environ.get(KEY_ENV) or server_home / "keys" / "checkpoint.key")


def read_key(path: Path) -> bytes:
    """The existing 32-byte key at `path` (for reading checkpoints)."""
    if not path.exists():
        raise CheckpointError(f"{path} not found: checkpoints cannot be decrypted without the "
                              f"key they were written with (set {KEY_ENV} to its file)")
    key = path.read_bytes()
    if len(key) != 32:
        raise CheckpointError(f"{path}: expected a 32-byte AES-256 key, found {len(key)} "
                              "bytes; restore the consortium's key file")
    return key


def load_or_create_key(path: Path) -> bytes:
    """The 32-byte key at `path`, created (mode 0600) when absent; never overwritten."""
    if path.exists():
        return read_key(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key)
    return key


def _aad(run_id: str, server_round: int) -> bytes:
    return f"fedrad-checkpoint|run={run_id}|round={server_round}".encode()


class _EncryptingWriter:
    """A write-only stream for `torch.save`: nonce, then AES-256-GCM of what is written,
    then the tag, into `handle`, with the SHA-256 and size of those bytes kept."""

    def __init__(self, handle: IO[bytes], key: bytes, aad: bytes) -> None:
        nonce = secrets.token_bytes(NONCE_BYTES)
        self._cipher = Cipher(algorithms.AES(key), modes.GCM(nonce)).encryptor()
        self._cipher.authenticate_additional_data(aad)
        self._handle = handle
        self.sha256 = hashlib.sha256()
        self.size = 0
        self._out(nonce)

    def _out(self, data: bytes) -> None:
        self._handle.write(data)
        self.sha256.update(data)
        self.size += len(data)

    def write(self, data: bytes) -> int:
        self._out(self._cipher.update(data))
        return len(data)

    def flush(self) -> None:
        self._handle.flush()

    def close_cipher(self) -> None:
        self._out(self._cipher.finalize() + self._cipher.tag)


def _save_encrypted(state: OrderedDict[str, torch.Tensor], handle: IO[bytes], key: bytes,
                    run_id: str, server_round: int) -> _EncryptingWriter:
    writer = _EncryptingWriter(handle, key, _aad(run_id, server_round))
    torch.save(state, writer)  # type: ignore[arg-type]  # any object with write()
    writer.close_cipher()
    return writer


def write_encrypted_state(path: Path, state: OrderedDict[str, torch.Tensor], key: bytes,
                          run_id: str, server_round: int) -> tuple[str, int]:
    """Encrypt `state` into `path` (atomically replaced); its SHA-256 and size."""
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as handle:
        writer = _save_encrypted(state, handle, key, run_id, server_round)
    tmp.replace(path)
    return writer.sha256.hexdigest(), writer.size


def encrypt_state(state: OrderedDict[str, torch.Tensor], key: bytes, run_id: str,
                  server_round: int) -> bytes:
    """The encrypted file's bytes, in memory."""
    buffer = io.BytesIO()
    _save_encrypted(state, buffer, key, run_id, server_round)
    return buffer.getvalue()


def decrypt_state(blob: bytes, key: bytes, run_id: str,
                  server_round: int) -> OrderedDict[str, torch.Tensor]:
    try:
        plain = AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:],
                                    _aad(run_id, server_round))
    except InvalidTag as exc:
        raise CheckpointError(f"checkpoint of run {run_id} round {server_round} does not "
                              "decrypt: altered, renamed, or another consortium's key") from exc
    state = torch.load(io.BytesIO(plain), map_location="cpu", weights_only=True)
    return state  # type: ignore[no-any-return]
