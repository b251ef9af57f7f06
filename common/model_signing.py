"""Signed global models: the ServerApp signs every global model it sends (Ed25519 over a
canonical digest of the weights, the run id and the round); a site verifies with the
consortium's public key from its startup kit before it loads anything.

The digest covers each array's dtype, shape and bytes in order, so a reordered,
reshaped, retyped or altered model, or a model replayed into another run or round,
fails verification.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

SIGNING_KEY_ENV = "FEDRAD_MODEL_SIGNING_KEY"


class ModelSignatureError(ValueError):
    """A global model without a valid consortium signature."""


def model_digest(arrays: list[np.ndarray], run_id: int, server_round: int, purpose: str
                 ) -> bytes:
    """`purpose` is "train" or "evaluate": a model sent for one cannot be replayed as the other."""
    digest = hashlib.sha256(f"fedrad-model|v1|run={run_id}|round={server_round}|"
                            f"purpose={purpose}|arrays={len(arrays)}".encode())
    for array in arrays:
        contiguous = np.ascontiguousarray(array)
        digest.update(f"|{contiguous.dtype.str}|{contiguous.shape}|".encode())
        digest.update(contiguous.data)  # in place: no model-sized copy
    return digest.digest()


def load_signing_key(path: Path) -> ed25519.Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ModelSignatureError(f"{path}: not an Ed25519 private key")
    return key


def load_verify_key(path: Path) -> ed25519.Ed25519PublicKey:
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ModelSignatureError(f"{path}: cannot be read as the consortium's OpenSSH "
                                  "Ed25519 public key (signing.pub of the startup kit)") from exc
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ModelSignatureError(f"{path}: not an Ed25519 public key")
    return key


def sign_model(key: ed25519.Ed25519PrivateKey, arrays: list[np.ndarray], run_id: int,
               server_round: int, purpose: str) -> bytes:
    return key.sign(model_digest(arrays, run_id, server_round, purpose))


def verify_model(key: ed25519.Ed25519PublicKey, arrays: list[np.ndarray], run_id: int,
                 server_round: int, purpose: str, signature: object) -> None:
    """Raise ModelSignatureError unless `signature` signs exactly these weights."""
    if not isinstance(signature, bytes) or len(signature) != 64:
        raise ModelSignatureError("the global model carries no consortium signature")
    try:
        key.verify(signature, model_digest(arrays, run_id, server_round, purpose))
    except InvalidSignature as exc:
        raise ModelSignatureError("the global model's signature does not verify") from exc
