"""The signing keys this daemon trusts: loading them, the demo key pair, and the refusal when there are none."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from daemon.errors import UntrustedKey
from patchformat import signing

log = structlog.get_logger(__name__)

DEV_KEY_NAME = "dev-signing"
NO_KEYS_HINT = ("configure trusted Ed25519 public keys: `livepatchd serve --trusted-key FILE.pub` (repeatable; e.g. "
                "the .pub that `lpctl keys generate` wrote) or `--trusted-keys-dir DIR` (a directory of .pub/.pem "
                "files), or LIVEPATCHD_TRUSTED_KEYS (paths) / LIVEPATCHD_TRUSTED_KEYS_DIR; for a demo only, "
                "`livepatchd serve --dev-signing-key`")


class NoTrustedKeys(UntrustedKey):
    """This daemon trusts no signing key at all (same stable code as a key that is not trusted)."""


# -- trusted keys ------------------------------------------------------------------------------------------------


def dev_signing_key(directory: Path) -> tuple[Path, Path]:
    """The demo signing key pair in ``directory`` (generated on first use): (private PEM, public PEM)."""
    directory.mkdir(parents=True, exist_ok=True)
    private, public = directory / f"{DEV_KEY_NAME}.key", directory / f"{DEV_KEY_NAME}.pub"
    if not private.exists():
        key = signing.generate_key()
        signing.save_private_key(key, private)
        signing.save_public_key(key.public_key(), public)
    elif not public.exists():
        signing.save_public_key(signing.load_private_key(private).public_key(), public)
    return private, public


def trusted_keys(paths: Iterable[Path], *, dev_key_dir: Path | None = None) -> list[Ed25519PublicKey]:
    """Load the trusted public keys (``KeyFileError`` for a bad file); with ``dev_key_dir``, the demo key too."""
    files = list(paths)
    if dev_key_dir is not None:
        private, public = dev_signing_key(dev_key_dir)
        files.append(public)
        log.warning("dev_signing_key_trusted", private_key=str(private), public_key=str(public),
                    note="for demos only: anyone who can read this file can sign patches this daemon loads")
    keys: dict[str, Ed25519PublicKey] = {}
    for path in files:
        key = signing.load_public_key(path)
        keys.setdefault(signing.key_id(key), key)
    return list(keys.values())
