"""What a handler is given besides its request, and how a subsystem hands its handlers to the service."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from daemon.service.pipeline.outbox import EventLog, StateBoard

VerbTable = Mapping[str, Callable[..., Any]]
"""A subsystem's verbs: verb name (in ``schemas.VERBS``) -> ``handler(request, ctx) -> data``, usually bound
methods of the subsystem's objects. ``Service.serve`` merges the tables; a verb served twice is refused."""


@dataclass(frozen=True)
class RequestContext:
    """What a handler may use besides its request: who asked, and the daemon's state and event outlets."""

    request_id: str
    verb: str
    replayed: bool
    state: StateBoard
    events: EventLog
    already_applied: bool = False
    """A request replayed after a crash whose change had already reached the desired-state store (and was
    restored at boot): the handler answers from the current state and must not apply it twice. Decided once, by
    the service, for every verb (``DesiredState.applied``)."""
