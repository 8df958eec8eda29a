"""Group fsync of the journal, off the event loop: how a mutating request becomes durable before its PUBACK
without making the requests behind it wait.

A mutating request's row is committed on the event loop like any other (``synchronous=NORMAL``: written to the
WAL, not fsynced); then ``GroupSync.durable()`` waits for an fsync of the WAL that began after that commit, run
in a thread of its own, and only then is the request acknowledged. An fsync takes 0.3 ms on an idle disk and
several ms while the desired state and checkpoints fsync too: done on the loop (``synchronous=FULL``), it stalled
every request behind it, ``info`` included, which had nothing to make durable. Every commit waiting when an
fsync begins is covered by it: under load one fsync serves many requests.

Why an fsync of the file gives what ``synchronous=FULL`` gives: a WAL commit writes its frames (and the WAL
header, when it starts the WAL over) with ``write()``; ``fsync`` flushes every dirty page of the file, whoever
wrote it. Frames copied into the database by a checkpoint are fsynced there by SQLite before the WAL is reused.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor


class GroupSync:
    """Makes commits durable in batches: ``ticket()`` right after a commit, ``await durable(ticket)`` before
    acknowledging it. An fsync that fails raises its ``OSError`` in every waiter it was to cover."""

    def __init__(self, fsync: Callable[[], None]) -> None:
        self._fsync = fsync
        self._pool: ThreadPoolExecutor | None = None
        self._committed = 0
        self._durable = 0
        self._running: tuple[asyncio.Future[None], int] | None = None  # the fsync under way, what it covers
        self.fsyncs = 0
        """fsyncs run (fewer than tickets under load: one covers every commit made before it began)."""

    def ticket(self) -> int:
        """Call right after a commit (on the loop): the number to wait for."""
        self._committed += 1
        return self._committed

    def pending(self) -> int:
        """The newest ticket: wait for it to cover every commit made so far."""
        return self._committed

    async def durable(self, ticket: int) -> None:
        """Return once an fsync that began after commit ``ticket`` has finished."""
        loop = asyncio.get_running_loop()
        while self._durable < ticket:
            if self._running is not None and self._running[0].done():
                # finished, its done callback not run yet: awaiting it would not yield, and this would spin
                self._settle(*self._running)
            if self._running is None:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix="journal-fsync")
                fut = loop.run_in_executor(self._pool, self._fsync)
                self._running = (fut, self._committed)
                fut.add_done_callback(functools.partial(self._done, self._committed))
            # shielded: a waiter cancelled (timeout, shutdown) does not cancel the others' fsync
            await asyncio.shield(self._running[0])

    def _done(self, covers: int, fut: asyncio.Future[None]) -> None:
        self._settle(fut, covers)

    def _settle(self, fut: asyncio.Future[None], covers: int) -> None:
        if self._running is None or self._running[0] is not fut:
            return  # settled already
        self._running = None
        self.fsyncs += 1
        if not fut.cancelled() and fut.exception() is None:
            self._durable = max(self._durable, covers)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
