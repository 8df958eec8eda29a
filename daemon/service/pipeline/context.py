"""What a handler is given besides its request."""

from __future__ import annotations

from dataclasses import dataclass

from daemon.service.pipeline.outbox import EventLog, StateBoard


@dataclass(frozen=True)
class RequestContext:
    """What a handler may use besides its request: who asked, and the daemon's state and event outlets."""

    request_id: str
    verb: str
    replayed: bool
    state: StateBoard
    events: EventLog
