"""Request and reply models of the live-patch verbs: load (signed), enable, disable, unload, list, force."""

from __future__ import annotations

from schemas.spec import VerbSpec

SPECS: list[VerbSpec] = []
"""This module's verbs; schemas.verbs.VERBS includes them."""
