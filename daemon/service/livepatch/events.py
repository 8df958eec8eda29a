"""Livepatch's events translated into the ``patch.*`` events of the wire (types in
``schemas.livepatch.PatchEventType``), with the metrics and desired-state records a transition's end moves.

Livepatch is the source of every transition event (started, blocked, stalled, reversed, completed: its driver
sees them happen) and tells this subscriber, :meth:`PatchEvents.on_livepatch_event`, synchronously and in
order. A request's own events (``patch.enabled`` / ``patch.disabled``, with its ``request_id``) are sent when
the transition that request starts is announced, so they come first: :meth:`PatchEvents.making` names the
request whose change is being made while ``Livepatch.enable``/``disable`` runs (under Livepatch's lock, so one
at a time). A transition started without a request (the restore at boot) announces nothing but its completion.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import structlog

from daemon.service.livepatch.desired import PatchRecorder
from daemon.service.livepatch.views import PatchViews
from daemon.service.pipeline.metrics import Metrics
from daemon.service.pipeline.outbox import EventLog

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Change:
    """The request whose change Livepatch is making right now (enable or disable of ``patch``)."""

    op: Literal["enable", "disable"]
    patch: str
    request_id: str | None


class PatchEvents:
    """The subscriber of one Livepatch (``on_livepatch_event``); ``publish`` republishes the state section."""

    def __init__(self, events: EventLog, metrics: Metrics, views: PatchViews, recorder: PatchRecorder,
                 *, key_ids: dict[str, str | None], publish: Callable[[], None]) -> None:
        self.events = events
        self.metrics = metrics
        self.views = views
        self.recorder = recorder
        self.key_ids = key_ids
        self.publish = publish
        self._change: Change | None = None  # the request whose enable/disable Livepatch is making (lp.lock held)
        self._started: dict[str, float] = {}  # patch -> when its current transition started (or reversed)
        self._forcing: set[str] = set()  # patches being forced (their completion counts as forced)

    @contextlib.contextmanager
    def making(self, change: Change) -> Iterator[None]:
        """While a request's enable or disable runs (``lp.lock`` held): its events go with its transition."""
        self._change = change
        try:
            yield
        finally:
            self._change = None

    @contextlib.contextmanager
    def forcing(self, name: str) -> Iterator[None]:
        """While ``name`` is forced: the completion it causes is counted as forced."""
        self._forcing.add(name)
        try:
            yield
        finally:
            self._forcing.discard(name)

    def started_now(self, name: str) -> None:
        """A transition started without a request (the restore at boot): its completion is timed from now."""
        self._started[name] = time.monotonic()

    def emit(self, type_: str, **data: Any) -> None:
        self.events.emit(type_, **data)

    def on_livepatch_event(self, event: str, data: dict[str, Any]) -> None:
        """Livepatch's subscriber (called with its lock held, on the thread that made the change)."""
        name = str(data["patch"])
        if event == "loaded":
            self.key_ids[name] = data["key_id"]
            self.emit("patch.loaded", patch=name, key_id=data["key_id"], replace=data["replace"],
                      funcs=data["funcs"])
        elif event == "unloaded":
            self.key_ids.pop(name, None)
            self.emit("patch.unloaded", patch=name)
        elif event == "transition_started":
            self._transition_started(name, str(data["target"]), reversal=bool(data["reversal"]))
        elif event == "transition_reversed":
            self._transition_reversed(name, str(data["target"]), str(data["by"]))
        elif event == "transition_stalled":
            blocked = [b.model_dump() for b in self.views.blocked_tasks(data["blocked"])]
            self.metrics.transition_stalls.inc()
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
            self.metrics.transition_reversals.labels("policy").inc()
            self.emit("patch.transition.reversed", patch=name, target=target, by="policy")
        elif change.op == "disable":
            self.emit("patch.disabled", patch=name, request_id=change.request_id, reversed=True)
            self.metrics.transition_reversals.labels("request").inc()
            self.emit("patch.transition.reversed", patch=name, target=target, by="request")
        else:  # enable during its own unpatching: told as an enable whose patching transition starts
            self.emit("patch.enabled", patch=name, request_id=change.request_id)
            self.emit("patch.transition.started", patch=name, target=target)

    def _transition_completed(self, name: str, target: str) -> None:
        started = self._started.pop(name, None)
        self.recorder.completed(name, target)
        metrics = self.metrics
        metrics.transitions.labels(target, "forced" if name in self._forcing else "completed").inc()
        if started is not None:
            metrics.transition_duration.labels(target).observe(time.monotonic() - started)
        self.emit("patch.transition.completed", patch=name, target=target,
                  duration_s=None if started is None else round(time.monotonic() - started, 6))
