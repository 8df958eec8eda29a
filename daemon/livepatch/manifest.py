"""Moved to :mod:`patchformat.manifest` (lpctl uses it too); these names stay importable from here."""

from patchformat.manifest import (
    Callbacks,
    FuncSpec,
    Identifier,
    Manifest,
    ObjectSpec,
    PatchName,
    StateSpec,
    canonical_json,
)

__all__ = [
    "Callbacks",
    "FuncSpec",
    "Identifier",
    "Manifest",
    "ObjectSpec",
    "PatchName",
    "StateSpec",
    "canonical_json",
]
