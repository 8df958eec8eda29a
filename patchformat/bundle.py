"""The patch bundle: one file holding a live patch's object, manifest and signature.

The file is UTF-8 JSON (keys sorted, 2-space indent when written here; any JSON layout is read)::

    {
      "format": "livepatchd-bundle/1",
      "manifest": { ...the manifest, see patchformat.manifest... },
      "object": "<base64 of the ELF relocatable object>",
      "signature": null  |  {
          "algorithm": "ed25519",
          "key_id": "<sha256 of the signer's raw public key, hex>",
          "object_sha256": "<hex>", "manifest_sha256": "<hex>",
          "value": "<base64 of the 64-byte signature>"
      }
    }

Only the object bytes and the manifest's canonical JSON are signed (see :mod:`patchformat.signing`), so
the file's own layout may change without invalidating the signature.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from patchformat.errors import BundleFormatError
from patchformat.manifest import Manifest

BUNDLE_FORMAT = "livepatchd-bundle/1"
MAX_BUNDLE_BYTES = 64 << 20
_Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


@dataclass(frozen=True)
class Signature:
    key_id: str
    object_sha256: str
    manifest_sha256: str
    value: bytes  # 64 bytes


@dataclass(frozen=True)
class PatchBundle:
    manifest: Manifest
    object: bytes
    signature: Signature | None = None

    @property
    def name(self) -> str:
        return self.manifest.name

    def to_bytes(self) -> bytes:
        sig = None
        if self.signature is not None:
            s = self.signature
            sig = {"algorithm": "ed25519", "key_id": s.key_id, "object_sha256": s.object_sha256,
                   "manifest_sha256": s.manifest_sha256, "value": base64.b64encode(s.value).decode()}
        doc = {"format": BUNDLE_FORMAT, "manifest": self.manifest.to_dict(),
               "object": base64.b64encode(self.object).decode(), "signature": sig}
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, raw: bytes, source: str = "bundle") -> PatchBundle:
        if len(raw) > MAX_BUNDLE_BYTES:
            raise BundleFormatError(f"{source} is {len(raw)} bytes (at most {MAX_BUNDLE_BYTES})", source=source)
        try:
            doc = _BundleFile.model_validate_json(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "document"
            raise BundleFormatError(f"{source} is not a livepatchd bundle: {where}: {first['msg']}",
                                    source=source) from None
        manifest = Manifest.from_dict(doc.manifest)
        obj = _b64(doc.object, "object", source)
        sig = None
        if doc.signature is not None:
            s = doc.signature
            value = _b64(s.value, "signature.value", source)
            if len(value) != 64:
                raise BundleFormatError(f"{source}: an Ed25519 signature is 64 bytes, not {len(value)}",
                                        source=source)
            sig = Signature(s.key_id, s.object_sha256, s.manifest_sha256, value)
        return cls(manifest, obj, sig)

    def save(self, path: Path) -> None:
        path.write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: Path) -> PatchBundle:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise BundleFormatError(f"cannot read bundle {path}: {exc.strerror}", source=str(path)) from None
        return cls.from_bytes(raw, str(path))


def _b64(text: str, field: str, source: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BundleFormatError(f"{source}: {field} is not valid base64", source=source, field=field) from None


class _SignatureFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    algorithm: Literal["ed25519"]
    key_id: _Hex64
    object_sha256: _Hex64
    manifest_sha256: _Hex64
    value: str


class _BundleFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["livepatchd-bundle/1"]
    manifest: dict[str, Any]
    object: str
    signature: _SignatureFile | None
