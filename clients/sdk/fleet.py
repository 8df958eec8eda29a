"""``FleetClient``: every host of a broker, from its retained documents alone, with filters and a change stream::

    async with FleetClient("mqtt://127.0.0.1:1883") as fleet:
        for host in await fleet.hosts(HostFilter(labels={"zone": "eu"}, state="online")):
            print(host.id, host.release, host.patches)
        async for change in fleet.changes(HostFilter(patched="livepatch_cmdline")):
            print(change.kind, change.host)

One connection subscribes to ``livepatch/v1/+/status`` and ``livepatch/v1/+/state``: the broker hands out every
host's retained status (online/offline, boot, heartbeat) and state (kernel build, labels, patches, transition,
fleet faults) at once, and each new one as it is published. Nothing is asked of the hosts. The wildcards are
subscribed at QoS 0: over QoS 1, Mosquitto hands out only 1,020 retained messages per subscription by default
(``max_inflight_messages`` + ``max_queued_messages``) and drops the rest, a thousand hosts' documents included.

A document that does not validate (a foreign publisher, an other schema, a document about an other host than its
topic names) is logged and skipped: the host keeps its last valid one, and no stream ends for it.

Where retained messages never reach a wildcard subscription (RabbitMQ), ``hosts()`` falls back to a broadcast
discovery request (``schemas.discovery``) and then subscribes to each online host's own state topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Literal

import aiomqtt
from pydantic import ValidationError

from clients.sdk.connection import Connection
from clients.sdk.errors import BrokerUnreachable, SdkError
from schemas import ALL_STATE, ALL_STATUS, StateDoc, StatusDoc, Topics, host_of
from schemas.brokers import parse_broker_urls
from schemas.discovery import DISCOVER, DiscoverRequest, discover_reply
from schemas.livepatch import LivepatchSection, TransitionSummary

_log = logging.getLogger(__name__)

HostStatus = Literal["online", "stale", "offline", "unknown"]
"""``online``/``stale``/``offline`` as ``StatusDoc.liveness`` says; ``unknown``: a state but no status seen."""
HOST_STATUSES: tuple[HostStatus, ...] = ("online", "stale", "offline", "unknown")

DEFAULT_QUIET_S = 0.5
"""``hosts()`` is complete once no retained document has arrived for this long."""


@dataclass(frozen=True)
class HostPatch:
    """A patch loaded on a host, as its state summarises it."""

    name: str
    enabled: bool
    transition: bool


@dataclass(frozen=True)
class HostRecord:
    """One host as its retained documents describe it (``status_doc``/``state_doc``: the documents themselves).

    ``status`` is computed at ``at`` (wall-clock): a host whose last heartbeat is older than three periods is
    ``stale``."""

    id: str
    status: HostStatus
    build_id: str | None
    release: str | None
    """The kernel build's version string (``6.1-lp1``); empty for a daemon that does not say it."""
    labels: Mapping[str, str]
    patches: tuple[HostPatch, ...]
    transition: TransitionSummary | None
    faults: tuple[str, ...]
    """The kinds of the faults the fleet spec gave the host (``components.fleet.faults``)."""
    boot_seq: int | None
    state_version: int | None
    status_doc: StatusDoc | None = field(repr=False, compare=False)
    state_doc: StateDoc | None = field(repr=False, compare=False)

    @property
    def online(self) -> bool:
        return self.status == "online"

    def patched(self, name: str) -> bool:
        """Whether patch ``name`` is loaded and enabled (an enabling transition in progress counts)."""
        return any(p.name == name and p.enabled for p in self.patches)

    def to_json(self) -> dict[str, Any]:
        """The status document's fields (``state`` there is online/offline), ``liveness`` and the state's facts:
        what ``lpctl hosts --json`` prints per host."""
        doc: dict[str, Any] = self.status_doc.model_dump(mode="json") if self.status_doc is not None else {
            "host": self.id}
        doc.update(liveness=self.status, build_id=self.build_id, release=self.release, labels=dict(self.labels),
                   patches=[{"name": p.name, "enabled": p.enabled, "transition": p.transition} for p in self.patches],
                   transition=self.transition.model_dump(mode="json") if self.transition is not None else None,
                   faults=list(self.faults), state_version=self.state_version)
        return doc


def _faults(state: StateDoc) -> tuple[str, ...]:
    section = state.components.get("fleet")
    faults = section.get("faults") if isinstance(section, dict) else None
    if not isinstance(faults, list):
        return ()
    return tuple(str(f["kind"]) for f in faults if isinstance(f, dict) and isinstance(f.get("kind"), str))


