"""What :class:`~daemon.service.patch_verbs.PatchVerbs` tells subscribers: Livepatch's events translated into the
``patch.*`` events of the wire, and the retained state's ``components.livepatch`` section.

Livepatch is the source of every transition event (started, blocked, stalled, reversed, completed: its driver
sees them happen) and tells its one subscriber, :meth:`PatchEvents._on_livepatch_event`, synchronously and in
order. A request's own events (``patch.enabled`` / ``patch.disabled``, with its ``request_id``) are sent when
the transition that request starts is announced, so they come first: :attr:`PatchEvents._change` names the
request whose change is being made while ``Livepatch.enable``/``disable`` runs (under Livepatch's lock, so one
at a time). A transition started without a request (the restore at boot) announces nothing but its completion.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import structlog

from daemon.livepatch.core import Livepatch
from daemon.livepatch.transition import STATE_NAMES
from daemon.service.patch_desired import RestoreReport
from daemon.service.pipeline.core import Service
from schemas.livepatch import BlockedTask, PatchSummary

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Change:
    """The request whose change Livepatch is making right now (enable or disable of ``patch``)."""

    op: Literal["enable", "disable"]
    patch: str
    request_id: str | None


class PatchEvents:
    """Part of :class:`~daemon.service.patch_verbs.PatchVerbs`: its events and its section of the state."""

    # set by PatchVerbs.__init__
    service: Service
    lp: Livepatch
    restored: RestoreReport | None
    _change: Change | None
    _started: dict[str, float]
    _key_ids: dict[str, str | None]
    _forcing: set[str]
    also_publish: list[Callable[[], None]]
    """Other sections that a patch change moves (ftrace's counts of ops and enabled functions)."""

    if TYPE_CHECKING:  # defined by PatchDesired and PatchViews
        def _completed_in_desired(self, name: str, target: str) -> None: ...
        def _summaries(self) -> list[PatchSummary]: ...
        def _blocked_tasks(self, blocked: dict[int, str]) -> list[BlockedTask]: ...

    # -- events and state ------------------------------------------------------------------------------------

    def emit(self, type_: str, **data: Any) -> None:
        self.service.events.emit(type_, **data)

    def _on_livepatch_event(self, event: str, data: dict[str, Any]) -> None:
        """Livepatch's subscriber (called with its lock held, on the thread that made the change)."""
        name = str(data["patch"])
        if event == "loaded":
            self._key_ids[name] = data["key_id"]
            self.emit("patch.loaded", patch=name, key_id=data["key_id"], replace=data["replace"],
                      funcs=data["funcs"])
        elif event == "unloaded":
            self._key_ids.pop(name, None)
            self.emit("patch.unloaded", patch=name)
        elif event == "transition_started":
            self._transition_started(name, str(data["target"]), reversal=bool(data["reversal"]))
        elif event == "transition_reversed":
            self._transition_reversed(name, str(data["target"]), str(data["by"]))
        elif event == "transition_stalled":
            blocked = [b.model_dump() for b in self._blocked_tasks(data["blocked"])]
            self.service.metrics.transition_stalls.inc()
            log.warning("transition_stalled", patch=name, target=data["target"], waited_s=data["waited_s"],
                        blocked=blocked)
            self.emit("patch.transition.stalled", patch=name, target=data["target"], waited_s=data["waited_s"],
                      blocked=blocked)
        elif event == "transition_complete":
            self._transition_completed(name, str(data["target"]))
        self.publish()  # transition_blocked included: the section lists the blocking tasks

    def _transition_started(self, name: str, target: str, *, reversal: bool) -> None:
        change = self._change
        if reversal or change is None or change.patch != name:
            return  # a reversal was announced as such; the restore at boot announces completions only
        self._started[name] = time.monotonic()
        if change.op == "enable":
            self.emit("patch.enabled", patch=name, request_id=change.request_id)
        else:
            self.emit("patch.disabled", patch=name, request_id=change.request_id, reversed=False)
        self.emit("patch.transition.started", patch=name, target=target)

    def _transition_reversed(self, name: str, target: str, by: str) -> None:
        self._started[name] = time.monotonic()
        change = self._change
        if by == "policy" or change is None:
            self.service.metrics.transition_reversals.labels("policy").inc()
            self.emit("patch.transition.reversed", patch=name, target=target, by="policy")
        elif change.op == "disable":
            self.emit("patch.disabled", patch=name, request_id=change.request_id, reversed=True)
            self.service.metrics.transition_reversals.labels("request").inc()
            self.emit("patch.transition.reversed", patch=name, target=target, by="request")
        else:  # enable during its own unpatching: told as an enable whose patching transition starts
            self.emit("patch.enabled", patch=name, request_id=change.request_id)
            self.emit("patch.transition.started", patch=name, target=target)

    def _transition_completed(self, name: str, target: str) -> None:
        started = self._started.pop(name, None)
        self._completed_in_desired(name, target)
        metrics = self.service.metrics
        metrics.transitions.labels(target, "forced" if name in self._forcing else "completed").inc()
        if started is not None:
            metrics.transition_duration.labels(target).observe(time.monotonic() - started)
        self.emit("patch.transition.completed", patch=name, target=target,
                  duration_s=None if started is None else round(time.monotonic() - started, 6))

    def publish(self) -> None:
        """Republish ``components.livepatch`` (a no-op when nothing changed)."""
        with self.lp.lock:
            tr = self.lp.transition
            gauge = self.service.metrics.livepatches
            gauge.labels("enabled").set(sum(p.enabled for p in self.lp.patches))
            gauge.labels("disabled").set(sum(not p.enabled for p in self.lp.patches))
            gauge.labels("transition").set(int(tr is not None))
            section: dict[str, Any] = {
                "patches": [s.model_dump(mode="json") for s in self._summaries()],
                "transition": None if tr is None else {
                    "patch": tr.patch.name, "target": STATE_NAMES.get(tr.target, str(tr.target)),
                    "stalled": self.lp.is_stalled(tr), "blocked": sorted(tr.blocked)},
                "trusted_keys": len(self.lp.trusted_keys or []),
            }
        if self.restored is not None:
            section["restored"] = {"loaded": self.restored.loaded, "enabled": self.restored.enabled,
                                   "failed": self.restored.failed, "held_back": self.restored.held_back}
        self.service.state.set_component("livepatch", section)
        for publish in self.also_publish:
            publish()
