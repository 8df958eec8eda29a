"""The tracers behind ``trace.start`` / ``trace.read`` / ``trace.stop``, and their stream.

A :class:`TraceSession` is one start..stop of a :class:`~daemon.ftrace.tracer.FunctionTracer` or, with
``tracer: function_graph``, a :class:`~daemon.ftrace.fgraph.FunctionGraphTracer` (its lines come from a
:class:`~daemon.ftrace.tracefs.GraphPrinter` kept for the whole session, so braces opened in one drain close
in a later one). While it runs, a
job of the kernel's host worker (``ftrace.trace-drainer``, stopped with the kernel) drains the guest's per-CPU
rings every ``DRAIN_PERIOD_S``. Each drain, whoever does it (that job, ``trace.read``, ``trace.stop``), goes two
ways:

* into the session's unread buffer (at most ``TRACE_BUFFER`` records, the oldest discarded first and counted
  as ``overrun``), which ``trace.read`` empties — like reading ``trace_pipe``;
* onto the ``trace`` topic as :class:`~schemas.ftrace.TraceBatchDoc` messages, through the service's
  stream board (``Service.streams``, published by the MQTT bridge).

So both a ``trace.read`` poller and a ``lpctl trace follow`` subscriber see every record exactly once. Draining
under the session lock keeps both in ring order.

The verbs themselves are :class:`TraceVerbs`: at most one session at a time.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from daemon.errors import FtraceError
from daemon.ftrace import Ftrace, FunctionGraphTracer, FunctionTracer, GraphRecord, TraceRecord, tracefs
from daemon.kernel.clock import ticks_to_us
from daemon.kernel.kernel import Kernel
from daemon.kernel.worker import Job
from daemon.service.ftrace.counts import Counts
from daemon.service.pipeline.context import RequestContext
from daemon.service.pipeline.core import Service
from schemas.ftrace import (
    TRACE_BUFFER,
    TraceBatchDoc,
    TraceEntry,
    TraceReadData,
    TraceReadRequest,
    TraceStartData,
    TraceStartRequest,
    TraceStopData,
    TraceStopRequest,
)

log = structlog.get_logger(__name__)

DRAIN_PERIOD_S = 0.1
STREAM_BATCH = 500
"""Records per message on the trace topic (a message stays well under 1 MiB)."""


class StreamOutlet(Protocol):
    """Where batches go: ``Service.streams`` (a ``StreamBoard``), or anything with a thread-safe ``put``."""

    def put(self, topic: str, payload: str) -> None: ...


class TraceFormatter:
    """Trace records as the function tracer prints them, and as structured entries."""

    def __init__(self, kernel: Kernel, ftrace: Ftrace) -> None:
        self.ftrace = ftrace
        self.comms = {t.pid: t.comm for t in kernel.tasks()}  # the task list is fixed after boot

    def entry(self, r: TraceRecord) -> tuple[str, TraceEntry]:
        line = tracefs.trace_line(self.ftrace, r, self.comms).rstrip("\n")
        return line, self._entry(r)

    def graph(self, printer: tracefs.GraphPrinter, records: list[GraphRecord]) -> list[tuple[str, TraceEntry]]:
        """function_graph lines (task-switch banners left out: every record names its task) and their records."""
        return [(line.text.rstrip("\n"), self._entry(line.record, kind=line.kind, depth=line.record.depth,
                                                    duration_ns=line.duration_ns))
                for line in printer.feed(records)]

    def _entry(self, r: TraceRecord | GraphRecord, **graph: Any) -> TraceEntry:
        usecs = ticks_to_us(r.ts)
        return TraceEntry(ip=r.ip, parent_ip=r.parent_ip, function=self.ftrace.symbol_name(r.ip),
                          parent=self.ftrace.symbol_name(r.parent_ip), ts=r.ts, time=usecs / 1e6, pid=r.pid,
                          cpu=r.cpu, comm=self.comms.get(r.pid, "<...>"), **graph)


class TraceSession:
    """One trace.start .. trace.stop: the tracer, the unread buffer, the drainer job and the stream."""

    def __init__(self, service: Service, kernel: Kernel, tracer: FunctionTracer | FunctionGraphTracer,
                 formatter: TraceFormatter, *, number: int, filter: str | None, notrace: str | None,
                 streams: StreamOutlet | None) -> None:
        self.service = service
        self.kernel = kernel
        self.tracer = tracer
        self.formatter = formatter
        self.printer = tracefs.GraphPrinter(tracer.ftrace) if isinstance(tracer, FunctionGraphTracer) else None
        self.number = number
        self.filter, self.notrace = filter, notrace
        self.streams = streams
        self.buffer: collections.deque[tuple[str, TraceEntry]] = collections.deque()
        self.overrun = 0
        self.seq = 0
        self.written = 0
        self.dropped = 0
        self.lock = threading.Lock()
        self._drainer: Job | None = None

    @property
    def entries_per_cpu(self) -> int:
        return self.tracer.entries_per_cpu

    def start_draining(self) -> None:
        self._drainer = self.kernel.worker.every(DRAIN_PERIOD_S, self._drain_once, name="ftrace.trace-drainer")

    def stop_draining(self) -> None:
        """End the drainer job (a drain running now finishes first)."""
        if self._drainer is not None:
            self._drainer.cancel()
            self._drainer = None

    def _drain_once(self) -> bool:
        if not self.kernel.cpus_online:  # the kernel is shutting down, the daemon with it
            return False
        try:
            self.collect(self.tracer.drain)
        except Exception:
            log.exception("trace_drain_failed", session=self.number)
            return False
        return True

    def collect(self, drain: Callable[[], list[TraceRecord]] | Callable[[], list[GraphRecord]]) -> None:
        """Drain (``tracer.drain``, or ``tracer.stop`` for the last time), buffer and publish the records."""
        metrics = self.service.metrics
        with self.lock:
            before = self.tracer.dropped  # a stop frees the rings and their counters: read them first
            records = drain()
            running = self.tracer.running
            dropped = self.tracer.dropped if running else before
            written = self.tracer.written if running else self.tracer.read  # stopped: every entry was drained
            if dropped > self.dropped:
                metrics.trace_dropped.labels("ring").inc(dropped - self.dropped)
            self.written, self.dropped = written, dropped
            if not records:
                return
            metrics.trace_records.inc(len(records))
            entries = self._lines(records)
            self.buffer.extend(entries)
            excess = len(self.buffer) - TRACE_BUFFER
            if excess > 0:
                for _ in range(excess):
                    self.buffer.popleft()
                self.overrun += excess
                metrics.trace_dropped.labels("buffer").inc(excess)
            if self.streams is not None:
                self._publish(entries)

    def _lines(self, records: list[TraceRecord] | list[GraphRecord]) -> list[tuple[str, TraceEntry]]:
        if self.printer is not None:
            return self.formatter.graph(self.printer, [r for r in records if isinstance(r, GraphRecord)])
        return [self.formatter.entry(r) for r in records if isinstance(r, TraceRecord)]

    def _publish(self, entries: list[tuple[str, TraceEntry]]) -> None:
        assert self.streams is not None
        svc = self.service
        for i in range(0, len(entries), STREAM_BATCH):
            chunk = entries[i:i + STREAM_BATCH]
            self.seq += 1
            doc = TraceBatchDoc(host=svc.host, boot_seq=svc.boot_seq, session=self.number, seq=self.seq,
                                time=time.time(), lines=[line for line, _ in chunk], records=[e for _, e in chunk],
                                written=self.written, dropped=self.dropped)
            self.streams.put(svc.topics.trace, doc.model_dump_json())

    def read(self, limit: int, *, running: bool) -> dict[str, Any]:
        """Up to ``limit`` unread records (lines and entries) and the counters: a TraceReadData's fields."""
        with self.lock:
            taken = [self.buffer.popleft() for _ in range(min(limit, len(self.buffer)))]
            return {"lines": [line for line, _ in taken], "records": [e for _, e in taken], "written": self.written,
                    "dropped": self.dropped, "overrun": self.overrun, "remaining": len(self.buffer),
                    "running": running}


