"""The request path: verb registry, parsing, the journal (idempotency, durability), execution, error codes.

A handler is registered for a verb of ``schemas.VERBS`` and is called with the validated request model and a
``RequestContext``; it returns the verb's data model (or a dict that validates as one). A plain function is
run in a worker thread (kernel work never runs on the event loop); a coroutine function is awaited on the
loop and must not block. Verbs the schema marks ``mutating`` run one at a time (the ``ftrace_lock`` analogue),
once their journal row is fsynced (``daemon.service.store.durability``: beside the loop, which serves reads meanwhile).
Any ``LivepatchdError`` becomes an error reply with its ``code``; anything else is a bug: ``internal``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from pydantic import ValidationError

from daemon.errors import LivepatchdError
from daemon.service.pipeline.context import RequestContext, VerbTable
from daemon.service.pipeline.errors import (
    INTERNAL,
    BadRequest,
    JournalUnreadable,
    PayloadTooLarge,
    RequestIdConflict,
    RequestTimeout,
    StorageFull,
    UnknownVerb,
)
from daemon.service.pipeline.metrics import Metrics
from daemon.service.pipeline.outbox import EventLog, StateBoard, StreamBoard
from daemon.service.pipeline.payload import check_reply_topic, parse_object, reply_topic_ok
from daemon.service.store.desired import DesiredState
from daemon.service.store.durability import GroupSync
from daemon.service.store.journal import Journal, JournalFull, fingerprint, is_full
from daemon.service.store.stored import (
    Outcome,
    ReplyRoute,
    Unreadable,
    shown,
    stored_outcome,
    stored_reply,
    stored_request,
)
from schemas import VERBS, KernelState, Reply, Request, Topics, VerbSpec
from schemas.envelope import peek_envelope, peek_oversized
from schemas.kernel import BrokerLink

log = structlog.get_logger(__name__)



@dataclass(frozen=True)
class _Handler:
    spec: VerbSpec
    fn: Callable[..., Any]
    is_async: bool


class Service:
    """One daemon's use-cases behind one entry point, ``handle()`` (also ``replay()`` at startup)."""

    def __init__(self, *, host: str, boot_seq: int, journal: Journal, kernel: KernelState,
                 max_payload_bytes: int = 65536, request_timeout_s: float = 30.0,
                 metrics: Metrics | None = None, read_fast_path: bool = True, fsync: bool = True,
                 desired: DesiredState | None = None) -> None:
        self.host = host
        self.boot_seq = boot_seq
        self.topics = Topics(host)
        self.journal = journal
        self.desired = desired
        """The desired-state store the subsystems record their changes in: a replayed request whose change it
        already holds is told so (``RequestContext.already_applied``)."""
        self.metrics = metrics or Metrics()
        self.metrics.boot_seq.set(boot_seq)
        self.outgoing = asyncio.Event()
        """Set when the state document changed or events wait: the MQTT adapter's cue to publish."""
        self.state = StateBoard(journal, host, boot_seq, kernel, self.outgoing)
        self.events = EventLog(host, boot_seq, self.outgoing)
        self.streams = StreamBoard(self.outgoing)
        self.max_payload_bytes = max_payload_bytes
        self.request_timeout_s = request_timeout_s
        self.replayed = 0
        self.reply_delay_s = 0.0
        """Added to every reply (a fleet host's injected ``slow`` fault); 0 in production."""
        self.link: BrokerLink | None = None
        """The broker connection in use, as the MQTT adapter last set it (``info`` shows it)."""
        self._handlers: dict[str, _Handler] = {}
        self._lock = asyncio.Lock()
        self._inflight: dict[str, asyncio.Future[Outcome]] = {}
        # The read fast path: a mutating request's fsync runs beside the loop (group fsync), so the requests
        # behind it — reads, which have nothing to make durable — never wait for it. Off: the fsync is part of
        # the commit on the loop (synchronous=FULL), as a benchmark's baseline. A journal that fsyncs every
        # commit anyway (durable=True) needs neither.
        self._sync = GroupSync(self.journal.fsync_wal) if read_fast_path and not journal.sync_full else None
        self._fsync = fsync
        """False only to measure what durability costs (``unsafe_skip_fsync``): no fsync before the PUBACK."""

    def close(self) -> None:
        """Stop the fsync thread (after the last request)."""
        if self._sync is not None:
            self._sync.close()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind to the loop that runs the service (state and event changes from threads are handed to it)."""
        self.state.attach(loop)
        self.events.attach(loop)
        self.streams.attach(loop)

    # -- registry --------------------------------------------------------------------------------------------

    def register(self, verb: str, fn: Callable[..., Any]) -> None:
        """Serve ``verb`` (which must be in ``schemas.VERBS``) with ``fn(request, ctx) -> data``."""
        spec = VERBS.get(verb)
        if spec is None:
            raise ValueError(f"verb {verb!r} is not in schemas.VERBS: add its models there first")
        if verb in self._handlers:
            raise ValueError(f"verb {verb!r} already has a handler")
        self._handlers[verb] = _Handler(spec, fn, inspect.iscoroutinefunction(fn))

    def serve(self, table: VerbTable) -> None:
        """Serve every verb of a subsystem's table: the one way verbs are added (``register`` for each)."""
        for verb, fn in table.items():
            self.register(verb, fn)

    @property
    def verbs(self) -> list[str]:
        return sorted(self._handlers)

    # -- the request path ------------------------------------------------------------------------------------

    def route(self, response_topic: str | None, reply_to: str | None, correlation: bytes | None) -> ReplyRoute:
        """The v5 response topic, else the payload's ``reply_to``, else ``reply``. Both given destinations must be
        topics a reply may go to (``InvalidReplyTopic``, ``ForbiddenReplyTopic`` otherwise: never a request topic,
        whose reply would start a loop, nor a document topic of the daemons)."""
        if response_topic is not None:
            check_reply_topic(response_topic, "the MQTT v5 response topic")
        if reply_to is not None:
            check_reply_topic(reply_to, "reply_to")
        return ReplyRoute(response_topic or reply_to or self.topics.reply(), correlation)

    def refusal_route(self, response_topic: str | None, reply_to: str | None,
                      correlation: bytes | None) -> ReplyRoute:
        """Where a refusal goes: the first of the v5 response topic and ``reply_to`` that a reply may go to, else
        the default reply topic (a bad destination is answered there)."""
        for topic in (response_topic, reply_to):
            if topic is not None and reply_topic_ok(topic):
                return ReplyRoute(topic, correlation)
        return ReplyRoute(self.topics.reply(), correlation)

    async def handle(self, verb: str, payload: bytes, *, response_topic: str | None = None,
                     correlation: bytes | None = None, ack: Callable[[], None] | None = None) -> Outcome:
        """Answer one request. ``ack`` is called once the request is durable (journaled) or refused."""
        started = time.perf_counter()
        acked = False

        def accepted() -> None:
            nonlocal acked
            if not acked and ack is not None:
                ack()
            acked = True

        try:
            outcome = await self._handle(verb, payload, response_topic, correlation, accepted)
        finally:
            accepted()
        if self.reply_delay_s > 0:
            await asyncio.sleep(self.reply_delay_s)
        label = verb if verb in VERBS else "unknown"
        result = "ok" if outcome.reply.ok else (outcome.reply.error.code if outcome.reply.error else INTERNAL)
        self.metrics.requests.labels(label, result).inc()
        self.metrics.latency.labels(label).observe(time.perf_counter() - started)
        return outcome

    async def _handle(self, verb: str, payload: bytes, response_topic: str | None, correlation: bytes | None,
                      accepted: Callable[[], None]) -> Outcome:
        rid: str | None = None
        reply_to: str | None = None
        try:
            if len(payload) > self.max_payload_bytes:
                rid, reply_to = peek_oversized(payload)
                raise PayloadTooLarge(f"payload of {len(payload)} bytes exceeds the limit of "
                                      f"{self.max_payload_bytes}", size=len(payload), limit=self.max_payload_bytes)
            doc = parse_object(payload)
            rid, reply_to = peek_envelope(doc)
            route = self.route(response_topic, reply_to, correlation)  # before anything is journaled
            handler = self._handlers.get(verb)
            if handler is None:
                raise UnknownVerb(f"unknown verb {verb!r}", verb=verb, verbs=self.verbs)
            request = _validate(handler.spec, doc)
        except LivepatchdError as exc:
            route = self.refusal_route(response_topic, reply_to, correlation)
            log.info("request_refused", request_id=rid, verb=verb, code=exc.code)
            return _outcome(rid, verb, Reply.failure(rid, exc.code, exc.message, exc.details), route, False)
        with structlog.contextvars.bound_contextvars(request_id=request.request_id, verb=verb):
            return await self._execute_once(handler, request, route, accepted)

    async def _execute_once(self, handler: _Handler, request: Request, route: ReplyRoute,
                            accepted: Callable[[], None]) -> Outcome:
        rid, verb = request.request_id, handler.spec.verb
        params = request.model_dump(mode="json")
        fp = fingerprint(verb, params)
        pending = self._inflight.get(rid)
        entry = self.journal.get(rid) if pending is None else None
        if pending is not None or entry is not None:
            stored_fp = entry.fingerprint if entry is not None else None
            if entry is not None and (entry.verb != verb or stored_fp != fp):
                accepted()
                exc = RequestIdConflict(f"request id {rid!r} was used for another request", request_id=rid,
                                        verb=entry.verb)
                return _outcome(rid, verb, Reply.failure(rid, exc.code, exc.message, exc.details), route, False)
            if handler.spec.mutating:
                await self._settled()  # the first copy's row is durable before this one is acknowledged
            accepted()
            self.metrics.duplicates.inc()
            if pending is not None:
                first = await asyncio.shield(pending)
                return Outcome(rid, verb, first.reply, first.payload, route, True)
            assert entry is not None
            if entry.reply is None:  # accepted by an earlier run and not answered: cannot happen after replay()
                return await self._run(handler, request, route, retry=True)
            try:
                stored = stored_reply(entry)
            except Unreadable as why:  # answered, but not readable: this copy is told so (the id stays taken)
                log.warning("journal_row_unreadable", why=str(why), reply=shown(entry.reply))
                lost = JournalUnreadable(f"request id {rid!r} was answered, but its journaled reply cannot be read "
                                         f"({why}); use a new request id", request_id=rid)
                return _outcome(rid, verb, Reply.failure(rid, lost.code, lost.message, lost.details), route, False)
            if (route.topic, route.correlation) != (entry.reply_topic, entry.correlation):
                self.journal.reroute(rid, route.topic, route.correlation)
            log.info("request_duplicate", answered_at=entry.answered_at)
            return Outcome(rid, verb, stored, entry.reply, route, True)
        # get() and accept() run with no await between them: no duplicate can slip in on this loop.
        durable = handler.spec.mutating and self._fsync
        group = durable and self._sync is not None
        try:
            self.journal.accept(rid, verb, json.dumps(params, separators=(",", ":")), fp=fp,
                                reply_topic=route.topic, correlation=route.correlation, boot_seq=self.boot_seq,
                                sync=durable and not group)
        except JournalFull as full:
            accepted()  # refused, not accepted: the reply says so
            self.metrics.storage_full.inc()
            if handler.spec.mutating:
                log.warning("request_refused", code=StorageFull.code, error=str(full))
                refusal = StorageFull(f"the state directory is full: {verb} was not accepted; free space and retry",
                                      state_dir=str(self.journal.path.parent))
                reply = Reply.failure(rid, refusal.code, refusal.message, refusal.details)
                return _outcome(rid, verb, reply, route, False)
            # a read changes nothing: it is answered without a journal row (a duplicate runs it again)
            reply = await self._execute(handler, request, replayed=False)
            return _outcome(rid, verb, reply, route, False)
        if self._sync is None or not group:
            accepted()  # fsynced by the commit already (or, measuring, not at all)
            return await self._run(handler, request, route, retry=False)
        return await self._run(handler, request, route, retry=False, durable=(self._sync.ticket(), accepted))

    async def _settled(self) -> None:
        """Every commit made so far is durable (a no-op without the fast path: each was fsynced on commit)."""
        if self._sync is not None:
            with contextlib.suppress(OSError):  # the first copy's refusal answers this one too
                await self._sync.durable(self._sync.pending())

    async def _run(self, handler: _Handler, request: Request, route: ReplyRoute, *, retry: bool,
                   durable: tuple[int, Callable[[], None]] | None = None) -> Outcome:
        """Execute a journaled request. ``durable``: (fsync ticket, acknowledge) — wait for the row's fsync
        (registered as in flight first: a duplicate waits for this run) and acknowledge, before executing."""
        rid, verb = request.request_id, handler.spec.verb
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._inflight[rid] = future
        try:
            if durable is not None:
                ticket, accepted = durable
                assert self._sync is not None
                try:
                    await self._sync.durable(ticket)
                except OSError as err:
                    outcome = self._not_durable(handler.spec, request, route, err)
                    accepted()  # refused, not accepted: the reply says so
                    future.set_result(outcome)
                    return outcome
                accepted()
            if retry:
                self.journal.retry(rid)
            reply = await self._execute(handler, request, replayed=retry)
            text = reply.to_json()
            self.journal.answer(rid, text)
            outcome = Outcome(rid, verb, reply, text, route, True)
            future.set_result(outcome)
            return outcome
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: a cancelled run must not warn "exception never retrieved"
            raise
        finally:
            del self._inflight[rid]

    async def _execute(self, handler: _Handler, request: Request, *, replayed: bool) -> Reply:
        rid, spec = request.request_id, handler.spec
        ctx = RequestContext(rid, spec.verb, replayed, self.state, self.events,
                             already_applied=replayed and self._applied(rid))
        try:
            async with asyncio.timeout(self.request_timeout_s):
                if spec.mutating:
                    async with self._lock:
                        data = await self._call(handler, request, ctx)
                else:
                    data = await self._call(handler, request, ctx)
            dumped = _dump_data(spec, data)
        except TimeoutError:
            exc: LivepatchdError = RequestTimeout(f"{spec.verb} did not finish within {self.request_timeout_s} s")
            return self._failed(spec, request, exc)
        except LivepatchdError as exc:
            return self._failed(spec, request, exc)
        except sqlite3.OperationalError as err:
            if not is_full(err):
                raise
            full = StorageFull(f"the state directory filled up while {spec.verb} ran: its change may be applied "
                               "but not recorded for the next start; free space and check the state")
            return self._failed(spec, request, full)
        except Exception:
            log.exception("request_crashed")
            if spec.mutating:
                self.events.emit("request.failed", request_id=rid, verb=spec.verb, code=INTERNAL)
            return Reply.failure(rid, INTERNAL, f"internal error while handling {spec.verb}; see the daemon log")
        log.info("request_done", ok=True, replayed=replayed)
        return Reply.success(rid, dumped)

    def _not_durable(self, spec: VerbSpec, request: Request, route: ReplyRoute, err: OSError) -> Outcome:
        """The row could not be fsynced: refuse the request (not executed) and record the refusal as its answer,
        so that neither a restart nor a repeated id runs it."""
        rid = request.request_id
        self.metrics.storage_full.inc()
        log.warning("request_refused", code=StorageFull.code, error=str(err))
        refusal = StorageFull(f"the journal could not be made durable ({err.strerror or err}): {spec.verb} was "
                              "not executed; free space or check the disk and retry",
                              state_dir=str(self.journal.path.parent), errno=err.errno)
        reply = Reply.failure(rid, refusal.code, refusal.message, refusal.details)
        text = reply.to_json()
        self.journal.answer(rid, text)
        return Outcome(rid, spec.verb, reply, text, route, True)

    def _failed(self, spec: VerbSpec, request: Request, exc: LivepatchdError) -> Reply:
        log.info("request_done", ok=False, code=exc.code)
        if spec.mutating:  # a refused change is news for whoever watches the host
            self.events.emit("request.failed", request_id=request.request_id, verb=spec.verb, code=exc.code)
        return Reply.failure(request.request_id, exc.code, exc.message, _jsonable(exc.details))

    def _applied(self, rid: str) -> bool:
        """Did this request's change reach the desired state before the crash (and was it restored at boot)?"""
        if self.desired is None or not self.desired.applied(rid):
            return False
        log.info("request_already_applied", note="its change was restored at boot; answering from the state")
        return True

    @staticmethod
    async def _call(handler: _Handler, request: Request, ctx: RequestContext) -> Any:
        if handler.is_async:
            return await handler.fn(request, ctx)
        return await asyncio.to_thread(handler.fn, request, ctx)

    # -- startup and delivery --------------------------------------------------------------------------------

    async def replay(self) -> int:
        """Re-execute every request accepted by an earlier run and never answered (call before going online).
        A row that cannot be read back as its verb's request is answered ``journal_unreadable`` instead (never
        executed, never raised: the next start must not trip on it again)."""
        count = 0
        for entry in self.journal.unanswered():
            with structlog.contextvars.bound_contextvars(request_id=entry.request_id, verb=entry.verb):
                handler = self._handlers.get(entry.verb) if isinstance(entry.verb, str) else None
                try:
                    if handler is None:
                        raise Unreadable(f"verb {shown(entry.verb)} has no handler")
                    request = stored_request(entry, handler.spec.request)
                except Unreadable as why:
                    self._unreadable(entry.request_id, entry.verb, str(why))
                    continue
                outcome = await self._run(handler, request, ReplyRoute(entry.reply_topic, entry.correlation),
                                          retry=True)
            count += 1
            self.metrics.replayed.inc()
            self.events.emit("request.replayed", request_id=entry.request_id, verb=entry.verb, ok=outcome.reply.ok)
            log.info("request_replayed", request_id=entry.request_id, verb=entry.verb, attempts=entry.attempts + 1)
        self.replayed += count
        return count

    def _unreadable(self, rid: str, verb: object, why: str) -> None:
        exc = JournalUnreadable(f"the journaled request cannot be executed again after the restart: {why}",
                                request_id=shown(rid))
        log.warning("journal_row_unreadable", why=why, verb=shown(verb))
        self.journal.answer(rid, Reply.failure(rid if isinstance(rid, str) else None, exc.code, exc.message,
                                               exc.details).to_json())
        self.events.emit("request.unreadable", request_id=shown(rid), verb=shown(verb), why=why)

    def undelivered(self) -> list[Outcome]:
        """Journaled replies never published (the broker was away, or the daemon died before publishing). One
        that cannot be published (an unreadable reply, a reply topic no reply may go to) is dropped instead."""
        outcomes = []
        for entry in self.journal.undelivered():
            try:
                outcomes.append(stored_outcome(entry))
            except Unreadable as why:
                self.drop(entry.request_id, entry.verb, str(why))
        return outcomes

    def delivered(self, outcome: Outcome) -> None:
        if outcome.journaled and outcome.request_id is not None:
            self.journal.delivered(outcome.request_id)

    def drop(self, rid: str | None, verb: object, why: str, *, journaled: bool = True) -> None:
        """Give up a reply that cannot be published, with an event and a log line; a journaled one is marked
        delivered (never tried again)."""
        log.warning("reply_dropped", request_id=shown(rid), verb=shown(verb), why=why)
        self.metrics.replies_dropped.inc()
        self.events.emit("reply.dropped", request_id=shown(rid), verb=shown(verb), why=why)
        if journaled and rid is not None:
            self.journal.delivered(rid)