def _labels(state: StateDoc) -> dict[str, str]:
    labels = state.components.get("labels")
    if not isinstance(labels, dict):
        return {}
    return {str(k): str(v) for k, v in labels.items()}


def make_record(host: str, status: StatusDoc | None, state: StateDoc | None, now: float | None = None) -> HostRecord:
    """The record of ``host`` from its documents (either may be missing), its liveness as of ``now``."""
    now = time.time() if now is None else now
    lp = state.section("livepatch") if state is not None else None
    assert lp is None or isinstance(lp, LivepatchSection)
    return HostRecord(
        id=host, status=status.liveness(now) if status is not None else "unknown",
        build_id=state.kernel.build_id if state is not None else None,
        release=state.kernel.release if state is not None else None,
        labels=_labels(state) if state is not None else {},
        patches=tuple(HostPatch(p.name, p.enabled, p.transition) for p in lp.patches) if lp is not None else (),
        transition=lp.transition if lp is not None else None,
        faults=_faults(state) if state is not None else (),
        boot_seq=status.boot_seq if status is not None else (state.boot_seq if state is not None else None),
        state_version=state.version if state is not None else None, status_doc=status, state_doc=state)


@dataclass(frozen=True)
class HostFilter:
    """Which hosts to list: every condition given must hold.

    Args:
        labels: each label must have this value (``{"zone": "eu"}``).
        build: the kernel build's version string (``6.1-lp1``), or its build id or a prefix of it.
        state: ``online``, ``stale``, ``offline`` or ``unknown`` (see ``HostStatus``).
        patched: this patch is loaded and enabled.
    """

    labels: Mapping[str, str] = field(default_factory=dict)
    build: str | None = None
    state: HostStatus | None = None
    patched: str | None = None

    def __post_init__(self) -> None:
        if self.state is not None and self.state not in HOST_STATUSES:
            raise ValueError(f"state {self.state!r} is not one of {', '.join(HOST_STATUSES)}")
        if self.build == "":
            raise ValueError("build cannot be empty")

    def matches(self, record: HostRecord) -> bool:
        if any(record.labels.get(k) != v for k, v in self.labels.items()):
            return False
        if self.build is not None and record.release != self.build and not (
                record.build_id is not None and record.build_id.startswith(self.build)):
            return False
        if self.state is not None and record.status != self.state:
            return False
        return self.patched is None or record.patched(self.patched)


