"""The ftrace API's desired state: the kinds its ops, hijacks and sysctl are stored under in the
:class:`DesiredState` store, what each change records there, and the tombstone a removal leaves (what a
replayed removal, already applied before a crash, is answered with)."""

from __future__ import annotations

from typing import Any

from daemon.service.pipeline.context import RequestContext
from daemon.service.store.desired import DesiredState, Item
from schemas.ftrace import HijackDeleteRequest, HijackInfo

KIND_OPS = "ftrace.ops"
KIND_HIJACK = "ftrace.hijack"
KIND_SYSCTL = "ftrace.sysctl"
"""Desired-state kinds (key: the ops or hijack name; for the sysctl, ``ftrace_enabled``)."""
TOMBSTONES_KEPT = 1000
"""Per kind: a replay after a crash concerns the last few requests only; older tombstones are forgotten."""


class FtraceDesired:
    """The ftrace API's records in the desired-state store (none without a store: nothing survives a restart)."""

    def __init__(self, desired: DesiredState | None) -> None:
        self.store = desired

    def record(self, kind: str, key: str, doc: dict[str, Any], ctx: RequestContext) -> None:
        if self.store is not None:
            with self.store.batch():
                self.store.put(kind, key, doc, request_id=ctx.request_id)
                if "last" in doc:
                    self.store.forget_tombstones(kind, TOMBSTONES_KEPT)

    def tombstone(self, kind: str, key: str) -> Item | None:
        item = self.store.get(kind, key) if self.store is not None else None
        return item if item is not None and "last" in item.doc else None

    def deleted_hijack(self, req: HijackDeleteRequest) -> HijackInfo | None:
        """The last description of the hijack a replayed delete already removed."""
        items = self.store.items(KIND_HIJACK) if self.store is not None else []
        for item in items:
            last = item.doc.get("last")
            if last is not None and (item.key == req.name or (
                    req.name is None and last["function"] == req.function and last["sympos"] == req.sympos)):
                return HijackInfo.model_validate(last)
        return None

    def items(self) -> list[Item]:
        """What a restore re-applies, in order: the sysctl, then the ops, then the hijacks."""
        if self.store is None:
            return []
        return [*self.store.items(KIND_SYSCTL), *self.store.items(KIND_OPS), *self.store.items(KIND_HIJACK)]
