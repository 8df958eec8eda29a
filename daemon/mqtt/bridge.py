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
* Reads and changes run in separate lanes (``daemon.mqtt.lanes``): a burst of changes never holds the slots
  the reads need. Each request's time per stage is in ``lpd_request_stage_seconds``.
* ``stop()``: stop taking requests, give the running ones ``grace`` seconds, publish ``offline``, disconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import time
from typing import Any, Literal

import aiomqtt
import structlog
from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from daemon.mqtt import discovery
from daemon.mqtt.connect import (
    NODELAY,
    BrokerConfig,
    Connector,
    Link,
    SubscribeRefused,
    aiomqtt_protocol,
    close_client,
    publish,
    subscribe_retrying,
)
from daemon.mqtt.lanes import Lane, Lanes, Stages, lane_of
from daemon.mqtt.liveness import Heartbeat
from daemon.service import Outcome, Service
from schemas.brokers import BrokerAddress, Protocol
from schemas.discovery import DISCOVER
from schemas.kernel import BrokerLink as BrokerLinkDoc

log = structlog.get_logger(__name__)

def _properties(packet_type: int) -> Any:
    return Properties(packet_type)  # type: ignore[no-untyped-call]


class MqttBridge:
    def __init__(self, service: Service, config: BrokerConfig, *, version: str, grace_s: float = 5.0,
                 max_concurrent: int = 64, change_backlog: int = 256, heartbeat_s: float = 10.0,
                 status_expiry_s: int = 86400) -> None:
        self.service = service
        self.config = config
        self.version = version
        self.grace_s = grace_s
        self.topics = service.topics
        self.client_id = f"livepatchd-{service.host}"
        self.online = asyncio.Event()
        """Set once the first birth is published (and again after each reconnect)."""
        self.heartbeat = Heartbeat(service.host, service.boot_seq, version, period_s=heartbeat_s,
                                   expiry_s=status_expiry_s)
        self.heartbeat.dead_cpus = lambda: service.state.dead_cpus
        self.connector = Connector(config, self._new_client)
        self.link: Link | None = None
        """The node and MQTT version of the connection in use (the last one while reconnecting)."""
        self.connections = 0
        self._client: aiomqtt.Client | None = None
        self._generation = 0
        self._accepting = True
        self._stop = asyncio.Event()
        # a flood waits in the broker, not in our memory: each lane has its limit, the changes a bounded backlog
        self.lanes = Lanes(reads=max_concurrent, changes=max_concurrent, backlog=change_backlog)
        self.stages = Stages(service.metrics.registry)
        self._delivering: dict[tuple[str, str, bytes | None], aiomqtt.Client] = {}
        """Replies being published, and on which connection: the same reply is not published twice at once on
        one connection. A key is released when its publish ends, and a publish ends when its connection is lost
        (``_gone``), so nothing holds back the reply on the next connection (the client re-sends its request
        after a reconnect and waits for it)."""
        self._gone: dict[aiomqtt.Client, asyncio.Event] = {}
        """Set when that connection is lost: a publish under way on it ends then (its reply stays in the journal
        for the next connection), not after the publish timeout."""
        self._tg: asyncio.TaskGroup | None = None
        self._hold_until = 0.0
        """``sever(hold_s)``: no reconnect before this (monotonic) time."""

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until ``stop()`` (graceful) or cancellation (abrupt: the will says offline)."""
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            self.lanes.spawn = lambda coro: tg.create_task(coro, name="mqtt.request")
            conn = tg.create_task(self._connection_loop(), name="mqtt.connection")
            await self._stop.wait()
            self._accepting = False  # requests arriving now are not acknowledged: the broker keeps them for us
            self.lanes.drop_parked()  # not acknowledged either: the broker hands them out again
            if self.lanes.active:
                await asyncio.wait(set(self.lanes.active), timeout=self.grace_s)
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
        return self.heartbeat.document(state, reason)

    @property
    def protocol(self) -> aiomqtt.ProtocolVersion:
        """The MQTT version of the connection in use (or of the next attempt)."""
        if self.link is not None:
            return aiomqtt_protocol(self.link.protocol)
        return aiomqtt_protocol(self.connector.negotiation.protocol(self.connector.rotation.index))

    def _new_client(self, node: BrokerAddress, protocol: Protocol, connack_s: float) -> aiomqtt.Client:
        cfg = self.config
        v5 = protocol == "5"
        props = None
        if v5:
            props = _properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = cfg.session_expiry_s
        will = aiomqtt.Will(self.topics.status, self.heartbeat.will(), qos=1, retain=True)
        return aiomqtt.Client(
            node.hostname, node.port, username=node.username, password=node.password, identifier=self.client_id,
            protocol=aiomqtt_protocol(protocol), will=will, clean_session=None if v5 else False,
            clean_start=False if v5 else MQTT_CLEAN_START_FIRST_ONLY,  # (3.1.1 has clean_session only)
            keepalive=cfg.keepalive_s, properties=props, tls_context=cfg.tls_context if node.tls else None,
            socket_options=[NODELAY], timeout=connack_s)

    async def _connection_loop(self) -> None:
        """Connect (any node, any version that converges), serve the connection, and after a loss start again on
        the next node. The persistent session (fixed client id, clean start off) is resumed on whichever node
        answers: a cluster keeps it for the client id, not for one node."""
        lost_at: float | None = None
        while True:
            client, link = await self.connector.connect()
            self._gone[client] = asyncio.Event()
            attempts = self.connector.attempts
            self.link = link
            self.service.link = BrokerLinkDoc(node=link.node.where, protocol=link.protocol)
            try:
                await self._connected(client, attempts, lost_at)
            except SubscribeRefused as exc:
                log.error("mqtt_subscribe_failed", node=link.node.where, topic=exc.topic, reason=exc.reason,
                          hint="check the broker's ACL for this user, or its health (a cluster electing leaders)")
            except aiomqtt.MqttError as exc:
                if self._client is client:
                    log.warning("mqtt_disconnected", node=link.node.where, error=str(exc))
                else:
                    log.info("mqtt_setup_failed", node=link.node.where, error=str(exc))
            finally:
                if self._client is client:
                    self._client = None
                    self.online.clear()
                    self.service.metrics.connected.set(0)
                    lost_at = time.monotonic()
                if (gone := self._gone.pop(client, None)) is not None:
                    gone.set()  # the publishes under way on it end now
                await close_client(client)
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # cancelled while the connection was failing: the connection's task group reported only the
                # MqttError (Python 3.11's TaskGroup drops the CancelledError then), so honour it here
                raise asyncio.CancelledError
            delay = self.connector.lost()
            await asyncio.sleep(max(delay, self._hold_until - time.monotonic()))

    async def _connected(self, client: aiomqtt.Client, attempts: int, lost_at: float | None) -> None:
        client._client.manual_ack_set(True)  # PUBACK after the journal commit, not on receipt
        cfg = self.config
        await subscribe_retrying(client, self.topics.request_filter, 1, attempts=cfg.subscribe_attempts,
                                 timeout=cfg.subscribe_timeout_s)
        await subscribe_retrying(client, DISCOVER, 0, attempts=cfg.subscribe_attempts,
                                 timeout=cfg.subscribe_timeout_s)
        self._generation += 1
        self._client = client
        self.connections += 1
        self.service.metrics.connected.set(1)
        reconnect = self.connections > 1
        reason: Literal["started", "reconnected"] = "reconnected" if reconnect else "started"
        v5 = self.protocol == aiomqtt.ProtocolVersion.V5
        await publish(client, self.topics.status, self._status("online", reason), qos=1, retain=True,
                             properties=self.heartbeat.properties(v5))
        await publish(client, self.topics.state, self.service.state.document().model_dump_json(), qos=1, retain=True)
        self.service.state.take_dirty()
        redelivered = 0
        for outcome in self.service.undelivered():
            sent = await self._deliver(outcome, redelivery=True)
            if sent < 0:
                break  # the connection is gone: the rest wait for the next one (they did not cost it)
            redelivered += sent
        if reconnect:
            self.service.metrics.reconnects.inc()
            outage = round(time.monotonic() - lost_at, 3) if lost_at is not None else None
            self.service.events.emit("broker.reconnected", attempts=attempts, outage_s=outage,
                                     redelivered=redelivered)
        log.info("mqtt_online", node=self.link.node.where if self.link else None,
                 protocol=self.link.protocol if self.link else None, reconnect=reconnect, redelivered=redelivered)
        self.online.set()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._publisher(client), name="mqtt.publisher")
                tg.create_task(self.heartbeat.run(client, self.topics.status, reason, v5=v5), name="mqtt.heartbeat")
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
            if topic == DISCOVER:
                self._answer_discovery(client, message)
                continue
            if verb is None:
                self._ack(client, generation, message)
                continue
            lane = lane_of(verb)
            taken = time.perf_counter()
            await self.lanes.submit(lane, functools.partial(self._serve, client, generation, message, verb,
                                                            lane=lane, taken=taken))

    def _answer_discovery(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        payload = message.payload if isinstance(message.payload, bytes) else b""
        status = self.heartbeat.current()
        assert self._tg is not None
        self._tg.create_task(discovery.answer(client, payload, status), name="mqtt.discover")

    def _ack(self, client: aiomqtt.Client, generation: int, message: aiomqtt.Message) -> None:
        # Only on the connection the message came in on: a PUBACK on a later connection could ack another
        # message that happens to reuse the packet id.
        if message.qos > 0 and generation == self._generation and self._client is client:
            client._client.ack(message.mid, message.qos)

    async def _serve(self, client: aiomqtt.Client, generation: int, message: aiomqtt.Message, verb: str, *,
                     lane: Lane = "read", taken: float | None = None) -> None:
        started = time.perf_counter()
        if taken is not None:
            self.stages.observe(lane, "dispatch", started - taken)
        try:
            props = message.properties
            response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
            correlation = getattr(props, "CorrelationData", None) if props is not None else None
            payload = message.payload
            raw = payload if isinstance(payload, bytes) else str(payload or "").encode()
            outcome = await self.service.handle(verb, raw, response_topic=response_topic, correlation=correlation,
                                                ack=lambda: self._ack(client, generation, message))
            handled = time.perf_counter()
            self.stages.observe(lane, "service", handled - started)
            if await self._deliver(outcome) > 0:
                self.stages.observe(lane, "reply", time.perf_counter() - handled)
        except Exception:  # a bug must cost one request, not the daemon (this task's failure would end the bridge)
            log.exception("request_task_crashed", verb=verb)
            self._ack(client, generation, message)  # or the broker hands the same poison back after a reconnect

    async def _deliver(self, outcome: Outcome, *, redelivery: bool = False) -> int:
        """Publish a reply now if connected; a journaled one that cannot go now goes after the reconnect. One that
        cannot be published is dropped after one try (``Service.drop``: an event, a log line, never tried again):
        one the MQTT client refuses, or a stored one whose redelivery — alone, right after a connect — loses the
        connection (a topic this broker refuses by dropping its publisher would cost every next connection too;
        a client that re-sends its request is still answered from the journal).
        1: published; 0: not (no connection, already under way, dropped); -1: the connection failed under it."""
        client = self._client
        rid = outcome.request_id
        key = (rid, *outcome.route) if rid is not None and outcome.journaled else None
        if client is None or (key is not None and self._delivering.get(key) is client):
            return 0
        if key is not None:
            self._delivering[key] = client
        try:
            props: Any = None
            if outcome.route.correlation is not None and self.protocol == aiomqtt.ProtocolVersion.V5:
                props = _properties(PacketTypes.PUBLISH)
                props.CorrelationData = outcome.route.correlation
            await self._publish_while_connected(client, outcome.route.topic, outcome.payload, props)
        except aiomqtt.MqttError as exc:
            if redelivery and key is not None:
                self.service.drop(rid, outcome.verb, f"the connection was lost while it was being redelivered "
                                                     f"alone, right after a connect: {exc}")
            else:
                log.info("reply_deferred", request_id=rid, error=str(exc))
            return -1
        except Exception as exc:  # noqa: BLE001  (paho refused the reply itself before sending: it never will)
            self.service.drop(rid, outcome.verb, f"the MQTT client refused to publish it: {exc!r}",
                              journaled=outcome.journaled)
            return 0
        finally:
            if key is not None and self._delivering.get(key) is client:
                del self._delivering[key]
        self.service.delivered(outcome)
        return 1

    async def _publish_while_connected(self, client: aiomqtt.Client, topic: str, payload: str, props: Any) -> None:
        """``client.publish`` (QoS 1, until its PUBACK), ended with ``MqttError`` as soon as the connection is lost:
        aiomqtt would wait for its timeout (the connection's, ~10 s) although no PUBACK can come any more."""
        gone = self._gone.get(client)
        if gone is None or gone.is_set():
            raise aiomqtt.MqttError("not connected")
        publishing = asyncio.ensure_future(client.publish(topic, payload, qos=1, properties=props))
        lost = asyncio.ensure_future(gone.wait())
        try:
            await asyncio.wait((publishing, lost), return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            if not publishing.done():
                publishing.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await publishing
        if publishing.cancelled():
            raise aiomqtt.MqttError("the connection was lost before the broker acknowledged the reply")
        publishing.result()

    async def _publisher(self, client: aiomqtt.Client) -> None:
        """State, events and streams: published as they change, while this connection lasts."""
        service = self.service
        while True:
            await service.outgoing.wait()
            service.outgoing.clear()
            if service.state.take_dirty():
                await publish(client, self.topics.state, service.state.document().model_dump_json(), qos=1,
                                     retain=True)
            while (event := service.events.peek()) is not None:
                await publish(client, self.topics.events, event.model_dump_json(), qos=1)
                service.events.pop()
            while (message := service.streams.peek()) is not None:
                await publish(client, message[0], message[1], qos=1)
                service.streams.pop()
