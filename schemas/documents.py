"""Documents the daemon publishes on its own: retained ``status`` and ``state``, and ``events``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from schemas._base import SCHEMA_VERSION, HostId, Outbound
from schemas.events import EVENTS
from schemas.fleet import FleetSection, LabelsSection
from schemas.ftrace import FtraceSection
from schemas.kprobes import KprobesSection
from schemas.livepatch import LivepatchSection
from schemas.patch_insight import PatchEffectSection
from schemas.retprobes import FprobesSection, KretprobesSection

STALE_AFTER_BEATS = 3
"""A host whose last heartbeat is older than this many heartbeat periods is ``stale``: it said online, but it has
not said so lately (a broker node died with its connection, so no last will was published; a partition)."""

Liveness = Literal["online", "stale", "offline"]


class StatusDoc(Outbound):
    """Retained on ``status``: the birth (``online``), the heartbeats, and the death (``offline``, also the last
    will).

    A death pairs with the birth that carries the same ``boot_seq`` (Sparkplug's bdSeq rule), so a stale
    last will from an earlier run can never be mistaken for the current daemon going away. While online, the
    daemon publishes the document again every ``heartbeat_s`` seconds (``beat`` 1, 2, …; MQTT 5 gives it a message
    expiry): ``liveness()`` tells an online host that stopped beating (``stale``) from one that is alive.
    """

    schema_version: int = SCHEMA_VERSION
    host: HostId
    state: Literal["online", "offline"]
    boot_seq: int
    reason: Literal["started", "reconnected", "shutdown", "connection_lost"]
    time: float | None = Field(description="Unix time at which the document was made; null in the last will, "
                               "whose time cannot be known when it is registered (at connect): the broker "
                               "publishes it later, when it notices the connection is gone")
    version: str = Field(description="livepatchd version")
    beat: int = Field(default=0, ge=0, description="0: the birth (the daemon has just subscribed); 1, 2, …: the "
                      "heartbeats that follow on the same connection")
    heartbeat_at: float | None = Field(default=None, description="Unix time of this heartbeat (online only)")
    degraded: bool = Field(default=False, description="online, but some vCPUs stopped for good (dead_cpus)")
    dead_cpus: list[int] = Field(default_factory=list, description="the vCPUs that stopped for good")
    heartbeat_s: float | None = Field(default=None, description="the heartbeat period; stale after "
                                      f"{STALE_AFTER_BEATS} periods without one")

    @property
    def birth(self) -> bool:
        return self.state == "online" and self.beat == 0

    def liveness(self, now: float) -> Liveness:
        """``offline``; ``stale`` when online but the last heartbeat is older than ``STALE_AFTER_BEATS`` periods
        (``now`` and ``heartbeat_at`` are wall-clock times: the rule assumes clocks within a period of each other);
        else ``online`` (also for a daemon too old to beat)."""
        if self.state == "offline":
            return "offline"
        if self.heartbeat_at is None or self.heartbeat_s is None:
            return "online"
        return "stale" if now - self.heartbeat_at > STALE_AFTER_BEATS * self.heartbeat_s else "online"


class KernelState(Outbound):
    build_id: str
    release: str = Field(default="", description="the kernel build's version string (e.g. 6.1-lp1)")
    arch: str = "arm64"
    nr_cpus: int
    booted_at: float
    dead_cpus: list[int] = Field(default_factory=list, description="vCPUs stopped for good (a fault outside a "
                                 "job): the host is degraded, the others still serve")


COMPONENTS: dict[str, type[BaseModel]] = {"livepatch": LivepatchSection, "ftrace": FtraceSection,
                                           "patch_effect": PatchEffectSection, "kprobes": KprobesSection,
                                           "kretprobes": KretprobesSection, "fprobes": FprobesSection,
                                           "labels": LabelsSection, "fleet": FleetSection}
"""The sections of ``StateDoc.components`` this schema version defines, by name -> their model (every section
the daemon publishes has one; ``labels`` is a plain name -> value object, a root model)."""


class StateDoc(Outbound):
    """Retained on ``state``: every host-visible fact, versioned. ``version`` only grows, across restarts.

    ``components`` carries one section per subsystem (``livepatch``: :class:`~schemas.livepatch.LivepatchSection`,
    ``ftrace``: :class:`~schemas.ftrace.FtraceSection`, ``patch_effect``:
    :class:`~schemas.patch_insight.PatchEffectSection`, see ``COMPONENTS``); a dashboard can be built from this
    document alone. The sections stay JSON objects here (a client of an older schema still reads a newer
    document); ``section(name)`` gives one as its model.
    """

    schema_version: int = SCHEMA_VERSION
    host: HostId
    version: int
    boot_seq: int
    time: float
    kernel: KernelState
    components: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="one section per subsystem, each following its model (COMPONENTS; the "
        "exported schema names them); other sections are objects their owners document")

    def section(self, name: str) -> BaseModel | None:
        """Section ``name`` as its model (``COMPONENTS``); None when the document has no such section. KeyError
        for a section this schema version does not define."""
        model = COMPONENTS[name]
        section = self.components.get(name)
        return None if section is None else model.model_validate(section)


EventType = Literal[
    "daemon.started",      # data: boot_seq, replayed (requests re-executed from the journal)
    "daemon.stopping",     # data: reason
    "broker.reconnected",  # data: attempts, outage_s, redelivered (replies published from the journal)
    "request.replayed",    # data: request_id, verb, ok
    "request.failed",      # data: request_id, verb, code (a failed mutating request)
    "request.unreadable",  # data: request_id, verb, why (a journaled request answered journal_unreadable at start)
    "reply.dropped",       # data: request_id, verb, why (a reply that could not be published, given up)
]


class EventDoc(Outbound):
    """Published on ``events`` (not retained). ``seq`` grows by one per event within a boot: a gap is a loss."""

    schema_version: int = SCHEMA_VERSION
    host: HostId
    boot_seq: int
    seq: int
    time: float
    type: str = Field(description="dotted event name; schemas.events.EVENTS lists the ones this version emits")
    data: dict[str, Any] = Field(default_factory=dict, description="follows the model of its type (an "
                                 "*Event model: EVENTS[type]); kept an object here so that a client reads the "
                                 "envelope of a type it does not know")

    def typed_data(self) -> Outbound | None:
        """``data`` as its type's model; None for a type this schema version does not know."""
        model = EVENTS.get(self.type)
        return None if model is None else model.model_validate(self.data)
