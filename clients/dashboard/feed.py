"""``FleetFeed``: what the page shows, kept from MQTT alone.

One observer connection subscribes to every host's retained ``status`` and ``state``, to its ``events`` and to
its ``trace`` stream (the function tracer's batches, published while a trace session runs). The feed keeps the
latest document of each kind per host, a bounded tail of events, and per tracing host a bounded tail of trace lines
and of call latencies (function_graph durations), and hands out
*deltas*: the hosts changed since a cursor, so a thousand hosts changing state cost one message per batch
interval, not one per change. MQTT 3.1.1 is used on purpose: every broker (the embedded one too) speaks it,
and the feed needs nothing of 5.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomqtt
import structlog

from clients.dashboard.call_costs import table as call_cost_table
from clients.dashboard.rollouts import ROLLOUT_PREFIX, TOPIC_PREFIX, RolloutBoards
from clients.sdk import ReplyError, RolloutClient
from clients.sdk.errors import SdkError
from schemas import ALL_EVENTS, ALL_STATE, ALL_STATUS, host_of
from schemas.topics import ROOT

ALL_TRACE = f"{ROOT}/+/trace"

log = structlog.get_logger("dashboard.feed")

_NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
EVENT_TAIL = 500
TRACE_TAIL = 200
"""Trace lines kept per host (the page shows the latest; older ones are read with ``lpctl trace read``)."""
LATENCY_TAIL = 1000
"""Call durations kept per host for its latency plot."""
STALL_EVENT = "patch.transition.stalled"
TRANSITION_OVER = ("patch.transition.completed", "patch.transition.reversed")


@dataclass
class HostDocs:
    status: dict[str, Any] | None = None
    state: dict[str, Any] | None = None
    stall: dict[str, Any] | None = None
    """The last ``patch.transition.stalled`` event's data (the blocking tasks and why), kept until the transition
    completes or is reversed; ``over`` is set then."""
    changed: int = 0
    """The feed's change counter when this host last changed (the cursor deltas are cut at)."""

    def view(self) -> dict[str, Any]:
        return {"status": self.status, "state": self.state, "stall": self.stall,
                "costs": call_cost_table(self.state)}


@dataclass
class TraceTail:
    """What a host's ``trace`` batches carried lately, each item numbered with the feed's change counter."""

    lines: deque[tuple[int, str]] = field(default_factory=lambda: deque(maxlen=TRACE_TAIL))
    latency: deque[tuple[int, list[Any]]] = field(default_factory=lambda: deque(maxlen=LATENCY_TAIL))
    """``[time s, function, duration ns]`` of each function_graph call or return."""
    session: dict[str, Any] = field(default_factory=dict)
    """The last batch's session, seq, written and dropped (a seq gap is a lost batch)."""
    lost_batches: int = 0
    changed: int = 0

    def view(self, since: int = -1) -> dict[str, Any]:
        return {"lines": [x for n, x in self.lines if n > since], "latency": [x for n, x in self.latency if n > since],
                "session": self.session, "lost_batches": self.lost_batches}