def kernel_identity(*, build_id: str, release: str, nr_cpus: int, booted_at: float) -> KernelState:
    """What every reply, status and state document says of the kernel this service fronts."""
    return KernelState(build_id=build_id, release=release, nr_cpus=nr_cpus, booted_at=booted_at)


def _outcome(rid: str | None, verb: str, reply: Reply, route: ReplyRoute, journaled: bool) -> Outcome:
    return Outcome(rid, verb, reply, reply.to_json(), route, journaled)


def _validate(spec: VerbSpec, doc: dict[str, Any]) -> Request:
    try:
        return spec.request.model_validate(doc)
    except ValidationError as exc:
        errors = [{"loc": [str(p) for p in e["loc"]], "msg": e["msg"], "type": e["type"]}
                  for e in exc.errors(include_url=False, include_context=False, include_input=False)]
        first = errors[0]
        where = ".".join(first["loc"]) or "request"
        raise BadRequest(f"invalid {spec.verb} request: {where}: {first['msg']}", errors=errors) from None


def _dump_data(spec: VerbSpec, data: Any) -> dict[str, Any]:
    model = data if isinstance(data, spec.data) else spec.data.model_validate(data)
    dumped: dict[str, Any] = model.model_dump(mode="json")
    return dumped


def _jsonable(details: dict[str, Any]) -> dict[str, Any]:
    """Error details as JSON values (anything JSON cannot hold becomes its repr)."""
    out: dict[str, Any] = json.loads(json.dumps(details, default=repr))
    return out


__all__ = ["Outcome", "ReplyRoute", "RequestContext", "Service"]
