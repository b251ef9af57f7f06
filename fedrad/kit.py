"""A site's startup kit: everything a hospital needs to join, in one archive.

Made by `fedrad consortium add-site` (optionally sealed with a passphrase: scrypt +
AES-256-GCM from `cryptography`), opened by `fedrad site start --kit`. Only the named
members are ever read from an archive (no extraction of arbitrary paths).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from common.pki import ProvisioningError

SEAL_MAGIC = b"FEDRAD-KIT-SEALED-2\n"  # scrypt N = 2^17
SEAL_MAGIC_V1 = b"FEDRAD-KIT-SEALED-1\n"  # scrypt N = 2^15, still opened
_SCRYPT_N = {SEAL_MAGIC: 2**17, SEAL_MAGIC_V1: 2**15}
PASSPHRASE_ENV = "FEDRAD_KIT_PASSPHRASE"  # noqa: S105 (a variable name)
MIN_PASSPHRASE = 12
MEMBERS = {  # name → mode when installed
    "ca.pem": 0o644, "node.key": 0o600, "node.pub": 0o644, "site.pem": 0o644,
    "signing.pub": 0o644,
    "trusted-entities.yaml": 0o644, "apps.json": 0o644, "kit.json": 0o644,
    "node-config.toml": 0o644, "README.txt": 0o644,
}

README = """fedrad startup kit for site {site} of consortium {name}

Start the site with:  fedrad site start --kit <this file> --data /path/to/dicom-export \\
                          --work-dir /var/lib/fedrad --epsilon-budget <your budget>

ca.pem                the consortium CA: the SuperNode trusts the SuperLink's certificate by it
node.key              this site's node-authentication private key (secret, mode 0600)
node.pub              its public key (registered with the SuperLink by the coordinator)
site.pem              the site's identity certificate (its node key, signed by the
                      consortium CA): peers check it before masking with this site
signing.pub           the consortium server's model-signing key: every global model is
                      verified with it before it is loaded
trusted-entities.yaml the coordinator's code-signing key (kept offline, never on the
                      server) for Flower's SuperNode: only ClientApp code it signed runs
apps.json             the signed app builds (sha256) this site runs; any other build,
                      an older signed version included, is refused
kit.json              site name, consortium name and the SuperLink's address
node-config.toml      a template of the site's own settings (data, work folder, budget);
                      nothing from the server can change them
"""


class KitError(ProvisioningError):
    """A kit that cannot be opened: missing, altered, wrong passphrase, or incomplete."""


@dataclass(frozen=True)
class Kit:
    """An opened kit's files."""

    files: dict[str, bytes]

    @property
    def info(self) -> dict[str, str]:
        return dict(json.loads(self.files["kit.json"]))

    def install(self, folder: Path) -> Path:
        """Write the kit's files into `folder` (mode 0700), each replaced atomically."""
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
        for name, data in self.files.items():
            tmp = folder / f".{name}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, MEMBERS[name])
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.chmod(tmp, MEMBERS[name])
            os.replace(tmp, folder / name)
        return folder


def build(files: dict[str, bytes]) -> bytes:
    """The kit as tar.gz bytes; every member of MEMBERS, nothing else."""
    if set(files) != set(MEMBERS):
        raise KitError(f"a kit holds exactly {sorted(MEMBERS)}; got {sorted(files)}")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(files[name]), MEMBERS[name], int(time.time())
            archive.addfile(info, io.BytesIO(files[name]))
    return buffer.getvalue()


def _kdf(salt: bytes, magic: bytes = SEAL_MAGIC) -> Scrypt:
    return Scrypt(salt=salt, length=32, n=_SCRYPT_N[magic], r=8, p=1)


def check_passphrase(passphrase: str) -> str:
    """Refuse a passphrase too short to seal a kit with (an empty one included)."""
    if len(passphrase) < MIN_PASSPHRASE:
        raise KitError(f"a kit passphrase needs at least {MIN_PASSPHRASE} characters")
    return passphrase


def seal(data: bytes, passphrase: str) -> bytes:
    """Encrypt a kit with a passphrase (scrypt → AES-256-GCM; magic and salt bound in)."""
    check_passphrase(passphrase)
    salt, nonce = os.urandom(16), os.urandom(12)
    key = _kdf(salt).derive(passphrase.encode())
    return SEAL_MAGIC + salt + nonce + AESGCM(key).encrypt(nonce, data, SEAL_MAGIC + salt)


def open_kit(path: Path, passphrase: str | None) -> Kit:
    """Read a kit (sealed or not); raise KitError naming the file and what to do."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KitError(f"cannot read the startup kit {path}: {exc.strerror}") from exc
    magic = next((m for m in _SCRYPT_N if data.startswith(m)), None)
    if magic is not None:
        if not passphrase:
            raise KitError(f"{path} is sealed with a passphrase; pass --passphrase-file "
                           f"or set ${PASSPHRASE_ENV}")
        salt = data[len(magic):len(magic) + 16]
        nonce = data[len(magic) + 16:len(magic) + 28]
        key = _kdf(salt, magic).derive(passphrase.encode())
        try:
            data = AESGCM(key).decrypt(nonce, data[len(magic) + 28:], magic + salt)
        except InvalidTag as exc:
            raise KitError(f"{path}: wrong passphrase, or the kit was altered") from exc
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
            files = {}
            missing = sorted(set(MEMBERS) - set(archive.getnames()))
            if missing:
                raise KeyError(", ".join(missing))
            for name in MEMBERS:
                member = archive.getmember(name)
                handle = archive.extractfile(member) if member.isfile() else None
                if handle is None:
                    raise KitError(f"{path}: {name} is not a regular file")
                files[name] = handle.read()
    except KeyError as exc:
        raise KitError(f"{path} lacks {exc.args[0]}; ask the coordinator for a new kit "
                       "(`fedrad consortium reissue-kit <site>`)") from exc
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise KitError(f"{path} is not a fedrad startup kit (tar.gz): {exc}") from exc
    return Kit(files=files)
