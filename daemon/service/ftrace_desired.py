"""The ftrace API's desired state: the kinds its ops and hijacks are stored under in the :class:`DesiredState`
store, what each change records there, the tombstone a removal leaves, and the check for a replayed request whose
change already reached the store."""

from __future__ import annotations

from typing import Any

from daemon.service.pipeline.core import RequestContext
from daemon.service.store.desired import DesiredState, Item

KIND_OPS = "ftrace.ops"
KIND_HIJACK = "ftrace.hijack"
KIND_SYSCTL = "ftrace.sysctl"
"""Desired-state kinds (key: the ops or hijack name; for the sysctl, ``ftrace_enabled``)."""
TOMBSTONES_KEPT = 1000
"""Per kind: a replay after a crash concerns the last few requests only; older tombstones are forgotten."""


class FtraceDesired:
    """Part of :class:`~daemon.service.ftrace_verbs.FtraceVerbs`: its records in the desired-state store."""

    desired: DesiredState | None  # set by FtraceVerbs.__init__

    # -- desired state ---------------------------------------------------------------------------------------

    def _already(self, ctx: RequestContext) -> bool:
        """A replayed request whose change reached the store before the crash (and was restored at boot)."""
        return ctx.replayed and self.desired is not None and self.desired.applied(ctx.request_id)

    def _record(self, kind: str, key: str, doc: dict[str, Any], ctx: RequestContext) -> None:
        if self.desired is not None:
            with self.desired.batch():
                self.desired.put(kind, key, doc, request_id=ctx.request_id)
                if "last" in doc:
                    self.desired.forget_tombstones(kind, TOMBSTONES_KEPT)

    def _tombstone(self, kind: str, key: str) -> Item | None:
        item = self.desired.get(kind, key) if self.desired is not None else None
        return item if item is not None and "last" in item.doc else None
