"""Documents the daemon publishes on its own: retained ``status`` and ``state``, and ``events``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from schemas._base import SCHEMA_VERSION, HostId, Outbound


class StatusDoc(Outbound):
    """Retained on ``status``: the birth (``online``) and the death (``offline``, also the last will).

    A death pairs with the birth that carries the same ``boot_seq`` (Sparkplug's bdSeq rule), so a stale
    last will from an earlier run can never be mistaken for the current daemon going away.
    """

    schema_version: int = SCHEMA_VERSION
    host: HostId
    state: Literal["online", "offline"]
    boot_seq: int
    reason: Literal["started", "reconnected", "shutdown", "connection_lost"]
    time: float = Field(description="Unix time at which the document was made (for the will: at connect)")
    version: str = Field(description="livepatchd version")


class KernelState(Outbound):
    build_id: str
    release: str = Field(default="", description="the kernel build's version string (e.g. 6.1-lp1)")
    arch: str = "arm64"
    nr_cpus: int
    booted_at: float


class StateDoc(Outbound):
    """Retained on ``state``: every host-visible fact, versioned. ``version`` only grows, across restarts.

    ``components`` carries one section per subsystem (ftrace, livepatch, …), each a JSON object that its
    owner documents; a dashboard can be built from this document alone.
    """

    schema_version: int = SCHEMA_VERSION
    host: HostId
    version: int
    boot_seq: int
    time: float
    kernel: KernelState
    components: dict[str, dict[str, Any]] = Field(default_factory=dict)


EventType = Literal[
    "daemon.started",      # data: boot_seq, replayed (requests re-executed from the journal)
    "daemon.stopping",     # data: reason
    "broker.reconnected",  # data: attempts, outage_s, redelivered (replies published from the journal)
    "request.replayed",    # data: request_id, verb, ok
    "request.failed",      # data: request_id, verb, code (a failed mutating request)
]


class EventDoc(Outbound):
    """Published on ``events`` (not retained). ``seq`` grows by one per event within a boot: a gap is a loss."""

    schema_version: int = SCHEMA_VERSION
    host: HostId
    boot_seq: int
    seq: int
    time: float
    type: str = Field(description="dotted event name; see EventType for the ones this version emits")
    data: dict[str, Any] = Field(default_factory=dict)
