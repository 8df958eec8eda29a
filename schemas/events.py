"""Every event type and the model of its ``data``: the daemon's own here, each subsystem's in its module.

An ``EventDoc`` keeps ``data`` as a JSON object on the wire, so that a client of an older schema reads the
envelope of an event type it does not know; ``EVENTS[type]`` (or ``EventDoc.typed_data()``) is the model that
``data`` follows for each type this version emits, and the daemon checks what it publishes against it.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from schemas import ftrace, kernel, kprobes, livepatch, retprobes
from schemas._base import Outbound


class DaemonStartedEvent(Outbound):
    """``daemon.started``: booted, restored and replayed; about to go online."""

    boot_seq: int
    replayed: int = Field(description="requests re-executed from the journal")


class DaemonStoppingEvent(Outbound):
    """``daemon.stopping``."""

    reason: str


class BrokerReconnectedEvent(Outbound):
    """``broker.reconnected``: online again after losing the broker."""

    attempts: int
    outage_s: float | None
    redelivered: int = Field(description="replies published from the journal after the reconnect")


class RequestReplayedEvent(Outbound):
    """``request.replayed``: a request accepted before a crash, executed at this boot."""

    request_id: str
    verb: str
    ok: bool


class RequestFailedEvent(Outbound):
    """``request.failed``: a mutating request answered with an error."""

    request_id: str | None
    verb: str
    code: str


class RequestUnreadableEvent(Outbound):
    """``request.unreadable``: a journaled request that could not be read back at start (an older version's or a
    damaged row), answered ``journal_unreadable`` instead of executed."""

    request_id: str
    verb: str
    why: str


class ReplyDroppedEvent(Outbound):
    """``reply.dropped``: a reply given up because it cannot be published (its journal row is unreadable, its
    topic is refused, or publishing it cost the connection again when it went out alone)."""

    request_id: str
    verb: str
    why: str


DAEMON_EVENTS: dict[str, type[Outbound]] = {
    "daemon.started": DaemonStartedEvent,
    "daemon.stopping": DaemonStoppingEvent,
    "broker.reconnected": BrokerReconnectedEvent,
    "request.replayed": RequestReplayedEvent,
    "request.failed": RequestFailedEvent,
    "request.unreadable": RequestUnreadableEvent,
    "reply.dropped": ReplyDroppedEvent,
}

EVENTS: dict[str, type[Outbound]] = {**DAEMON_EVENTS, **kernel.EVENTS, **ftrace.EVENTS, **livepatch.EVENTS,
                                     **kprobes.EVENTS, **retprobes.EVENTS}
"""Every event type this schema version emits -> the model of its ``data``."""


NAMESPACES = frozenset(t.split(".", 1)[0] for t in EVENTS)
"""The first parts of the event types this schema owns (``patch``, ``ftrace``, …). A type outside them is an
extension's (``Daemon(extensions=...)``), documented by its author."""


class UnknownEvent(ValueError):
    """An event type in this schema's namespaces that this schema version does not define."""


def check_event(type_: str, data: dict[str, Any]) -> Outbound | None:
    """``data`` as its type's model, or None for an extension's type (outside ``NAMESPACES``); ``UnknownEvent``
    for a type of the schema's namespaces not in ``EVENTS``, pydantic's ValidationError for data that does not
    follow the model, ValueError for a field the model does not define."""
    model = EVENTS.get(type_)
    if model is None:
        if type_.split(".", 1)[0] not in NAMESPACES:
            return None
        raise UnknownEvent(f"event type {type_!r} is not in schemas.events.EVENTS")
    unknown = sorted(set(data) - set(model.model_fields))
    if unknown:
        raise ValueError(f"event {type_}: fields {unknown} are not in {model.__name__}")
    return model.model_validate(data)
