"""The daemon's ``status`` documents: birth, heartbeats, death and the last will.

A last will is published by the broker node that held the connection: when that node dies, nobody publishes it
and the retained ``online`` stays. So the daemon also beats: every ``period_s`` it publishes its status again
(retained, ``beat`` 1, 2, …, ``heartbeat_at``), and clients call a host whose last beat is older than
``schemas.STALE_AFTER_BEATS`` periods ``stale`` (``StatusDoc.liveness``). Over MQTT 5 the online documents carry
a message expiry (``expiry_s``), so the broker forgets a host that stopped beating long ago; the offline ones
(shutdown, will) carry none.

The will's ``time`` is null: it is registered at connect and published later by the broker, at a time nobody
can know in advance.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Literal

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from daemon.mqtt.connect import publish
from schemas import StatusDoc

Reason = Literal["started", "reconnected", "shutdown", "connection_lost"]


class Heartbeat:
    def __init__(self, host: str, boot_seq: int, version: str, *, period_s: float, expiry_s: int) -> None:
        self.host, self.boot_seq, self.version = host, boot_seq, version
        self.period_s = period_s
        self.expiry_s = expiry_s
        self.beats = 0
        """Heartbeats published since the daemon started (all connections)."""
        self._beat = 0
        self._reason: Reason = "started"
        self.dead_cpus: Callable[[], list[int]] = list
        """The vCPUs that stopped for good: an online status with any is ``degraded``."""

    def document(self, state: Literal["online", "offline"], reason: Reason, *, beat: int = 0) -> bytes:
        now = time.time()
        online = state == "online"
        doc = StatusDoc(host=self.host, state=state, boot_seq=self.boot_seq, reason=reason, time=now,
                        version=self.version, beat=beat, heartbeat_at=now if online else None,
                        heartbeat_s=self.period_s if online else None)
        dead = self.dead_cpus() if online else []
        if dead:
            doc = doc.model_copy(update={"degraded": True, "dead_cpus": dead})
        return doc.model_dump_json().encode()

    def current(self) -> bytes:
        """The online status as of now (a discovery answer)."""
        return self.document("online", self._reason, beat=self._beat)

    def will(self) -> bytes:
        doc = StatusDoc(host=self.host, state="offline", boot_seq=self.boot_seq, reason="connection_lost",
                        time=None, version=self.version)
        return doc.model_dump_json().encode()

    def properties(self, v5: bool) -> Any:
        """MQTT 5 message expiry for an online document (none with 3.1.1, or with ``expiry_s`` 0)."""
        if not v5 or self.expiry_s <= 0:
            return None
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.MessageExpiryInterval = self.expiry_s
        return props

    async def run(self, client: aiomqtt.Client, topic: str, reason: Reason, *, v5: bool) -> None:
        """Beat on ``client`` until cancelled (the connection's end); an MqttError ends the connection."""
        self._beat, self._reason = 0, reason
        while True:
            await asyncio.sleep(self.period_s)
            self._beat += 1
            await publish(client, topic, self.document("online", reason, beat=self._beat), qos=1, retain=True,
                          properties=self.properties(v5))
            self.beats += 1
