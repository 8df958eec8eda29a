"""What :class:`~daemon.service.patch_verbs.PatchVerbs` tells subscribers: the events of live patches (Livepatch's
own, held back while a handler runs so that they follow the handler's) and the retained state's
``components.livepatch`` section."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from daemon.livepatch.core import Livepatch
from daemon.livepatch.transition import STATE_NAMES, Transition
from daemon.service.core import Service
from daemon.service.patch_desired import RestoreReport
from schemas.patch_verbs import PatchSummary


class PatchEvents:
    """Part of :class:`~daemon.service.patch_verbs.PatchVerbs`: its events and its section of the state."""

    # set by PatchVerbs.__init__
    service: Service
    lp: Livepatch
    restored: RestoreReport | None
    _local: threading.local
    _started: dict[str, float]
    _key_ids: dict[str, str | None]
    _forcing: set[str]
    also_publish: list[Callable[[], None]]
    """Other sections that a patch change moves (ftrace's counts of ops and enabled functions)."""

    if TYPE_CHECKING:  # defined by PatchDesired, TransitionWatch and PatchViews
        def _completed_in_desired(self, name: str, target: str) -> None: ...
        def _stalled(self, tr: Transition) -> bool: ...
        def _summaries(self) -> list[PatchSummary]: ...

    # -- events and state ------------------------------------------------------------------------------------

    def emit(self, type_: str, **data: Any) -> None:
        self.service.events.emit(type_, **data)

    @contextlib.contextmanager
    def _held(self) -> Iterator[None]:
        """Hold back Livepatch's events raised by this thread (a completion inside ``enable()``) so that they
        follow the handler's own (enabled, transition started); released in order on exit."""
        outer = getattr(self._local, "held", None)
        held: list[tuple[str, dict[str, object]]] = []
        self._local.held = held
        try:
            yield
        finally:
            self._local.held = outer
            for event, data in held:
                self._handle_livepatch_event(event, data)

    def _on_livepatch_event(self, event: str, data: dict[str, object]) -> None:
        held = getattr(self._local, "held", None)
        if held is not None:
            held.append((event, data))
        else:
            self._handle_livepatch_event(event, data)

    def _handle_livepatch_event(self, event: str, data: dict[str, object]) -> None:
        name = str(data.get("patch"))
        if event == "loaded":
            with self.lp.lock:
                patch = next((p for p in self.lp.patches if p.name == name), None)
                extra: dict[str, Any] = {} if patch is None else {
                    "key_id": self._key_ids.get(name), "replace": patch.replace,
                    "funcs": [f.sysfs_name for f in patch.funcs() if not f.nop]}
            self.emit("patch.loaded", patch=name, **extra)
        elif event == "unloaded":
            self._key_ids.pop(name, None)
            self.emit("patch.unloaded", patch=name)
        elif event == "transition_complete":
            target = str(data.get("target"))
            started = self._started.pop(name, None)
            self._completed_in_desired(name, target)
            metrics = self.service.metrics
            metrics.transitions.labels(target, "forced" if name in self._forcing else "completed").inc()
            if started is not None:
                metrics.transition_duration.labels(target).observe(time.monotonic() - started)
            self.emit("patch.transition.completed", patch=name, target=target,
                      duration_s=None if started is None else round(time.monotonic() - started, 6))
        self.publish()

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
                    "stalled": self._stalled(tr), "blocked": sorted(tr.blocked)},
                "trusted_keys": len(self.lp.trusted_keys or []),
            }
        if self.restored is not None:
            section["restored"] = {"loaded": self.restored.loaded, "enabled": self.restored.enabled,
                                   "failed": self.restored.failed, "held_back": self.restored.held_back}
        self.service.state.set_component("livepatch", section)
        for publish in self.also_publish:
            publish()