class TraceNotRunning(FtraceError):
    """trace.read or trace.stop while the function tracer is not running."""

    code = "trace_not_running"


class TraceVerbs:
    """The function tracer's verbs (under the subsystem's ``lock``; ``publish`` republishes its section)."""

    def __init__(self, service: Service, kernel: Kernel, ftrace: Ftrace, streams: StreamOutlet | None, *,
                 counts: Counts, lock: threading.RLock, publish: Callable[[], None]) -> None:
        self.service = service
        self.kernel = kernel
        self.ftrace = ftrace
        self.streams = streams
        self.counts = counts
        self.lock = lock
        self.publish = publish
        self.session: TraceSession | None = None
        self.sessions = 0
        self.formatter = TraceFormatter(kernel, ftrace)

    def close(self) -> None:
        """Stop the drainer job (the tracer itself goes away with the kernel)."""
        with self.lock:
            if self.session is not None:
                self.session.stop_draining()

    # -- the function tracer ---------------------------------------------------------------------------------

    def trace_start(self, req: TraceStartRequest, ctx: RequestContext) -> TraceStartData:
        with self.lock:
            if self.session is not None:
                raise FtraceError("the function tracer is already running; stop it first (trace.stop)",
                                  session=self.session.number)
            tracer: FunctionTracer | FunctionGraphTracer
            if req.tracer == "function_graph":
                tracer = FunctionGraphTracer(self.ftrace, filter=req.filter, notrace=req.notrace,
                                             graph_function=req.graph_function, graph_notrace=req.graph_notrace,
                                             entries_per_cpu=req.entries_per_cpu)
            else:
                tracer = FunctionTracer(self.ftrace, filter=req.filter, notrace=req.notrace,
                                        entries_per_cpu=req.entries_per_cpu)
            result = tracer.start()
            self.sessions += 1
            session = self.session = TraceSession(self.service, self.kernel, tracer, self.formatter,
                                                  number=self.sessions, filter=req.filter or None,
                                                  notrace=req.notrace or None, streams=self.streams)
            session.start_draining()
            functions = self.counts.functions(tracer.ops)
        self.publish()
        ctx.events.emit("trace.started", session=session.number, tracer=req.tracer, filter=session.filter,
                         functions=functions)
        return TraceStartData(tracer=req.tracer, filter=session.filter, notrace=session.notrace,
                              graph_function=req.graph_function or None, graph_notrace=req.graph_notrace or None,
                              entries_per_cpu=req.entries_per_cpu, functions=functions,
                              topic=self.service.topics.trace, streaming=self.streams is not None,
                              period_ms=round(DRAIN_PERIOD_S * 1000), batch=self.counts.batch(ctx.verb, result))

    def _session(self) -> TraceSession:
        if self.session is None:
            raise TraceNotRunning("the function tracer is not running (trace.start starts it)")
        return self.session

    def trace_read(self, req: TraceReadRequest, ctx: RequestContext) -> TraceReadData:
        with self.lock:
            session = self._session()
            session.collect(session.tracer.drain)
            return TraceReadData.model_validate(session.read(req.limit, running=True))

    def trace_stop(self, req: TraceStopRequest, ctx: RequestContext) -> TraceStopData:
        with self.lock:
            session = self._session()
            session.stop_draining()
            before = self.ftrace.last_batch
            try:
                session.collect(session.tracer.stop)
            except BaseException:
                session.start_draining()  # still running: keep draining
                raise
            after = self.ftrace.last_batch
            self.session = None
            data = session.read(req.limit, running=False)
            data.update(remaining=0, discarded=data["remaining"],
                        batch=self.counts.batch(ctx.verb, after if after is not before else None))
        self.publish()
        ctx.events.emit("trace.stopped", session=session.number, written=data["written"], dropped=data["dropped"])
        return TraceStopData.model_validate(data)
