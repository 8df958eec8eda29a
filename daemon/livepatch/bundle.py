"""Moved to :mod:`patchformat.bundle` (lpctl uses it too); these names stay importable from here."""

from patchformat.bundle import (
    BUNDLE_FORMAT,
    MAX_BUNDLE_BYTES,
    PatchBundle,
    Signature,
)

__all__ = [
    "BUNDLE_FORMAT",
    "MAX_BUNDLE_BYTES",
    "PatchBundle",
    "Signature",
]
