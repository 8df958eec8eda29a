"""Ed25519 signing of patch bundles: what is signed, and each refusal with its own code."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from daemon.errors import (
    BadSignature,
    KeyFileError,
    ManifestTampered,
    ObjectTampered,
    SignatureMissing,
    UntrustedKey,
)
from patchformat import signing
from patchformat.bundle import PatchBundle
from patchformat.manifest import FuncSpec, Manifest, ObjectSpec, canonical_json

OBJECT = b"\x7fELF pretend object bytes" + bytes(range(256))


def manifest(**changes: object) -> Manifest:
    base = Manifest(name="lp_test", build_id="ab" * 20,
                    objects=(ObjectSpec(funcs=(FuncSpec(old_name="cmdline_proc_show", new_name="new_show"),)),))
    return base.model_copy(update=changes)


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return signing.generate_key()


@pytest.fixture
def signed(key: Ed25519PrivateKey) -> PatchBundle:
    return signing.sign(PatchBundle(manifest(), OBJECT), key)


def test_sign_and_verify(key: Ed25519PrivateKey, signed: PatchBundle) -> None:
    """A bundle signed by a trusted key verifies and names that key (sha256 of the raw public key)."""
    other = signing.generate_key().public_key()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert signing.verify(signed, [other, key.public_key()]) == hashlib.sha256(raw).hexdigest()


def test_exactly_what_is_signed(key: Ed25519PrivateKey, signed: PatchBundle) -> None:
    """The signature is over the canonical statement of the object's and manifest's sha256, nothing else."""
    sig = signed.signature
    assert sig is not None
    assert sig.object_sha256 == hashlib.sha256(OBJECT).hexdigest()
    assert sig.manifest_sha256 == hashlib.sha256(canonical_json(signed.manifest)).hexdigest()
    statement = (b'{"format":"livepatchd-signature/1","manifest_sha256":"' + sig.manifest_sha256.encode()
                 + b'","object_sha256":"' + sig.object_sha256.encode() + b'"}')
    assert signing.statement_bytes(sig.object_sha256, sig.manifest_sha256) == statement
    key.public_key().verify(sig.value, statement)  # raises if not
    canonical = canonical_json(signed.manifest)
    assert canonical == json.dumps(json.loads(canonical), sort_keys=True, separators=(",", ":")).encode()
    assert b'"old_sympos":0' in canonical  # defaults are explicit
    assert b'"replace":false' in canonical


def test_missing_signature(key: Ed25519PrivateKey) -> None:
    with pytest.raises(SignatureMissing) as err:
        signing.verify(PatchBundle(manifest(), OBJECT), [key.public_key()])
    assert err.value.code == "patch_signature_missing"


def test_untrusted_key(signed: PatchBundle) -> None:
    with pytest.raises(UntrustedKey) as err:
        signing.verify(signed, [signing.generate_key().public_key()])
    assert err.value.code == "patch_signature_untrusted"
    with pytest.raises(UntrustedKey):
        signing.verify(signed, [])


def test_wrong_signature(key: Ed25519PrivateKey, signed: PatchBundle) -> None:
    """A flipped bit in the signature, or signed digests edited to match a changed object: BadSignature."""
    assert signed.signature is not None
    value = bytearray(signed.signature.value)
    value[10] ^= 1
    flipped = dataclasses.replace(signed, signature=dataclasses.replace(signed.signature, value=bytes(value)))
    with pytest.raises(BadSignature) as err:
        signing.verify(flipped, [key.public_key()])
    assert err.value.code == "patch_signature_invalid"
    evil = OBJECT + b"!"
    forged = dataclasses.replace(signed, object=evil, signature=dataclasses.replace(
        signed.signature, object_sha256=hashlib.sha256(evil).hexdigest()))
    with pytest.raises(BadSignature):
        signing.verify(forged, [key.public_key()])


def test_tampered_object(key: Ed25519PrivateKey, signed: PatchBundle) -> None:
    changed = bytearray(OBJECT)
    changed[40] ^= 0x80
    with pytest.raises(ObjectTampered) as err:
        signing.verify(dataclasses.replace(signed, object=bytes(changed)), [key.public_key()])
    assert err.value.code == "patch_object_tampered"


@pytest.mark.parametrize("change", [{"replace": True}, {"name": "lp_other"}, {"build_id": "cd" * 20}])
def test_tampered_manifest(key: Ed25519PrivateKey, signed: PatchBundle, change: dict[str, object]) -> None:
    with pytest.raises(ManifestTampered) as err:
        signing.verify(dataclasses.replace(signed, manifest=manifest(**change)), [key.public_key()])
    assert err.value.code == "patch_manifest_tampered"


def test_signature_survives_the_file_and_its_layout(tmp_path: Path, key: Ed25519PrivateKey,
                                                     signed: PatchBundle) -> None:
    """Save, load, re-indent and reorder the JSON file: still the same signed bundle."""
    path = tmp_path / "p.lpb"
    signed.save(path)
    loaded = PatchBundle.load(path)
    assert loaded == signed
    relaid = json.dumps(json.loads(path.read_text()), indent=None, sort_keys=False)
    assert signing.verify(PatchBundle.from_bytes(relaid.encode()), [key.public_key()]) == \
        signing.verify(signed, [key.public_key()])


def test_refusal_codes_are_distinct() -> None:
    codes = [c.code for c in (SignatureMissing, UntrustedKey, BadSignature, ObjectTampered, ManifestTampered)]
    assert len(set(codes)) == len(codes)


def test_key_files(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    """PKCS#8 private and SubjectPublicKeyInfo public PEM files round-trip; the private file is 0600."""
    priv, pub = tmp_path / "k.pem", tmp_path / "k.pub.pem"
    signing.save_private_key(key, priv)
    signing.save_public_key(key.public_key(), pub)
    assert priv.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert priv.stat().st_mode & 0o777 == 0o600
    loaded = signing.load_private_key(priv)
    bundle = signing.sign(PatchBundle(manifest(), OBJECT), loaded)
    assert signing.verify(bundle, [signing.load_public_key(pub)]) == signing.key_id(key.public_key())


def test_bad_key_files(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    """Garbage, the wrong half of a key pair, another algorithm, a missing file: KeyFileError."""
    (tmp_path / "junk").write_bytes(b"not a key")
    signing.save_public_key(key.public_key(), tmp_path / "pub")
    x = X25519PrivateKey.generate()
    (tmp_path / "x25519").write_bytes(x.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    for path, loader in [("junk", signing.load_private_key), ("junk", signing.load_public_key),
                         ("pub", signing.load_private_key), ("x25519", signing.load_private_key),
                         ("absent", signing.load_public_key)]:
        with pytest.raises(KeyFileError) as err:
            loader(tmp_path / path)
        assert err.value.code == "patch_key_invalid"
