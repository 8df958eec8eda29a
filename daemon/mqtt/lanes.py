"""Two lanes for requests: reads never wait behind changes, and where a request's time goes.

A change (a verb ``schemas.VERBS`` marks ``mutating``) runs one at a time in the service (the ``ftrace_lock``
analogue) and may take tens of ms (an update plan, a stop-machine batch, an fsync before its PUBACK); a read
takes well under a millisecond of the event loop. One shared limit on running requests let a burst of changes
hold every slot, so the reads that arrived behind them waited in the receive loop. Each lane has its own limit:
a full change lane parks further changes here (up to ``backlog``, then the receive loop waits, so a flood
still waits in the broker rather than in memory) while reads keep being dispatched.

``lpd_request_stage_seconds{lane, stage}`` times each request on its way through the bridge:

* ``dispatch``: taken off the client's message queue -> its task running (time waiting for a lane slot, and
  for the event loop);
* ``service``: ``Service.handle`` (parse, journal, execution, reply built);
* ``reply``: the reply's publish until the broker's PUBACK.

The client's round trip minus these three is the broker, the sockets and the event loop's delay in reading
the request off its socket.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Coroutine
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Histogram

from schemas import VERBS

Lane = Literal["read", "change"]
STAGE_BUCKETS = (0.00005, 0.0001, 0.0002, 0.0003, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075,
                 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


def lane_of(verb: str) -> Lane:
    """``change`` for a mutating verb; every other request (reads, unknown verbs: refused at once) is a read."""
    spec = VERBS.get(verb)
    return "change" if spec is not None and spec.mutating else "read"


class Stages:
    """The per-stage histogram, in the daemon's metrics registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.histogram = Histogram("lpd_request_stage_seconds",
                                   "Time per request and stage in the MQTT bridge: dispatch (message queue to "
                                   "task), service (Service.handle), reply (publish to PUBACK)",
                                   ["lane", "stage"], buckets=STAGE_BUCKETS, registry=registry)
        self._children = {(lane, stage): self.histogram.labels(lane, stage)
                          for lane in ("read", "change") for stage in ("dispatch", "service", "reply")}

    def observe(self, lane: Lane, stage: str, seconds: float) -> None:
        self._children[(lane, stage)].observe(seconds)


Start = Callable[[], Coroutine[Any, Any, None]]


class Lanes:
    """Runs request coroutines in two lanes, each with its own limit on how many run at once."""

    def __init__(self, *, reads: int, changes: int, backlog: int) -> None:
        self._limit: dict[Lane, int] = {"read": max(1, reads), "change": max(1, changes)}
        self._running: dict[Lane, int] = {"read": 0, "change": 0}
        self._parked: collections.deque[tuple[Lane, Start]] = collections.deque()
        self._backlog = max(0, backlog)
        self._freed = asyncio.Event()
        self.spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]] | None = None
        """Creates the task of a request (the bridge's TaskGroup); set before the first ``submit``."""
        self.active: set[asyncio.Task[None]] = set()

    def running(self, lane: Lane) -> int:
        return self._running[lane]

    @property
    def parked(self) -> int:
        return len(self._parked)

    async def submit(self, lane: Lane, start: Start) -> None:
        """Start ``start()`` in ``lane`` now if it has room; otherwise park it (it starts when a slot frees). Waits
        only for room of the same lane, and only when that lane's backlog is full too (a read never waits for
        a change)."""
        while self._running[lane] >= self._limit[lane] and (lane == "read" or len(self._parked) >= self._backlog):
            self._freed.clear()
            await self._freed.wait()
        if self._running[lane] < self._limit[lane]:
            self._start(lane, start)
        else:
            self._parked.append((lane, start))

    def _start(self, lane: Lane, start: Start) -> None:
        assert self.spawn is not None
        self._running[lane] += 1
        task = self.spawn(start())
        self.active.add(task)
        task.add_done_callback(lambda t: self._done(lane, t))

    def _done(self, lane: Lane, task: asyncio.Task[None]) -> None:
        self.active.discard(task)
        self._running[lane] -= 1
        if self._parked and self._running["change"] < self._limit["change"]:
            parked_lane, start = self._parked.popleft()
            self._start(parked_lane, start)
        self._freed.set()

    def drop_parked(self) -> int:
        """Forget the parked changes (stopping: they were not acknowledged, the broker hands them out again)."""
        n = len(self._parked)
        self._parked.clear()
        return n
