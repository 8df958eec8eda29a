"""The ``livepatch`` section of the retained state document: the patches, the transition, the trusted keys and
what the restore at boot re-applied (and the patch gauges of the metrics)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from daemon.livepatch.core import Livepatch
from daemon.livepatch.transition import STATE_NAMES
from daemon.service.livepatch.desired import RestoreReport
from daemon.service.livepatch.views import PatchViews
from daemon.service.pipeline.metrics import Metrics
from daemon.service.pipeline.outbox import StateBoard


class LivepatchSection:
    """Builds and republishes ``components.livepatch``, then the other sections a patch change moves."""

    def __init__(self, state: StateBoard, metrics: Metrics, livepatch: Livepatch, views: PatchViews, *,
                 also_publish: Iterable[Callable[[], None]] = ()) -> None:
        self.state = state
        self.metrics = metrics
        self.lp = livepatch
        self.views = views
        self.restored: RestoreReport | None = None
        self.also_publish = list(also_publish)
        """Other sections that a patch change moves (ftrace's counts of ops and enabled functions)."""

    def publish(self) -> None:
        """Republish ``components.livepatch`` (a no-op when nothing changed)."""
        with self.lp.lock:
            tr = self.lp.transition
            gauge = self.metrics.livepatches
            gauge.labels("enabled").set(sum(p.enabled for p in self.lp.patches))
            gauge.labels("disabled").set(sum(not p.enabled for p in self.lp.patches))
            gauge.labels("transition").set(int(tr is not None))
            section: dict[str, Any] = {
                "patches": [s.model_dump(mode="json") for s in self.views.summaries()],
                "transition": None if tr is None else {
                    "patch": tr.patch.name, "target": STATE_NAMES.get(tr.target, str(tr.target)),
                    "stalled": self.lp.is_stalled(tr), "blocked": sorted(tr.blocked)},
                "trusted_keys": len(self.lp.trusted_keys or []),
            }
        if self.restored is not None:
            section["restored"] = {"loaded": self.restored.loaded, "enabled": self.restored.enabled,
                                   "failed": self.restored.failed, "held_back": self.restored.held_back}
        self.state.set_component("livepatch", section)
        for publish in self.also_publish:
            publish()
