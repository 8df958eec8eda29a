"""What the engine needs from hosts: the host API's patch verbs, behind one seam.

``MqttDriver`` (``clients.rollout.mqtt_driver``) speaks to real daemons; ``SimDriver`` (``clients.rollout.sim``)
is the seeded twin a rehearsal runs against on the simulated clock. Every mutating call carries a request id
derived from (rollout, host, step, attempt): sent again after a crash, the daemon answers it from its journal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from clients.rollout.plan import HostInfo


@dataclass(frozen=True)
class Outcome:
    """A host's reply: ``ok``, or the daemon's error ``code`` and ``message``."""

    ok: bool
    code: str | None = None
    message: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TransitionView:
    completed: bool
    enabled: bool
    blocked: list[dict[str, Any]] = field(default_factory=list)
    signals_sent: int = 0


class HostDriver(Protocol):
    """Every call answers (never raises for a host's refusal): a call that got no reply within its deadline is
    ``Outcome(ok=False, code=TIMEOUT)``; ``check`` answers ``data = {"would_stall": bool, "tasks": [...]}`` and
    ``effect`` answers ``data = {"verified": bool, ...}``."""

    async def fleet(self) -> dict[str, HostInfo]: ...

    async def load(self, host: str, bundle_b64: str, request_id: str, timeout_s: float) -> Outcome: ...

    async def enable(self, host: str, patch: str, request_id: str, timeout_s: float) -> Outcome: ...

    async def transition(self, host: str, patch: str) -> TransitionView | Outcome: ...

    async def disable(self, host: str, patch: str, request_id: str) -> Outcome: ...

    async def unload(self, host: str, patch: str, request_id: str) -> Outcome: ...

    async def force(self, host: str, patch: str, request_id: str) -> Outcome: ...

    async def check(self, host: str, patch: str) -> Outcome: ...

    async def predict(self, host: str, functions: list[tuple[str, int]]) -> Outcome:
        """``check`` before anything is loaded: the transition of a patch replacing ``functions`` (read-only)."""
        ...

    async def effect(self, host: str, patch: str) -> Outcome: ...

    async def patches(self, host: str) -> Outcome:
        """``patch.list``: ``data = {"patches": [{"name", "enabled", "replaced", ...}, ...]}`` in stack order."""
        ...


TIMEOUT = "timeout"
"""The code of an ``Outcome`` that got no reply in time (the host may or may not have acted)."""

REJECT_CODES = frozenset({
    "patch_signature_missing", "patch_signature_untrusted", "patch_signature_invalid", "patch_object_tampered",
    "patch_manifest_tampered", "patch_bundle_malformed", "patch_manifest_invalid", "module_bad_elf",
    "patch_build_id_mismatch", "patch_func_missing", "patch_old_func_not_found", "patch_old_func_ambiguous",
    "patch_old_func_not_traceable", "livepatch_incompatible", "bundle_invalid",
})
"""Host refusals that no retry can change: the execution is REJECTED."""
