"""``LivepatchClient``: request/response with correlation and timeouts, typed results, status/state/event streams.

One MQTT connection per client (``clients.sdk.connection``: TCP_NODELAY; MQTT 5 with a response topic and
correlation data, or 3.1.1 with ``reply_to`` in the payload when the broker refuses 5; reconnects by itself).
Replies come back on the client's own topic ``livepatch/v1/<host>/reply/<client id>``, matched to their request
by ``request_id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Literal, TypeVar

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel, ValidationError

from clients.sdk.connection import Connection
from clients.sdk.errors import BrokerUnreachable, ReplyError, RequestTimeout, SdkError
from clients.sdk.ftrace_api import FtraceApi
from clients.sdk.patch_api import PatchApi
from clients.sdk.probe_api import ProbeApi
from clients.sdk.retprobe_api import RetprobeApi
from schemas import (
    ALL_STATUS,
    CallData,
    EventDoc,
    InfoData,
    Liveness,
    Outbound,
    Reply,
    StateDoc,
    StatusDoc,
    SymbolData,
    TasksData,
    Topics,
    host_of,
)
from schemas.brokers import parse_broker_url as _parse_one
from schemas.brokers import parse_broker_urls
from schemas.discovery import DISCOVER, DiscoverRequest, discover_reply

M = TypeVar("M", bound=Outbound)


@dataclass(frozen=True)
class RawReply:
    """A reply as parsed, and exactly as it arrived (``payload``: what ``lpctl --json`` prints)."""

    reply: Reply
    payload: str


_captured: contextvars.ContextVar[list[RawReply] | None] = contextvars.ContextVar("lpsdk_captured", default=None)


@contextlib.contextmanager
def capture_replies() -> Iterator[list[RawReply]]:
    """Collect the replies of the requests made inside the block (by this task), exactly as they arrived: what the
    typed methods parse, for a caller that also wants the raw reply (``lpctl --json``)."""
    replies: list[RawReply] = []
    token = _captured.set(replies)
    try:
        yield replies
    finally:
        _captured.reset(token)


def parse_broker_url(url: str) -> tuple[str, int, bool, str | None, str | None]:
    """``mqtt://[user[:password]@]host[:port]`` -> (host, port, tls, user, password); ``mqtts://`` means TLS."""
    node = _parse_one(url)
    return node.hostname, node.port, node.tls, node.username, node.password


def _properties(packet_type: int) -> Any:
    return Properties(packet_type)  # type: ignore[no-untyped-call]


def _is_birth(payload: bytes) -> bool:
    """A birth, not a heartbeat: the daemon has just subscribed (heartbeats follow on the same subscription)."""
    try:
        return StatusDoc.model_validate_json(payload).birth
    except ValidationError:
        return False


_log = logging.getLogger(__name__)


