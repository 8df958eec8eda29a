"""What a bundle file holds, as ``livepatchd patch`` and ``lpctl patch`` print it (--json: the same document)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from patchformat.bundle import PatchBundle
from patchformat.signing import object_digest


def summary(bundle: PatchBundle, path: Path) -> dict[str, Any]:
    sig = bundle.signature
    return {"bundle": str(path), "name": bundle.name, "build_id": bundle.manifest.build_id,
            "object_sha256": object_digest(bundle.object), "key_id": sig.key_id if sig else None,
            "funcs": [f.old_name for o in bundle.manifest.objects for f in o.funcs]}


def signed_line(bundle: PatchBundle, path: Path) -> str:
    """The one line a successful sign prints."""
    if bundle.signature is None:
        return f"{path}: {bundle.name} (unsigned)"
    return f"{path}: {bundle.name} signed by {short_key_id(bundle.signature.key_id)}"


def short_key_id(key_id: str) -> str:
    """How people see a key id: its first 16 hex digits (the full 64 identify it in files and replies)."""
    return key_id[:16]
