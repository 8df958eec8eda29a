"""``HostWorker``: the one host thread of a kernel for its periodic work (a kernel's kworker).

What the host does in process context on a timer — klp's transition driver retrying a stalled transition, the
trace drainer emptying the ring buffers — runs as a *job* of its kernel's worker, not in a thread of its own:
a process holding hundreds of kernels has one such thread per kernel, not one per activity, and
:meth:`Kernel.shutdown` stops and joins it before the vCPUs go. The thread starts with the first job and
sleeps while no job is due (no polling when there is nothing to do).

A job runs ``fn()`` every ``period_s`` seconds (the first time one period after ``every()``) until ``fn``
returns False, raises (logged, the job ends, :attr:`Job.error` keeps the exception) or is cancelled. Jobs run
one at a time, in the order they fall due; a long job delays the others, never overlaps itself.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Job:
    """One periodic job of a :class:`HostWorker` (see the module docstring)."""

    def __init__(self, worker: HostWorker, name: str, period_s: float, fn: Callable[[], bool]) -> None:
        self.worker = worker
        self.name = name
        self.period_s = period_s
        self.fn = fn
        self.error: BaseException | None = None
        self._done = threading.Event()
        self._cancelled = False

    @property
    def done(self) -> bool:
        """True once the job ended (returned False, raised, was cancelled, or its worker stopped)."""
        return self._done.is_set()

    def cancel(self, timeout: float = 5.0) -> None:
        """End the job; if it is running on the worker right now, wait (up to ``timeout``) for that run to end,
        unless called from the job itself."""
        self.worker._cancel(self)
        if threading.current_thread() is not self.worker.thread:
            self._done.wait(timeout)


class HostWorker:
    """The periodic-work thread of one kernel (see the module docstring)."""

    def __init__(self, name: str = "kworker") -> None:
        self.name = name
        self.thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._queue: list[tuple[float, int, Job]] = []  # (due, tie-break, job): a heap
        self._order = itertools.count()
        self._running: Job | None = None
        self._stopping = False

    def every(self, period_s: float, fn: Callable[[], bool], *, name: str) -> Job:
        """Run ``fn`` every ``period_s`` seconds on the worker until it returns False (or the job is cancelled)."""
        job = Job(self, name, period_s, fn)
        with self._cond:
            if self._stopping:
                job._done.set()
                return job
            heapq.heappush(self._queue, (time.monotonic() + period_s, next(self._order), job))
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self.thread.start()
            self._cond.notify_all()
        return job

    def stop(self, timeout: float = 10.0) -> None:
        """End every job and the thread (a job running now finishes its run first); idempotent."""
        with self._cond:
            self._stopping = True
            pending, self._queue = self._queue, []
            self._cond.notify_all()
        for _, _, job in pending:
            job._done.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)

    @property
    def jobs(self) -> list[str]:
        """The names of the jobs waiting or running (for tests and diagnostics)."""
        with self._cond:
            names = [job.name for _, _, job in sorted(self._queue)]
            return names if self._running is None else [self._running.name, *names]

    def _cancel(self, job: Job) -> None:
        with self._cond:
            job._cancelled = True
            before = len(self._queue)
            self._queue = [entry for entry in self._queue if entry[2] is not job]
            if len(self._queue) != before:  # it was waiting, not running: done now
                heapq.heapify(self._queue)
                job._done.set()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (not self._queue or self._queue[0][0] > time.monotonic()):
                    self._cond.wait(self._queue[0][0] - time.monotonic() if self._queue else None)
                if self._stopping:
                    return
                _, _, job = heapq.heappop(self._queue)
                self._running = job
            again = False
            try:
                again = bool(job.fn())
            except Exception as exc:
                job.error = exc
                log.exception("host_job_failed: %s", job.name)
            with self._cond:
                self._running = None
                if again and not job._cancelled and not self._stopping:
                    heapq.heappush(self._queue, (time.monotonic() + job.period_s, next(self._order), job))
                else:
                    job._done.set()
