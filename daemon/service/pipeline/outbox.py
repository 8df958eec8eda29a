"""What the daemon publishes on its own: the versioned ``state`` document, the ``events`` stream and data streams
(trace batches).

Both may be fed from any thread (a blocking handler runs in a worker thread); changes are handed to the
event loop, where the MQTT adapter waits on the shared ``outgoing`` event and publishes.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog
from pydantic import RootModel

from daemon.service.store.journal import Journal
from schemas import EventDoc, KernelState, StateDoc
from schemas.documents import COMPONENTS
from schemas.events import check_event

log = structlog.get_logger(__name__)


class LoopHandoff:
    """Runs a board's changes on the event loop that publishes them: at once on the loop's own thread (or before
    ``attach``), handed over with ``call_soon_threadsafe`` from any other thread."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._loop_thread = threading.get_ident()

    def run(self, fn: Callable[[], None]) -> None:
        if self._loop is None or threading.get_ident() == self._loop_thread:
            fn()
        else:
            self._loop.call_soon_threadsafe(fn)


class StateBoard:
    """The retained state document. ``components`` sections are owned by subsystems (ftrace, livepatch, …)."""

    def __init__(self, journal: Journal, host: str, boot_seq: int, kernel: KernelState,
                 outgoing: asyncio.Event) -> None:
        self._outgoing = outgoing
        self._handoff = LoopHandoff()
        self._journal = journal
        self._host = host
        self._boot_seq = boot_seq
        self._kernel = kernel
        self._components: dict[str, dict[str, Any]] = {}
        self._doc: StateDoc | None = None
        self._dirty = True
        self.invalid: list[str] = []
        """Sections set that did not follow their model (each with why)."""

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind to the loop that publishes (changes from other threads are handed to it)."""
        self._handoff.attach(loop)

    def set_component(self, name: str, section: dict[str, Any]) -> None:
        """Replace one subsystem's section (thread-safe); the document is republished with a new version. A
        section that does not follow its model (``schemas.documents.COMPONENTS``) is a bug: logged and kept in
        ``invalid`` (the test fixtures fail on it), and published all the same."""
        model = COMPONENTS.get(name)
        if model is not None:  # None: an extension's section, documented by its owner
            try:
                if not issubclass(model, RootModel):  # a root model's keys are its data, not fields
                    unknown = sorted(set(section) - set(model.model_fields))
                    if unknown:
                        raise ValueError(f"fields {unknown} are not in {model.__name__}")
                model.model_validate(section)
            except ValueError as exc:  # pydantic's ValidationError included
                self.invalid.append(f"{name}: {exc}")
                log.error("state_section_invalid", section=name, error=str(exc))

        def apply() -> None:
            if self._components.get(name) != section:
                self._components[name] = section
                self._doc = None
                self._dirty = True
                self._outgoing.set()
        self._handoff.run(apply)

    @property
    def dead_cpus(self) -> list[int]:
        return list(self._kernel.dead_cpus)

    def cpu_died(self, cpu: int) -> None:
        """A vCPU stopped for good (thread-safe): the kernel section says so, the document is republished."""
        def apply() -> None:
            self._kernel = self._kernel.model_copy(update={"dead_cpus": sorted({*self._kernel.dead_cpus, cpu})})
            self._doc = None
            self._dirty = True
            self._outgoing.set()
        self._handoff.run(apply)

    def document(self) -> StateDoc:
        """The current document; a change since the last call gets the next version (persisted, never reused)."""
        if self._doc is None:
            self._doc = StateDoc(host=self._host, version=self._journal.next_state_version(), boot_seq=self._boot_seq,
                                 time=time.time(), kernel=self._kernel, components=dict(self._components))
        return self._doc

    def take_dirty(self) -> bool:
        """True once after each change: the publisher's cue to publish ``document()`` again."""
        dirty, self._dirty = self._dirty, False
        return dirty


class EventLog:
    """Events waiting to be published (bounded: the oldest are dropped first, the ``seq`` gap shows it)."""

    def __init__(self, host: str, boot_seq: int, outgoing: asyncio.Event, maxlen: int = 1000) -> None:
        self._outgoing = outgoing
        self._handoff = LoopHandoff()
        self._host = host
        self._boot_seq = boot_seq
        self._seq = 0
        self._pending: collections.deque[EventDoc] = collections.deque(maxlen=maxlen)
        self.listeners: list[Callable[[EventDoc], None]] = []
        """Called on the loop with each event as it is queued: in-process observers (a fleet host's faults)."""
        self.invalid: list[str] = []
        """Events emitted that did not follow their model (each with why)."""

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind to the loop that publishes (changes from other threads are handed to it)."""
        self._handoff.attach(loop)

    def emit(self, type_: str, **data: Any) -> None:
        """Queue an event (thread-safe). An event that does not follow its model (``schemas.events``) is a bug:
        logged and kept in ``invalid`` (the test fixtures fail on it), and still published."""
        try:
            check_event(type_, data)
        except ValueError as exc:  # pydantic's ValidationError included
            self.invalid.append(f"{type_}: {exc}")
            log.error("event_invalid", type=type_, error=str(exc))

        def apply() -> None:
            self._seq += 1
            event = EventDoc(host=self._host, boot_seq=self._boot_seq, seq=self._seq, time=time.time(), type=type_,
                             data=data)
            self._pending.append(event)
            self._outgoing.set()
            for listener in self.listeners:
                listener(event)
        self._handoff.run(apply)

    def peek(self) -> EventDoc | None:
        return self._pending[0] if self._pending else None

    def pop(self) -> None:
        self._pending.popleft()


class StreamBoard:
    """Messages for other topics (the ``trace`` stream): queued from any thread, published in order, at most
    ``maxlen`` waiting (a slow broker loses the oldest batches, never blocks the drainer)."""

    def __init__(self, outgoing: asyncio.Event, maxlen: int = 256) -> None:
        self._outgoing = outgoing
        self._handoff = LoopHandoff()
        self._pending: collections.deque[tuple[str, str]] = collections.deque(maxlen=maxlen)
        self.dropped = 0

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind to the loop that publishes (changes from other threads are handed to it)."""
        self._handoff.attach(loop)

    def put(self, topic: str, payload: str) -> None:
        """Queue one message (thread-safe)."""
        def apply() -> None:
            if len(self._pending) == self._pending.maxlen:
                self.dropped += 1
            self._pending.append((topic, payload))
            self._outgoing.set()
        self._handoff.run(apply)

    def peek(self) -> tuple[str, str] | None:
        return self._pending[0] if self._pending else None

    def pop(self) -> None:
        self._pending.popleft()
