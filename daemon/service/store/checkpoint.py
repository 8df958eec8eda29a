"""WAL checkpoints of the journal, kept out of the way of requests.

A checkpoint copies the WAL into the database file and fsyncs both: here ~1.6 ms of CPU and ~4.5 ms of wall
time per 250 requests' worth of WAL. Run every 0.25 s in the default thread pool, it delayed the requests that
arrived meanwhile by up to 3 ms — one request in a hundred, i.e. the whole p99 of ``info``. So a checkpoint
runs:

* when the journal has been quiet for ``idle_s`` (nobody waits then), or
* when ``max_commits`` commits piled up without such a pause, or the WAL outgrew ``max_wal_bytes`` (sustained
  load: the WAL must stay bounded, whatever the size of the rows — 4,000 commits of 4 KiB requests are 90 MiB),

in a thread of its own at the lowest CPU priority (nice 19), so the event loop and the broker go first. The
delivery marks that no request committed (``Journal.flush``) are committed at the same moments.

Under sustained load the background (PASSIVE) checkpoint never catches up with the writer, and SQLite only
starts a WAL over once it has been copied entirely: the WAL then grows without bound (2 GB after ~3 minutes). So
after a backlog checkpoint, the few frames written meanwhile are copied on the loop (``Journal.restart_wal``,
~1 ms once per ``max_commits``), which lets the next commit reuse the WAL from its start. A full disk is
logged and retried at the next tick, never raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import structlog

from daemon.service.pipeline.metrics import Metrics
from daemon.service.store.journal import WAL_SIZE_LIMIT, Journal

log = structlog.get_logger(__name__)

IDLE_S = 0.05
MAX_COMMITS = 4000  # ~2,000 requests, ~18 MiB of WAL with 1 KiB pages
MAX_WAL_BYTES = WAL_SIZE_LIMIT + (8 << 20)  # a reset WAL file keeps up to WAL_SIZE_LIMIT: only growth past it counts
TICK_S = 0.025
IDLE_TICK_S = 1.0
"""The tick once nothing has been committed for a while (doubling from ``TICK_S``): a fleet process holds a
thousand journals, and a 25 ms tick each was 40,000 wake-ups a second of an idle fleet."""


def _lowest_priority() -> None:
    # Linux: PRIO_PROCESS with a thread id sets that thread's nice value only.
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


class Checkpointer:
    def __init__(self, journal: Journal, *, idle_s: float = IDLE_S, max_commits: int = MAX_COMMITS,
                 max_wal_bytes: int = MAX_WAL_BYTES, metrics: Metrics | None = None) -> None:
        self.journal = journal
        self.max_wal_bytes = max_wal_bytes
        self.metrics = metrics
        self.idle_s = idle_s
        self.max_commits = max_commits
        self.checkpoints = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="journal-checkpoint", initializer=_lowest_priority)

    def due(self, now: float) -> bool:
        j = self.journal
        if j.commits == 0:
            return False
        return self._backlog() or now - j.last_commit >= self.idle_s

    def _backlog(self) -> bool:
        j = self.journal
        return j.commits >= self.max_commits or j.wal_bytes() >= self.max_wal_bytes

    async def run(self) -> None:
        """Until cancelled."""
        loop = asyncio.get_running_loop()
        tick = TICK_S
        try:
            while True:
                await asyncio.sleep(tick)
                # at most IDLE_TICK_S late after a quiet spell: not long enough for a backlog to pile up
                tick = min(IDLE_TICK_S, tick * 2) if self.journal.commits == 0 else TICK_S
                if not self.due(time.monotonic()):
                    continue
                trigger = "backlog" if self._backlog() else "idle"
                started = time.perf_counter()
                try:
                    self.journal.flush()
                    self.journal.commits = 0
                    await loop.run_in_executor(self._pool, self.journal.checkpoint)
                    if trigger == "backlog":
                        self.journal.restart_wal()
                except sqlite3.OperationalError as exc:
                    log.warning("journal_checkpoint_failed", error=str(exc), trigger=trigger)
                    self.journal.commits = 0
                    continue
                self.checkpoints += 1
                if self.metrics is not None:
                    self.metrics.checkpoint.labels(trigger).observe(time.perf_counter() - started)
        finally:
            self._pool.shutdown(wait=True)
