"""``FleetFeed``: what the page shows, kept from MQTT alone.

One observer connection subscribes to every host's retained ``status`` and ``state`` and to its ``events``.
The feed keeps the latest document of each kind per host and a bounded tail of events, and hands out
*deltas*: the hosts changed since a cursor, so a thousand hosts changing state cost one message per batch
interval, not one per change. MQTT 3.1.1 is used on purpose: every broker (the embedded one too) speaks it,
and the feed needs nothing of 5.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomqtt
import structlog

from schemas import ALL_EVENTS, ALL_STATE, ALL_STATUS, host_of

log = structlog.get_logger("dashboard.feed")

_NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
EVENT_TAIL = 500


@dataclass
class HostDocs:
    status: dict[str, Any] | None = None
    state: dict[str, Any] | None = None
    changed: int = 0
    """The feed's change counter when this host last changed (the cursor deltas are cut at)."""


@dataclass
class FleetFeed:
    """Latest status/state per host and recent events, from one MQTT subscription."""

    broker_url: str
    username: str | None = None
    password: str | None = None
    hosts: dict[str, HostDocs] = field(default_factory=dict)
    events: deque[tuple[int, dict[str, Any]]] = field(default_factory=lambda: deque(maxlen=EVENT_TAIL))
    counter: int = 0
    connected: bool = False

    # -- reading ------------------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {"cursor": self.counter, "broker": self._broker(),
                "hosts": {h: {"status": d.status, "state": d.state} for h, d in sorted(self.hosts.items())},
                "events": [e for _, e in self.events]}

    def delta(self, since: int) -> dict[str, Any] | None:
        """What changed after cursor ``since`` (None when nothing did)."""
        if since >= self.counter:
            return None
        hosts = {h: {"status": d.status, "state": d.state} for h, d in self.hosts.items() if d.changed > since}
        events = [e for n, e in self.events if n > since]
        return {"cursor": self.counter, "broker": self._broker(), "hosts": hosts, "events": events}

    def _broker(self) -> dict[str, Any]:
        return {"url": self.broker_url, "connected": self.connected}

    # -- writing ------------------------------------------------------------------------------------------------

    def _bump(self) -> int:
        self.counter += 1
        return self.counter

    def ingest(self, topic: str, payload: bytes) -> None:
        """One MQTT message; anything that is not a JSON object is skipped (a foreign document never breaks the
        page)."""
        host = host_of(topic)
        kind = topic.rsplit("/", 1)[-1]
        if host is None or kind not in ("status", "state", "events"):
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
            self.events.append((self._bump(), {**doc, "host": host}))
            return
        docs = self.hosts.setdefault(host, HostDocs())
        if kind == "state" and docs.state is not None and doc.get("version", 0) < docs.state.get("version", 0):
            return  # an older version delivered late
        setattr(docs, kind, doc)
        docs.changed = self._bump()

    def _set_connected(self, up: bool) -> None:
        if up != self.connected:
            self.connected = up
            self._bump()

    # -- the subscription ---------------------------------------------------------------------------------------

    async def run(self, *, retry_min_s: float = 0.2, retry_max_s: float = 3.0) -> None:
        """Follow the broker until cancelled, reconnecting with backoff; every reconnect gets the retained
        documents again, so the view is rebuilt after a broker restart."""
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
                    for topic in (ALL_STATUS, ALL_STATE, ALL_EVENTS):
                        await client.subscribe(topic, qos=1)
                    self._set_connected(True)
                    delay = retry_min_s
                    log.info("dashboard_feed_connected", broker=self.broker_url)
                    async for message in client.messages:
                        payload = message.payload if isinstance(message.payload, bytes) else b""
                        self.ingest(str(message.topic), payload)
            except aiomqtt.MqttError as e:
                if self.connected:
                    log.warning("dashboard_feed_lost", broker=self.broker_url, error=str(e))
                self._set_connected(False)
                await asyncio.sleep(delay)
                delay = min(delay * 2, retry_max_s)