@dataclass
class FleetFeed:
    """Latest status/state per host and recent events, from one MQTT subscription."""

    broker_url: str
    username: str | None = None
    password: str | None = None
    hosts: dict[str, HostDocs] = field(default_factory=dict)
    events: deque[tuple[int, dict[str, Any]]] = field(default_factory=lambda: deque(maxlen=EVENT_TAIL))
    rollouts: RolloutBoards = field(default_factory=RolloutBoards)
    rollout_changed: dict[str, int] = field(default_factory=dict)
    traces: dict[str, TraceTail] = field(default_factory=dict)
    counter: int = 0
    connected: bool = False
    generation: int = 0
    """Grows at every (re)connection: the rollouts are read again from ``rollout.report`` after one."""

    # -- reading ------------------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {"cursor": self.counter, "broker": self._broker(),
                "hosts": {h: d.view() for h, d in sorted(self.hosts.items())},
                "events": [e for _, e in self.events], "rollouts": self.rollouts.view(),
                "traces": {h: t.view() for h, t in sorted(self.traces.items())}}

    def delta(self, since: int) -> dict[str, Any] | None:
        """What changed after cursor ``since`` (None when nothing did)."""
        if since >= self.counter:
            return None
        hosts = {h: d.view() for h, d in self.hosts.items() if d.changed > since}
        events = [e for n, e in self.events if n > since]
        changed = {n for n, c in self.rollout_changed.items() if c > since}
        rollouts: dict[str, Any] = self.rollouts.view(changed)
        rollouts.update({n: None for n in changed if n not in rollouts})  # gone
        traces = {h: t.view(since) for h, t in self.traces.items() if t.changed > since}
        return {"cursor": self.counter, "broker": self._broker(), "hosts": hosts, "events": events,
                "rollouts": rollouts, "traces": traces}

    def _broker(self) -> dict[str, Any]:
        url = urlsplit(self.broker_url)  # never the password: the page is no place for it
        shown = url._replace(netloc=f"{url.username}@{url.hostname}:{url.port}") if url.password else url
        return {"url": shown.geturl(), "connected": self.connected}

    # -- writing ------------------------------------------------------------------------------------------------

    def _bump(self) -> int:
        self.counter += 1
        return self.counter

    def ingest(self, topic: str, payload: bytes) -> None:
        """One MQTT message; anything that is not a JSON object is skipped (a foreign document never breaks the
        page)."""
        if topic.startswith(TOPIC_PREFIX):
            self._ingest_orchestrator(topic, payload)
            return
        host = host_of(topic)
        kind = topic.rsplit("/", 1)[-1]
        if host is None or kind not in ("status", "state", "events", "trace"):
            return
        if kind == "trace":
            self._ingest_trace(host, payload)
            return
        if not payload:  # a cleared retained document: the host is gone
            if kind == "status" and self.hosts.pop(host, None) is not None:
                self._bump()
            return
        try:
            doc = json.loads(payload)
        except ValueError:
            log.warning("dashboard_document_skipped", topic=topic, reason="not JSON")
            return
        if not isinstance(doc, dict):
            log.warning("dashboard_document_skipped", topic=topic, reason="not an object")
            return
        if kind == "events":
            n = self._bump()
            self.events.append((n, {**doc, "host": host}))
            if doc.get("type") == STALL_EVENT and isinstance(doc.get("data"), dict):
                docs = self.hosts.setdefault(host, HostDocs())
                docs.stall, docs.changed = {**doc["data"], "over": None}, n
            elif doc.get("type") in TRANSITION_OVER and host in self.hosts and self.hosts[host].stall is not None:
                docs = self.hosts[host]
                docs.stall, docs.changed = {**(docs.stall or {}), "over": doc.get("type")}, n
            return
        docs = self.hosts.setdefault(host, HostDocs())
        if kind == "state" and docs.state is not None and doc.get("version", 0) < docs.state.get("version", 0):
            return  # an older version delivered late
        setattr(docs, kind, doc)
        docs.changed = self._bump()

    def _ingest_trace(self, host: str, payload: bytes) -> None:
        try:
            doc = json.loads(payload)
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get("lines"), list):
            log.warning("dashboard_document_skipped", topic=f"{host}/trace", reason="not a trace batch")
            return
        tail = self.traces.setdefault(host, TraceTail())
        n = self._bump()
        last = tail.session
        if last.get("session") == doc.get("session") and isinstance(doc.get("seq"), int) \
                and isinstance(last.get("seq"), int) and doc["seq"] > last["seq"] + 1:
            tail.lost_batches += doc["seq"] - last["seq"] - 1
        tail.session = {k: doc.get(k) for k in ("boot_seq", "session", "seq", "written", "dropped")}
        tail.lines.extend((n, str(line)) for line in doc["lines"][-TRACE_TAIL:])
        for r in doc.get("records") or []:
            if isinstance(r, dict) and isinstance(r.get("duration_ns"), int):
                tail.latency.append((n, [r.get("time"), str(r.get("function")), r["duration_ns"]]))
        tail.changed = n

    def _ingest_orchestrator(self, topic: str, payload: bytes) -> None:
        doc: Any = None
        if payload:
            try:
                doc = json.loads(payload)
            except ValueError:
                log.warning("dashboard_document_skipped", topic=topic, reason="not JSON")
                return
            if not isinstance(doc, dict):
                log.warning("dashboard_document_skipped", topic=topic, reason="not an object")
                return
        name = self.rollouts.ingest(topic, doc)
        if name is not None:
            self.rollout_changed[name] = self._bump()

    def seed_rollout(self, name: str, report: dict[str, Any]) -> None:
        if self.rollouts.seed(name, report):
            self.rollout_changed[name] = self._bump()

    def _set_connected(self, up: bool) -> None:
        if up != self.connected:
            self.connected = up
            self._bump()

    # -- the subscription ---------------------------------------------------------------------------------------

    async def run(self, *, retry_min_s: float = 0.2, retry_max_s: float = 3.0) -> None:
        """Follow the broker until cancelled, reconnecting with backoff; every reconnect gets the retained
        documents again, so the view is rebuilt after a broker restart."""
        seeder = asyncio.create_task(self._seeder(), name="dashboard-rollout-seeder")
        try:
            await self._follow(retry_min_s, retry_max_s)
        finally:
            seeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await seeder

    async def _seeder(self, every_s: float = 0.3) -> None:
        """Read each rollout not yet read (new, or after a reconnect) from ``rollout.report``: its spec, its
        hosts' executions and its history (observers may ask for it)."""
        client: RolloutClient | None = None
        try:
            while True:
                await asyncio.sleep(every_s)
                todo = [n for n, b in self.rollouts.boards.items() if not b.seeded]
                if not todo or not self.connected:
                    continue
                try:
                    if client is None:
                        client = RolloutClient(self.broker_url, username=self.username, password=self.password,
                                               protocol="3.1.1", timeout=10,
                                               client_id=f"lpd-dashboard-r{time.time_ns() % 10**9}")
                        await client.__aenter__()
                    for name in todo:
                        try:
                            got = await client.report(name)
                        except ReplyError as e:
                            log.warning("dashboard_rollout_unread", rollout=name, code=e.code)
                            board = self.rollouts.boards.get(name)
                            if board is not None:
                                board.seeded = True  # not there (any more): the retained document is all we have
                            continue
                        self.seed_rollout(name, got.report)
                except (SdkError, OSError) as e:
                    log.warning("dashboard_rollout_report_failed", error=str(e))
                    if client is not None:
                        with contextlib.suppress(Exception):
                            await client.__aexit__(None, None, None)
                    client = None
                    await asyncio.sleep(2.0)
        finally:
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.__aexit__(None, None, None)

    async def _follow(self, retry_min_s: float, retry_max_s: float) -> None:
        url = urlsplit(self.broker_url)
        username = self.username if self.username is not None else (unquote(url.username) if url.username else None)
        password = self.password if self.password is not None else (unquote(url.password) if url.password else None)
        delay = retry_min_s
        while True:
            try:
                async with aiomqtt.Client(url.hostname or "127.0.0.1", url.port or 1883, username=username,
                                          password=password, protocol=aiomqtt.ProtocolVersion.V311,
                                          identifier=f"lpd-dashboard-{time.time_ns() % 10**9}",
                                          socket_options=[_NODELAY], timeout=5) as client:
                    # QoS 0 for the retained wildcards: over QoS 1 Mosquitto hands out at most ~1,020 of the
                    # retained messages a subscription matches and drops the rest (see FleetClient)
                    for topic in (ALL_STATUS, ALL_STATE, f"{ROLLOUT_PREFIX}+"):
                        await client.subscribe(topic, qos=0)
                    await client.subscribe(ALL_TRACE, qos=0)  # a live tail: a batch lost is counted, not resent
                    await client.subscribe(ALL_EVENTS, qos=1)  # the orchestrator's events too
                    self.generation += 1
                    for board in self.rollouts.boards.values():
                        board.seeded = False  # events were missed while away: read each rollout again
                    self._set_connected(True)
                    delay = retry_min_s
                    log.info("dashboard_feed_connected", broker=self._broker()["url"])
                    async for message in client.messages:
                        payload = message.payload if isinstance(message.payload, bytes) else b""
                        self.ingest(str(message.topic), payload)
            except aiomqtt.MqttError as e:
                if self.connected:
                    log.warning("dashboard_feed_lost", broker=self._broker()["url"], error=str(e))
                self._set_connected(False)
                await asyncio.sleep(delay)
                delay = min(delay * 2, retry_max_s)
