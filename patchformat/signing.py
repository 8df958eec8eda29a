"""Ed25519 signatures over a patch bundle, and PEM key files.

What is signed (the *statement*) is the canonical JSON of::

    {"format": "livepatchd-signature/1",
     "manifest_sha256": sha256(canonical_json(manifest)) as lowercase hex,
     "object_sha256":   sha256(object bytes) as lowercase hex}

with keys sorted, separators ``,`` and ``:``, ASCII (:func:`statement_bytes`). The bundle keeps the two
digests, the signer's key id (sha256 of the raw 32-byte public key, hex) and the 64-byte signature. Because
the digests travel with the signature, :func:`verify` can tell the refusals apart:

=============================================  ==============================
check, in order                                refusal (``code``)
=============================================  ==============================
the bundle has no signature                    ``patch_signature_missing``
the key id is not among the trusted keys       ``patch_signature_untrusted``
the signature does not verify the statement    ``patch_signature_invalid``
the object's sha256 differs from the signed    ``patch_object_tampered``
the manifest's sha256 differs from the signed  ``patch_manifest_tampered``
=============================================  ==============================

Key files are PEM: PKCS#8 for private keys (unencrypted), SubjectPublicKeyInfo for public keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from patchformat.bundle import PatchBundle, Signature
from patchformat.errors import (
    BadSignature,
    KeyFileError,
    ManifestTampered,
    ObjectTampered,
    SignatureMissing,
    UntrustedKey,
)
from patchformat.manifest import Manifest, canonical_json

STATEMENT_FORMAT = "livepatchd-signature/1"


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def object_digest(obj: bytes) -> str:
    return hashlib.sha256(obj).hexdigest()


def manifest_digest(manifest: Manifest) -> str:
    return hashlib.sha256(canonical_json(manifest)).hexdigest()


def statement_bytes(object_sha256: str, manifest_sha256: str) -> bytes:
    statement = {"format": STATEMENT_FORMAT, "manifest_sha256": manifest_sha256, "object_sha256": object_sha256}
    return json.dumps(statement, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign_parts(obj: bytes, manifest: Manifest, private_key: Ed25519PrivateKey) -> Signature:
    """Sign an object and its manifest."""
    obj_sha, man_sha = object_digest(obj), manifest_digest(manifest)
    value = private_key.sign(statement_bytes(obj_sha, man_sha))
    return Signature(key_id(private_key.public_key()), obj_sha, man_sha, value)


def verify_parts(obj: bytes, manifest: Manifest, signature: Signature | None,
                 trusted: Iterable[Ed25519PublicKey]) -> str:
    """Check ``signature`` over ``obj`` + ``manifest`` against trusted keys; returns the signer's key id."""
    if signature is None:
        raise SignatureMissing(f"patch {manifest.name} is not signed", patch=manifest.name)
    keys = {key_id(k): k for k in trusted}
    key = keys.get(signature.key_id)
    if key is None:
        raise UntrustedKey(f"patch {manifest.name} is signed by key {signature.key_id[:16]}, which is not trusted",
                           patch=manifest.name, key_id=signature.key_id)
    try:
        key.verify(signature.value, statement_bytes(signature.object_sha256, signature.manifest_sha256))
    except InvalidSignature:
        raise BadSignature(f"patch {manifest.name}: the signature does not verify under key "
                           f"{signature.key_id[:16]}", patch=manifest.name, key_id=signature.key_id) from None
    if object_digest(obj) != signature.object_sha256:
        raise ObjectTampered(f"patch {manifest.name}: the object is not the one that was signed",
                             patch=manifest.name, signed=signature.object_sha256, actual=object_digest(obj))
    if manifest_digest(manifest) != signature.manifest_sha256:
        raise ManifestTampered(f"patch {manifest.name}: the manifest is not the one that was signed",
                               patch=manifest.name, signed=signature.manifest_sha256,
                               actual=manifest_digest(manifest))
    return signature.key_id


def sign(bundle: PatchBundle, private_key: Ed25519PrivateKey) -> PatchBundle:
    """The bundle with a signature by ``private_key`` (any earlier signature is replaced)."""
    return dataclasses.replace(bundle, signature=sign_parts(bundle.object, bundle.manifest, private_key))


def verify(bundle: PatchBundle, trusted_public_keys: Iterable[Ed25519PublicKey]) -> str:
    """Refuse the bundle unless a trusted key signed exactly this object and manifest; returns the key id."""
    return verify_parts(bundle.object, bundle.manifest, bundle.signature, trusted_public_keys)


# -- key files -------------------------------------------------------------------------------------------------

def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def save_private_key(key: Ed25519PrivateKey, path: Path) -> None:
    path.touch(mode=0o600)
    path.write_bytes(private_key_pem(key))


def save_public_key(key: Ed25519PublicKey, path: Path) -> None:
    path.write_bytes(public_key_pem(key))


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}", path=str(path)) from None


def parse_private_key(pem: bytes, source: str = "key") -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{source} is not an unencrypted PKCS#8 PEM private key: {exc}", source=source) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{source} is a {type(key).__name__}, not an Ed25519 key", source=source)
    return key


def parse_public_key(pem: bytes, source: str = "key") -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{source} is not a SubjectPublicKeyInfo PEM public key: {exc}", source=source) from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{source} is a {type(key).__name__}, not an Ed25519 key", source=source)
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    return parse_private_key(_read(path), str(path))


def load_public_key(path: Path) -> Ed25519PublicKey:
    return parse_public_key(_read(path), str(path))
