"""``MqttBridge``: connects one daemon's service to a broker and keeps it connected.

* Connect: TCP_NODELAY, MQTT 5 (3.1.1 when the broker refuses 5 or when configured), a persistent session
  (fixed client id per host, clean start off, a session expiry), the retained ``offline`` status as last will.
* On every (re)connect: subscribe ``request/+`` (QoS 1), publish the retained ``online`` status (birth) and
  ``state``, then the journaled replies never delivered.
* A request is acknowledged (PUBACK) only once the service has journaled it: a request the broker considers
  delivered survives a crash of the daemon. Replies go to the v5 response topic with the correlation data, or
  to the payload's ``reply_to``, or to ``reply``.
* Request tasks belong to the bridge's TaskGroup, not to a connection: a request running while the broker is
  away finishes, its reply stays in the journal and is published after the reconnect.
* ``stop()``: stop taking requests, give the running ones ``grace`` seconds, publish ``offline``, disconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any, Literal

import aiomqtt
import structlog
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from daemon.service import Outcome, Service
from schemas import StatusDoc

log = structlog.get_logger(__name__)

NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
_UNSUPPORTED_PROTOCOL = {1, 132}  # CONNACK: 3.1.1 "unacceptable protocol version", 5 "unsupported protocol version"


@dataclass(frozen=True)
class BrokerConfig:
    hostname: str
    port: int
    username: str | None = None
    password: str | None = None
    tls_context: ssl.SSLContext | None = None
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 86400
    reconnect_min_s: float = 0.1
    reconnect_max_s: float = 5.0


def _properties(packet_type: int) -> Any:
    return Properties(packet_type)  # type: ignore[no-untyped-call]


def _rc(exc: aiomqtt.MqttError) -> int | None:
    rc = getattr(exc, "rc", None)
    if rc is None:
        return None
    return int(getattr(rc, "value", rc))


class MqttBridge:
    def __init__(self, service: Service, config: BrokerConfig, *, version: str, grace_s: float = 5.0,
                 max_concurrent: int = 64) -> None:
        self.service = service
        self.config = config
        self.version = version
        self.grace_s = grace_s
        self.topics = service.topics
        self.client_id = f"livepatchd-{service.host}"
        self.online = asyncio.Event()
        """Set once the first birth is published (and again after each reconnect)."""
        self.protocol = aiomqtt.ProtocolVersion.V311 if config.protocol == "3.1.1" else aiomqtt.ProtocolVersion.V5
        self.connections = 0
        self._client: aiomqtt.Client | None = None
        self._generation = 0
        self._accepting = True
        self._stop = asyncio.Event()
        self._active: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(max_concurrent)  # a flood waits in the broker, not in our memory
        self._delivering: dict[tuple[str, str, bytes | None], aiomqtt.Client] = {}
        """Replies being published, and on which connection: the same reply is not published twice at once on
        one connection, but a connection that died mid-publish (its publish waits for a timeout) never holds
        back the reply on the next one (the client re-sends its request after a reconnect and waits for it)."""
        self._tg: asyncio.TaskGroup | None = None
        self._hold_until = 0.0
        """``sever(hold_s)``: no reconnect before this (monotonic) time."""

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until ``stop()`` (graceful) or cancellation (abrupt: the will says offline)."""
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            conn = tg.create_task(self._connection_loop(), name="mqtt.connection")
            await self._stop.wait()
            self._accepting = False  # requests arriving now are not acknowledged: the broker keeps them for us
            if self._active:
                await asyncio.wait(set(self._active), timeout=self.grace_s)
            await self._publish_offline()
            conn.cancel()

    def stop(self) -> None:
        self._stop.set()

    def sever(self, hold_s: float = 0.0) -> None:
        """Cut the broker connection at the socket, without DISCONNECT, so the broker publishes the last will (how
        a crashed host or a broken network looks from outside); reconnect no sooner than ``hold_s`` from now."""
        self._hold_until = time.monotonic() + hold_s
        client = self._client
        sock = client._client.socket() if client is not None else None
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _status(self, state: Literal["online", "offline"],
                reason: Literal["started", "reconnected", "shutdown", "connection_lost"]) -> bytes:
        doc = StatusDoc(host=self.service.host, state=state, boot_seq=self.service.boot_seq, reason=reason,
                        time=time.time(), version=self.version)
        return doc.model_dump_json().encode()

    def _new_client(self) -> aiomqtt.Client:
        cfg = self.config
        v5 = self.protocol == aiomqtt.ProtocolVersion.V5
        props = None
        if v5:
            props = _properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = cfg.session_expiry_s
        will = aiomqtt.Will(self.topics.status, self._status("offline", "connection_lost"), qos=1, retain=True)
        return aiomqtt.Client(
            cfg.hostname, cfg.port, username=cfg.username, password=cfg.password, identifier=self.client_id,
            protocol=self.protocol, will=will, clean_session=None if v5 else False,
            clean_start=False if v5 else MQTT_CLEAN_START_FIRST_ONLY,  # (3.1.1 has clean_session only)
            keepalive=cfg.keepalive_s, properties=props, tls_context=cfg.tls_context, socket_options=[NODELAY],
            timeout=10)

    async def _connection_loop(self) -> None:
        cfg = self.config
        delay = cfg.reconnect_min_s
        attempts = 0
        lost_at: float | None = None
        while True:
            attempts += 1
            client = self._new_client()
            try:
                async with client:
                    delay = cfg.reconnect_min_s
                    await self._connected(client, attempts, lost_at)
            except aiomqtt.MqttError as exc:
                rc = _rc(exc)
                if (isinstance(exc, MqttConnectError) and rc in _UNSUPPORTED_PROTOCOL
                        and cfg.protocol == "auto" and self.protocol == aiomqtt.ProtocolVersion.V5):
                    log.info("mqtt_protocol_fallback", to="3.1.1")
                    self.protocol = aiomqtt.ProtocolVersion.V311
                    continue
                if self._client is client:
                    lost_at, attempts = time.monotonic(), 0
                    log.warning("mqtt_disconnected", error=str(exc))
                else:
                    log.info("mqtt_connect_failed", error=str(exc), rc=rc, retry_in_s=round(delay, 3))
            finally:
                if self._client is client:
                    self._client = None
                    self.online.clear()
                    self.service.metrics.connected.set(0)
            await asyncio.sleep(max(delay * random.uniform(0.8, 1.2), self._hold_until - time.monotonic()))
            delay = min(delay * 2, cfg.reconnect_max_s)

    async def _connected(self, client: aiomqtt.Client, attempts: int, lost_at: float | None) -> None:
        client._client.manual_ack_set(True)  # PUBACK after the journal commit, not on receipt
        await client.subscribe(self.topics.request_filter, qos=1)
        self._generation += 1
        self._client = client
        self.connections += 1
        self.service.metrics.connected.set(1)
        reconnect = self.connections > 1
        await client.publish(self.topics.status, self._status("online", "reconnected" if reconnect else "started"),
                             qos=1, retain=True)
        await client.publish(self.topics.state, self.service.state.document().model_dump_json(), qos=1, retain=True)
        self.service.state.take_dirty()
        redelivered = 0
        for outcome in self.service.undelivered():
            redelivered += await self._deliver(outcome)
        if reconnect:
            self.service.metrics.reconnects.inc()
            outage = round(time.monotonic() - lost_at, 3) if lost_at is not None else None
            self.service.events.emit("broker.reconnected", attempts=attempts, outage_s=outage,
                                     redelivered=redelivered)
        log.info("mqtt_online", protocol="5" if self.protocol == aiomqtt.ProtocolVersion.V5 else "3.1.1",
                 reconnect=reconnect, redelivered=redelivered)
        self.online.set()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._publisher(client), name="mqtt.publisher")
                await self._receive(client)
                raise aiomqtt.MqttError("message stream ended")
        except* aiomqtt.MqttError as group:  # the connection is gone: the reconnect loop takes over
            first: BaseException = group
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None

    async def _publish_offline(self) -> None:
        client = self._client
        if client is None:
            return
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            async with asyncio.timeout(2):
                await client.publish(self.topics.status, self._status("offline", "shutdown"), qos=1, retain=True)
                log.info("mqtt_offline_published")

    # -- requests --------------------------------------------------------------------------------------------

    async def _receive(self, client: aiomqtt.Client) -> None:
        generation = self._generation
        async for message in client.messages:
            topic = message.topic.value
            verb = self.topics.verb_of(topic)
            if not self._accepting:
                continue
            if verb is None:
                self._ack(client, generation, message)
                continue
            assert self._tg is not None
            await self._slots.acquire()
            task = self._tg.create_task(self._serve(client, generation, message, verb), name="mqtt.request")
            self._active.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._active.discard(task)
        self._slots.release()

    def _ack(self, client: aiomqtt.Client, generation: int, message: aiomqtt.Message) -> None:
        # Only on the connection the message came in on: a PUBACK on a later connection could ack another
        # message that happens to reuse the packet id.
        if message.qos > 0 and generation == self._generation and self._client is client:
            client._client.ack(message.mid, message.qos)

    async def _serve(self, client: aiomqtt.Client, generation: int, message: aiomqtt.Message, verb: str) -> None:
        props = message.properties
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        payload = message.payload
        raw = payload if isinstance(payload, bytes) else str(payload or "").encode()
        outcome = await self.service.handle(verb, raw, response_topic=response_topic, correlation=correlation,
                                            ack=lambda: self._ack(client, generation, message))
        await self._deliver(outcome)

    async def _deliver(self, outcome: Outcome) -> int:
        """Publish a reply now if connected; a journaled one that cannot go now goes after the reconnect."""
        client = self._client
        rid = outcome.request_id
        key = (rid, *outcome.route) if rid is not None and outcome.journaled else None
        if client is None or (key is not None and self._delivering.get(key) is client):
            return 0
        props: Any = None
        if outcome.route.correlation is not None and self.protocol == aiomqtt.ProtocolVersion.V5:
            props = _properties(PacketTypes.PUBLISH)
            props.CorrelationData = outcome.route.correlation
        if key is not None:
            self._delivering[key] = client
        try:
            await client.publish(outcome.route.topic, outcome.payload, qos=1, properties=props)
        except aiomqtt.MqttError as exc:
            log.info("reply_deferred", request_id=rid, error=str(exc))
            return 0
        finally:
            if key is not None and self._delivering.get(key) is client:
                del self._delivering[key]
        self.service.delivered(outcome)
        return 1

    async def _publisher(self, client: aiomqtt.Client) -> None:
        """State, events and streams: published as they change, while this connection lasts."""
        service = self.service
        while True:
            await service.outgoing.wait()
            service.outgoing.clear()
            if service.state.take_dirty():
                await client.publish(self.topics.state, service.state.document().model_dump_json(), qos=1,
                                     retain=True)
            while (event := service.events.peek()) is not None:
                await client.publish(self.topics.events, event.model_dump_json(), qos=1)
                service.events.pop()
            while (message := service.streams.peek()) is not None:
                await client.publish(message[0], message[1], qos=1)
                service.streams.pop()
