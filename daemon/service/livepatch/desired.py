"""The live patches' desired state: what each change and each completed transition leaves in the
:class:`DesiredState` store (kind ``"livepatch"``: the bundle as blob, ``{"enabled": bool}``, in load order), in
the same transaction as the request id that caused it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from daemon.livepatch.core import Livepatch
from daemon.service.store.desired import DesiredState, Item
from patchformat import signing
from patchformat.bundle import PatchBundle

KIND = "livepatch"
"""The desired-state kind of live patches (key: the patch name)."""


@dataclass
class RestoreReport:
    """What the restore at boot re-applied."""

    loaded: list[str] = field(default_factory=list)
    enabled: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    held_back: list[dict[str, Any]] = field(default_factory=list)
    """Desired-enabled patches the crash-loop guard kept disabled, and why."""
    duration_s: float = 0.0


class PatchRecorder:
    """The live patches' records in the desired-state store (none without a store: nothing survives a restart)."""

    def __init__(self, livepatch: Livepatch, desired: DesiredState | None) -> None:
        self.lp = livepatch
        self.store = desired

    def loaded(self, name: str, bundle: PatchBundle, raw: bytes, request_id: str | None) -> None:
        if self.store is not None:
            key_id = bundle.signature.key_id if bundle.signature is not None else None
            self.store.put(KIND, name, {"enabled": False, "key_id": key_id,
                                        "object_sha256": signing.object_digest(bundle.object)},
                           blob=raw, request_id=request_id)

    def record(self, name: str, changes: dict[str, Any], request_id: str | None) -> None:
        if self.store is None:
            return
        if self.store.get(KIND, name) is None:  # loaded outside the verbs (a test, an extension): not journaled
            return
        self.store.update(KIND, name, changes, request_id=request_id)

    def unloaded(self, name: str, request_id: str | None) -> None:
        if self.store is not None:
            self.store.delete(KIND, name, request_id=request_id)

    def held_back(self, name: str, why: dict[str, Any]) -> None:
        """Disabled by the crash-loop guard: at this boot and the boots after it, until an operator enables it."""
        if self.store is not None:
            self.store.update(KIND, name, {"enabled": False, "held_back": why})

    def completed(self, name: str, target: str) -> None:
        """The store follows what a transition ended in (a reversal by the stall policy included)."""
        if self.store is None:
            return
        with self.lp.lock, self.store.batch():
            items = {i.key: i for i in self.store.items(KIND)}
            if name in items and target == "patched":  # enabled_at: what the crash-loop guard compares a panic to
                self.store.update(KIND, name, {"enabled": True, "enabled_at": time.time()})
            elif name in items and items[name].doc.get("enabled"):
                self.store.update(KIND, name, {"enabled": False})
            patch = next((p for p in self.lp.patches if p.name == name), None)
            if target == "patched" and patch is not None and patch.replace:
                for other in self.lp.patches:
                    if other is not patch and other.replaced and other.name in items:
                        self.store.update(KIND, other.name, {"enabled": False, "replaced": True})

    def desired_enabled(self, name: str) -> bool | None:
        item = self.store.get(KIND, name) if self.store is not None else None
        return None if item is None else bool(item.doc.get("enabled"))

    def items(self) -> list[Item]:
        return self.store.items(KIND) if self.store is not None else []