class LivepatchClient(FtraceApi, PatchApi, ProbeApi, RetprobeApi):
    """Client of one daemon (``host``) — or of none, for fleet-wide reads like ``hosts()``.

    Args:
        broker: ``mqtt://[user:pass@]host:port`` (``mqtts://`` for TLS); the nodes of a clustered broker as a
            list or comma-separated: the client connects to the first that answers and, after a loss, to the
            next one.
        host: the daemon's host id; needed by every request and by ``status``/``state``/``events``.
        timeout: seconds to wait for a reply (and for the connection).
        protocol: ``"auto"`` tries MQTT 5 and falls back to 3.1.1; or force ``"5"`` / ``"3.1.1"``.
        username, password: override the URL's credentials.
        tls_context: for ``mqtts://`` (default: the system's trust store).
        client_id: the MQTT client id (default: ``lpsdk-<random>``); replies go to ``reply/<client_id>``. A broker
            that binds client ids to user names (``deploy/mosquitto.conf``, listener 1883) needs the user name here.
        reconnect: when the connection drops, connect again (with backoff) and re-send the requests still
            waiting, with their ids, instead of failing them with ``BrokerUnreachable`` (the daemon answers a
            repeated id from its journal: nothing runs twice). A request still fails with ``RequestTimeout``
            when no reply comes within its timeout.
    """

    def __init__(self, broker: str | Sequence[str] = "mqtt://127.0.0.1:1883", host: str | None = None, *,
                 timeout: float = 10.0,
                 protocol: Literal["auto", "5", "3.1.1"] = "auto", username: str | None = None,
                 password: str | None = None, tls_context: ssl.SSLContext | None = None,
                 client_id: str | None = None, reconnect: bool = True) -> None:
        nodes = tuple(replace(n, username=username or n.username, password=password or n.password)
                      for n in parse_broker_urls(broker))
        self.nodes = nodes
        self.hostname, self.port = nodes[0].hostname, nodes[0].port
        self.host = host
        self.topics = Topics(host) if host is not None else None
        self.timeout = timeout
        self.client_id = client_id or f"lpsdk-{uuid.uuid4().hex[:12]}"
        self._conn = Connection(
            nodes, client_id=self.client_id, tls_context=tls_context, protocol=protocol, timeout=timeout,
            reconnect=reconnect, on_message=self._on_message, on_reconnect=self._reconnected, on_lost=self._on_lost)
        self._pending: dict[str, asyncio.Future[RawReply]] = {}
        self._sent: dict[str, tuple[str, str, Any]] = {}  # request id -> what to publish again after a reconnect
        self._listeners: dict[str, set[asyncio.Queue[tuple[str, bytes] | None]]] = {}
        self._resends: set[asyncio.Task[None]] = set()

    # -- connection ------------------------------------------------------------------------------------------

    async def __aenter__(self) -> LivepatchClient:
        await self._conn.open()
        if self.topics is not None:
            await self._conn.subscribe(self.topics.reply(self.client_id))
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._conn.close()

    @property
    def mqtt_version(self) -> str:
        return "5" if self._conn.protocol == aiomqtt.ProtocolVersion.V5 else "3.1.1"

    @property
    def node(self) -> str:
        """The broker node of the connection, host:port (the last one while reconnecting)."""
        return self._conn.node.where

    @property
    def reconnects(self) -> int:
        """How many times the connection was lost and made again."""
        return self._conn.reconnects

    def _check_open(self) -> None:
        if not self._conn.opened:
            raise SdkError("use the client inside 'async with LivepatchClient(...) as client:'")

    async def _subscribe(self, topic: str, *, again: bool = False) -> None:
        self._check_open()
        await self._conn.subscribe(topic, again=again)

    def _on_message(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        payload = message.payload if isinstance(message.payload, bytes) else b""
        if self.topics is not None:
            if topic == self.topics.reply(self.client_id):
                correlation = getattr(message.properties, "CorrelationData", None) if message.properties else None
                self._on_reply(payload, correlation)
                return
            if topic == self.topics.status and not message.retain and self._sent and _is_birth(payload):
                # A live birth: the daemon (re)subscribed just now. A request published before that, while a
                # restarted broker had no subscription for it, was dropped: send the waiting ones again.
                task = asyncio.get_running_loop().create_task(self._resend(), name="lpsdk.resend")
                self._resends.add(task)
                task.add_done_callback(self._resends.discard)
        for pattern, queues in self._listeners.items():
            if message.topic.matches(pattern):
                for q in queues:
                    q.put_nowait((topic, payload))

    def _on_lost(self, lost: BrokerUnreachable) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(lost)
        for queues in self._listeners.values():
            for q in queues:
                q.put_nowait(None)  # wakes every stream, which then raises

    async def _reconnected(self) -> None:
        if self.topics is not None:
            # The daemon may reconnect after us (a restarted broker): its birth tells when to send again.
            await self._conn.subscribe(self.topics.status)
        await self._resend()

    async def _resend(self) -> None:
        """After a reconnect (replies published while we were away are gone: clean session) or a live birth of
        the daemon: the requests still waiting go again, with their ids; the daemon answers a repeat from its
        journal, without running it twice."""
        for topic, payload, props in list(self._sent.values()):
            with contextlib.suppress(BrokerUnreachable):
                await self._conn.publish(topic, payload, props)

    def _on_reply(self, payload: bytes, correlation: bytes | None) -> None:
        try:
            text = payload.decode()
            reply = Reply.model_validate_json(text)
        except (UnicodeDecodeError, ValidationError):
            return
        rid = reply.request_id
        if rid is None and correlation is not None:  # MQTT 5: a refusal that could not read the id still has it
            rid = correlation.decode(errors="replace")
        fut = self._pending.get(rid or "")
        if fut is not None and not fut.done():
            fut.set_result(RawReply(reply, text))

    # -- requests --------------------------------------------------------------------------------------------

    async def request_raw(self, verb: str, params: dict[str, Any] | BaseModel | None = None, *,
                          request_id: str | None = None, timeout: float | None = None) -> RawReply:
        """Send ``verb`` with ``params`` and wait for its reply, whatever it says. Pass the same
        ``request_id`` to retry a request: the daemon answers a repeat from its journal without re-running it."""
        if self.topics is None:
            raise SdkError("this client has no host: LivepatchClient(broker, host)")
        self._check_open()
        fields = params.model_dump(mode="json", exclude_none=True) if isinstance(params, BaseModel) else dict(
            params or {})
        rid = request_id or fields.pop("request_id", None) or uuid.uuid4().hex
        fields.pop("request_id", None)
        # The envelope goes first: a daemon refusing a payload as too large still finds it in the first bytes.
        body: dict[str, Any] = {"request_id": rid}
        reply_topic = self.topics.reply(self.client_id)
        props: Any = None
        if self._conn.protocol == aiomqtt.ProtocolVersion.V5:
            props = _properties(PacketTypes.PUBLISH)
            props.ResponseTopic = reply_topic
            props.CorrelationData = rid.encode()
        else:
            body["reply_to"] = reply_topic
        body.update(fields)
        fut: asyncio.Future[RawReply] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        wait = self.timeout if timeout is None else timeout
        topic, payload = self.topics.request(verb), json.dumps(body)
        try:
            async with asyncio.timeout(wait):
                await self._conn.publish(topic, payload, props)
                self._sent[rid] = (topic, payload, props)
                raw = await fut
                captured = _captured.get()
                if captured is not None:
                    captured.append(raw)
                return raw
        except TimeoutError:
            if self._conn.up.is_set():
                why = "is it online?"
            else:
                last = self._conn.last_error
                why = f"the broker {self._conn.where} is unreachable" + (f": {last}" if last else "")
            raise RequestTimeout(f"no reply to {verb} from {self.host} within {wait:.3g} s ({why})",
                                 request_id=rid, verb=verb) from None
        finally:
            self._pending.pop(rid, None)
            self._sent.pop(rid, None)
            if fut.done() and not fut.cancelled():
                fut.exception()  # retrieved: a loss may have failed it while the publish was failing too

    async def request(self, verb: str, params: dict[str, Any] | BaseModel | None = None, *,
                      request_id: str | None = None, timeout: float | None = None) -> dict[str, Any]:
        """Like ``request_raw``, but returns the reply's ``data`` and raises ``ReplyError`` for an error reply."""
        raw = await self.request_raw(verb, params, request_id=request_id, timeout=timeout)
        reply = raw.reply
        if not reply.ok:
            err = reply.error
            raise ReplyError(err.code if err else "internal", err.message if err else "error reply without error",
                             err.details if err else {}, request_id=reply.request_id, verb=verb)
        return reply.data or {}

    async def _typed(self, model: type[M], verb: str, params: dict[str, Any]) -> M:
        return model.model_validate(await self.request(verb, params))

    async def info(self) -> InfoData:
        return await self._typed(InfoData, "info", {})

    async def symbol(self, name: str | None = None, *, sympos: int = 0, address: int | None = None) -> SymbolData:
        params: dict[str, Any] = {"name": name} if name is not None else {"address": address}
        if sympos:
            params["sympos"] = sympos
        return await self._typed(SymbolData, "symbol.lookup", params)

    async def call(self, function: str, *args: int, cpu: int = 0, sympos: int = 0) -> CallData:
        params: dict[str, Any] = {"function": function, "args": list(args), "cpu": cpu}
        if sympos:
            params["sympos"] = sympos
        return await self._typed(CallData, "call", params)

    async def tasks(self, cpu: int | None = None) -> TasksData:
        return await self._typed(TasksData, "tasks", {} if cpu is None else {"cpu": cpu})

    # -- retained documents and streams ----------------------------------------------------------------------

    def _topics(self) -> Topics:
        if self.topics is None:
            raise SdkError("this client has no host: LivepatchClient(broker, host)")
        return self.topics

    async def _stream(self, topic: str, *, retained: bool = False) -> AsyncIterator[tuple[str, bytes]]:
        queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue()
        self._listeners.setdefault(topic, set()).add(queue)
        last: bytes | None = None
        try:
            await self._subscribe(topic, again=retained)
            while True:
                item = await queue.get()
                if item is None:
                    raise self._conn.lost or BrokerUnreachable("connection lost")
                if retained and item[1] == last:
                    continue  # the same retained document again (a new subscription, a reconnect)
                last = item[1]
                yield item
        finally:
            self._listeners[topic].discard(queue)

    async def _first(self, topic: str, model: type[M], wait: float) -> M | None:
        """The retained document on ``topic``, or None when none arrives within ``wait`` seconds."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                async for _, payload in self._stream(topic, retained=True):
                    if payload:
                        return model.model_validate_json(payload)
        return None

    async def status(self, wait: float = 1.0) -> StatusDoc | None:
        """The host's retained status (online/offline with its boot sequence), or None if it never announced."""
        return await self._first(self._topics().status, StatusDoc, wait)

    async def current_status(self, wait: float = 1.0) -> StatusDoc | None:
        """The host's status as of now: the retained one, and when that one is stale, the newest one published
        within ``wait`` seconds (a broker may hand out a retained copy older than the beats it forwards live, as
        a NATS cluster does for a while after a node died). None if the host never announced itself."""
        latest: StatusDoc | None = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                async for _, payload in self._stream(self._topics().status, retained=True):
                    if payload:
                        with contextlib.suppress(ValidationError):
                            latest = StatusDoc.model_validate_json(payload)
                            if latest.liveness(time.time()) != "stale":
                                break
        return latest

    async def liveness(self, wait: float = 1.0) -> Liveness | None:
        """``online``, ``stale`` (online, but no heartbeat for ``STALE_AFTER_BEATS`` periods: unreachable), or
        ``offline``, from ``current_status(wait)``; None if the host never announced itself."""
        doc = await self.current_status(wait)
        return None if doc is None else doc.liveness(time.time())

    async def state(self, wait: float = 1.0) -> StateDoc | None:
        return await self._first(self._topics().state, StateDoc, wait)

    async def hosts(self, wait: float = 0.5) -> dict[str, StatusDoc]:
        """Every host that left a retained status on this broker, collected for ``wait`` seconds; when there is
        none (RabbitMQ never delivers retained messages to a wildcard subscription), the online hosts that answer
        a broadcast discovery request within another ``wait`` seconds (``schemas.discovery``)."""
        found: dict[str, StatusDoc] = {}
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                async for topic, payload in self._stream(ALL_STATUS, retained=True):
                    host = host_of(topic)
                    if host is not None and payload:
                        with contextlib.suppress(ValidationError):
                            found[host] = StatusDoc.model_validate_json(payload)
        if not found:
            found = await self.discover(wait)
        return dict(sorted(found.items()))

    async def discover(self, wait: float = 0.5) -> dict[str, StatusDoc]:
        """The online hosts that answer a broadcast discovery request within ``wait`` seconds (their current
        status; hosts that are offline or unreachable do not answer)."""
        reply_to = discover_reply(self.client_id)
        found: dict[str, StatusDoc] = {}
        queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue()
        self._listeners.setdefault(reply_to, set()).add(queue)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._subscribe(reply_to)  # SUBACK first: the answers come at once
                    request = DiscoverRequest(request_id=uuid.uuid4().hex, reply_to=reply_to)
                    await self._conn.publish(DISCOVER, request.model_dump_json())
                    while (item := await queue.get()) is not None:
                        with contextlib.suppress(ValidationError):
                            doc = StatusDoc.model_validate_json(item[1])
                            found[doc.host] = doc
                    raise self._conn.lost or BrokerUnreachable("connection lost")
        finally:
            self._listeners[reply_to].discard(queue)
        return dict(sorted(found.items()))

    async def _documents(self, topic: str, model: type[M], *, retained: bool) -> AsyncIterator[M]:
        """The documents on ``topic`` that validate as ``model``. Anyone allowed to publish there can put a foreign
        document on it: one that does not validate is logged and skipped, it never ends the stream."""
        async for _, payload in self._stream(topic, retained=retained):
            if not payload:
                continue
            try:
                yield model.model_validate_json(payload)
            except ValidationError as exc:
                _log.warning("skipped a document on %s that is not a %s (%d errors): %r", topic, model.__name__,
                             exc.error_count(), payload[:200])

    async def states(self) -> AsyncIterator[StateDoc]:
        """The host's state document: the retained one first, then each new version."""
        async for doc in self._documents(self._topics().state, StateDoc, retained=True):
            yield doc

    async def statuses(self) -> AsyncIterator[StatusDoc]:
        async for doc in self._documents(self._topics().status, StatusDoc, retained=True):
            yield doc

    async def events(self) -> AsyncIterator[EventDoc]:
        """The host's events as they are published (none are retained)."""
        async for doc in self._documents(self._topics().events, EventDoc, retained=False):
            yield doc
