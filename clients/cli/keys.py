"""Ed25519 key pairs for signing patches: PKCS#8 PEM private key, SubjectPublicKeyInfo PEM public key."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from patchformat.signing import key_id  # the daemon's: the one a bundle's signature names

__all__ = ["KeyPair", "generate", "key_id"]


@dataclass(frozen=True)
class KeyPair:
    private_path: Path
    public_path: Path
    key_id: str


def generate(directory: Path, name: str, *, force: bool = False) -> KeyPair:
    """Write ``<name>.key`` (0600) and ``<name>.pub`` in ``directory``; refuse to overwrite unless ``force``."""
    directory.mkdir(parents=True, exist_ok=True)
    private_path, public_path = directory / f"{name}.key", directory / f"{name}.pub"
    if not force:
        for p in (private_path, public_path):
            if p.exists():
                raise FileExistsError(0, "exists", str(p))
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = private.public_key()
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    private_path.chmod(0o600)
    public_path.write_bytes(public.public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo))
    return KeyPair(private_path, public_path, key_id(public))
