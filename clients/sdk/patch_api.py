"""SDK methods of the live-patch verbs (mixed into LivepatchClient)."""

from __future__ import annotations


class PatchApi:
    """Live patches: load, enable, disable, unload, list, info, force, transition progress."""