def parse_label(text: str) -> tuple[str, str]:
    """``zone=eu`` -> ``("zone", "eu")``; ValueError for anything else (no ``=``, an empty name)."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"{text!r} is not a label selector: give NAME=VALUE, e.g. zone=eu")
    return name.strip(), value.strip()


@dataclass(frozen=True)
class HostChange:
    """A host's record changed: ``added`` (first seen, or now matching the stream's filter), ``changed``, or
    ``removed`` (its retained status was cleared, or it no longer matches the filter: ``record`` is its last
    record then)."""

    kind: Literal["added", "changed", "removed"]
    record: HostRecord
    previous: HostRecord | None

    @property
    def host(self) -> str:
        return self.record.id


@dataclass
class _Docs:
    status: StatusDoc | None = None
    state: StateDoc | None = None


_Update = tuple[str, HostRecord | None, HostRecord | None]  # host, before, after (None: gone)


class FleetClient:
    """The hosts of a broker, from their retained ``status`` and ``state`` (see the module's docstring).

    Args:
        broker: ``mqtt://[user:pass@]host:port`` (``mqtts://`` for TLS), or the nodes of a clustered broker, as
            for ``LivepatchClient``.
        timeout: seconds for the connection and each subscription.
        protocol, username, password, tls_context, client_id, reconnect: as for ``LivepatchClient``; after a
            reconnect the broker hands out the retained documents again, and the view catches up.
    """

    def __init__(self, broker: str | Sequence[str] = "mqtt://127.0.0.1:1883", *, timeout: float = 10.0,
                 protocol: Literal["auto", "5", "3.1.1"] = "auto", username: str | None = None,
                 password: str | None = None, tls_context: ssl.SSLContext | None = None,
                 client_id: str | None = None, reconnect: bool = True) -> None:
        nodes = tuple(replace(n, username=username or n.username, password=password or n.password)
                      for n in parse_broker_urls(broker))
        self.nodes = nodes
        self.timeout = timeout
        self.client_id = client_id or f"lpfleet-{uuid.uuid4().hex[:12]}"
        self._conn = Connection(nodes, client_id=self.client_id, tls_context=tls_context, protocol=protocol,
                                timeout=timeout, reconnect=reconnect, on_message=self._on_message,
                                on_lost=self._on_lost)
        self._docs: dict[str, _Docs] = {}
        self._watchers: set[asyncio.Queue[_Update | None]] = set()
        self._discovered: asyncio.Queue[StatusDoc | None] | None = None
        self._last_retained = time.monotonic()
        self.retained = 0
        """How many retained documents arrived (valid or not)."""
        self.skipped = 0
        """How many documents were skipped because they did not validate."""

    async def __aenter__(self) -> FleetClient:
        await self._conn.open()
        self._last_retained = time.monotonic()
        # QoS 0: over a QoS 1 subscription Mosquitto drops the retained messages past its queue (1,020 of them by
        # default), so a thousand hosts' status and state would not all arrive
        await self._conn.subscribe(ALL_STATUS, qos=0)
        await self._conn.subscribe(ALL_STATE, qos=0)
        self._last_retained = time.monotonic()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._conn.close()

    @property
    def mqtt_version(self) -> str:
        return "5" if self._conn.protocol == aiomqtt.ProtocolVersion.V5 else "3.1.1"

    # -- the view ----------------------------------------------------------------------------------------------

    def records(self, host_filter: HostFilter | None = None, now: float | None = None) -> list[HostRecord]:
        """The hosts seen so far that match ``host_filter``, sorted by id (no waiting)."""
        now = time.time() if now is None else now
        found = (make_record(h, d.status, d.state, now) for h, d in sorted(self._docs.items()))
        return [r for r in found if host_filter is None or host_filter.matches(r)]

    def record(self, host: str) -> HostRecord | None:
        docs = self._docs.get(host)
        return None if docs is None else make_record(host, docs.status, docs.state)

    async def hosts(self, host_filter: HostFilter | None = None, *, quiet: float = DEFAULT_QUIET_S,
                    wait: float | None = None, discover: bool = True) -> list[HostRecord]:
        """Every host that left a retained status or state, matching ``host_filter``, sorted by id.

        The list is complete once no retained document has arrived for ``quiet`` seconds (the broker sends
        them all right after the subscription), or after ``wait`` seconds in all (default: the client's
        timeout). With ``discover`` and no retained document at all (RabbitMQ), the hosts that answer a discovery
        request within ``quiet`` seconds, and those whose status came live, with their retained states (read
        from each host's own state topic)."""
        self._check_open()
        limit = self.timeout if wait is None else wait
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit):
                await self._settle(quiet)
        if discover and self.retained == 0:  # live heartbeats may have come, but no retained document at all
            found = await self.discover(quiet)
            for doc in found:
                docs = self._docs.setdefault(doc.host, _Docs())
                if docs.status is None or (docs.status.time or 0) <= (doc.time or 0):
                    docs.status = doc
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(limit):
                    for host in sorted(self._docs):  # a host's own topic: retained messages reach it there
                        await self._conn.subscribe(Topics(host).state, again=True, qos=0)
                    self._last_retained = time.monotonic()
                    await self._settle(quiet)
        return self.records(host_filter)

    async def _settle(self, quiet: float) -> None:
        while (left := self._last_retained + quiet - time.monotonic()) > 0:
            await asyncio.sleep(left)
            if self._conn.lost is not None:
                raise self._conn.lost

    async def discover(self, wait: float = DEFAULT_QUIET_S) -> list[StatusDoc]:
        """The online hosts that answer a broadcast discovery request within ``wait`` seconds."""
        self._check_open()
        reply_to = discover_reply(self.client_id)
        queue: asyncio.Queue[StatusDoc | None] = asyncio.Queue()
        self._discovered = queue
        found: dict[str, StatusDoc] = {}
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._conn.subscribe(reply_to)
                    request = DiscoverRequest(request_id=uuid.uuid4().hex, reply_to=reply_to)
                    await self._conn.publish(DISCOVER, request.model_dump_json())
                    while (doc := await queue.get()) is not None:
                        found[doc.host] = doc
                    raise self._conn.lost or BrokerUnreachable("connection lost")
        finally:
            self._discovered = None
        return [found[h] for h in sorted(found)]

    async def changes(self, host_filter: HostFilter | None = None, *, initial: bool = True,
                      liveness_every_s: float = 1.0) -> AsyncIterator[HostChange]:
        """Each change of a host's record, as documents arrive; with ``initial``, every host already seen first
        (as ``added``). With a filter, a host entering the selection is ``added`` and one leaving it
        ``removed``; a heartbeat that changes nothing a record shows is no change. Every ``liveness_every_s``
        the records are looked at again, so that a host that stopped beating turns ``stale`` in the stream
        although no document came (a broker node died with its connection: no last will). Ends with
        ``BrokerUnreachable`` only when the connection is gone for good (no ``reconnect``, or the client
        closed)."""
        self._check_open()
        queue: asyncio.Queue[_Update | None] = asyncio.Queue()
        self._watchers.add(queue)
        last: dict[str, HostRecord] = {}
        """What this stream last said of each host in its selection."""
        looked: dict[str, HostStatus] = {}
        """Each host's status when this stream last looked at it (in its selection or not)."""

        def step(host: str, after: HostRecord | None) -> HostChange | None:
            if after is None:
                looked.pop(host, None)
            else:
                looked[host] = after.status
            before = last.get(host)
            if after is not None and (host_filter is None or host_filter.matches(after)):
                if before is not None and before == after:
                    return None
                last[host] = after
                return HostChange("added" if before is None else "changed", after, before)
            if before is None:
                return None
            del last[host]
            return HostChange("removed", after or before, before)

        try:
            now = time.time()
            for host, docs in self._docs.items():
                looked[host] = docs.status.liveness(now) if docs.status is not None else "unknown"
            for record in self.records(host_filter):
                last[record.id] = record
                if initial:
                    yield HostChange("added", record, None)
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), liveness_every_s)
                except TimeoutError:
                    now = time.time()
                    for host, docs in sorted(self._docs.items()):
                        if docs.status is None or docs.status.liveness(now) == looked.get(host):
                            continue  # only time changed: a record is made again only when its status did
                        change = step(host, make_record(host, docs.status, docs.state, now))
                        if change is not None:
                            yield change
                    continue
                if item is None:
                    raise self._conn.lost or BrokerUnreachable("connection lost")
                change = step(item[0], item[2])
                if change is not None:
                    yield change
        finally:
            self._watchers.discard(queue)

    # -- incoming ----------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if not self._conn.opened:
            raise SdkError("use the client inside 'async with FleetClient(...) as fleet:'")

    def _on_lost(self, lost: BrokerUnreachable) -> None:
        for q in self._watchers:
            q.put_nowait(None)
        if self._discovered is not None:
            self._discovered.put_nowait(None)

    def _on_message(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        payload = message.payload if isinstance(message.payload, bytes) else b""
        if self._discovered is not None and topic == discover_reply(self.client_id):
            with contextlib.suppress(ValidationError):
                self._discovered.put_nowait(StatusDoc.model_validate_json(payload))
            return
        host = host_of(topic)
        kind = topic.rsplit("/", 1)[-1]
        if host is None or kind not in ("status", "state") or topic.count("/") != 3:
            return
        if message.retain:
            self.retained += 1
            self._last_retained = time.monotonic()
        docs = self._docs.get(host)
        before = make_record(host, docs.status, docs.state) if docs is not None else None
        if not payload:  # a cleared retained document
            if docs is None:
                return
            if kind == "status":
                docs.status = None
            else:
                docs.state = None
            if docs.status is None and docs.state is None:
                del self._docs[host]
                self._notify(host, before, None)
            else:
                self._notify(host, before, make_record(host, docs.status, docs.state))
            return
        parsed = self._parse(topic, host, kind, payload)
        if parsed is None:
            return
        docs = self._docs.setdefault(host, _Docs())
        if isinstance(parsed, StatusDoc):
            docs.status = parsed
        else:
            if docs.state is not None and parsed.boot_seq == docs.state.boot_seq and \
                    parsed.version < docs.state.version:
                return  # an older version of this boot's state delivered late
            docs.state = parsed
        self._notify(host, before, make_record(host, docs.status, docs.state))

    def _parse(self, topic: str, host: str, kind: str, payload: bytes) -> StatusDoc | StateDoc | None:
        model: type[StatusDoc] | type[StateDoc] = StatusDoc if kind == "status" else StateDoc
        try:
            doc = model.model_validate_json(payload)
            if isinstance(doc, StateDoc):
                doc.section("livepatch")  # the section the records read must follow its model too
            if doc.host != host:
                raise ValueError(f"it names host {doc.host!r}, not the topic's")
        except (ValidationError, ValueError) as exc:
            self.skipped += 1
            why = f"{exc.error_count()} errors" if isinstance(exc, ValidationError) else str(exc)
            _log.warning("skipped a document on %s that is not a valid %s (%s): %r", topic, model.__name__, why,
                         payload[:200])
            return None
        return doc

    def _notify(self, host: str, before: HostRecord | None, after: HostRecord | None) -> None:
        for q in self._watchers:
            q.put_nowait((host, before, after))
