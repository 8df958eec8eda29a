"""``Connection``: one MQTT connection of the SDK, kept alive, to one broker of one or more nodes.

* Connect with TCP_NODELAY to the first node that answers (``schemas.brokers.Rotation``), in the MQTT version
  that node speaks (``schemas.brokers.Negotiation``: with ``protocol="auto"`` MQTT 5 first, 3.1.1 at once when the
  node refuses 5, closes the connection or stays silent before its CONNACK).
* Every SUBACK is read (``clients.sdk.handshake``): a refused or unacknowledged subscription is retried with a
  doubling wait, then raised as ``SubscriptionFailed`` with the broker's reason.
* A supervisor task routes incoming messages to ``on_message``. When the connection drops:
  - with ``reconnect`` (the default), it connects again — the next node first, a backoff after a whole round of
    failures — subscribes to every topic subscribed so far (the broker resends the retained ones) and calls
    ``on_reconnect``: the client re-sends the requests still waiting for a reply, with their ids, and the daemon
    answers repeats from its journal;
  - without, the loss is final: ``on_lost`` is told, and every later call raises ``BrokerUnreachable``.
* ``publish`` waits while the connection is down and retries after a reconnect; the caller bounds the wait.

The session is clean (nothing is kept on the broker for an SDK client): what was published to it while it was
away is recovered by re-sending requests, not by a persistent session.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiomqtt
from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY

from clients.sdk.errors import BrokerUnreachable, SubscriptionFailed
from clients.sdk.handshake import LOGGER, AttemptFailed, close_client, open_client, subscribe_checked
from schemas.brokers import BrokerAddress, Negotiation, Protocol, ProtocolSetting, Rotation

NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
TCP_CONNECT_TIMEOUT_S = 5.0


def _version(protocol: Protocol) -> aiomqtt.ProtocolVersion:
    return aiomqtt.ProtocolVersion.V5 if protocol == "5" else aiomqtt.ProtocolVersion.V311


def _describe(node: BrokerAddress, exc: AttemptFailed) -> str:
    if exc.kind == "unreachable":
        return f"cannot reach broker {node.where}: {exc.reason}"
    return f"broker {node.where} {exc.reason}"


class Connection:
    def __init__(self, nodes: Sequence[BrokerAddress], *, client_id: str, tls_context: ssl.SSLContext | None,
                 protocol: ProtocolSetting, timeout: float, on_message: Callable[[aiomqtt.Message], None],
                 reconnect: bool = True, reconnect_min_s: float = 0.05, reconnect_max_s: float = 2.0,
                 on_reconnect: Callable[[], Awaitable[None]] | None = None,
                 on_lost: Callable[[BrokerUnreachable], None] | None = None, subscribe_attempts: int = 4,
                 will: aiomqtt.Will | None = None, pending_warning: int = 10) -> None:
        if not nodes:
            raise ValueError("no broker node given")
        self.nodes = tuple(nodes)
        self.client_id = client_id
        self.tls_context = tls_context
        self.protocol_setting = protocol
        self.rotation = Rotation(len(self.nodes), reconnect_min_s, reconnect_max_s)
        self.negotiation = Negotiation(protocol, len(self.nodes))
        self.timeout = timeout
        self.reconnect = reconnect
        self.reconnect_min_s, self.reconnect_max_s = reconnect_min_s, reconnect_max_s
        self.subscribe_attempts = subscribe_attempts
        self.will = will
        self.pending_warning = pending_warning
        """aiomqtt logs a warning for every publish made while more than this many are pending (a client that
        keeps hundreds of requests in flight on purpose raises it)."""
        """The last will each connection registers (a service's retained ``offline``; the broker publishes it when
        the connection ends without a DISCONNECT: a crash, kill -9, a cut network)."""
        self.on_message = on_message
        self.on_reconnect = on_reconnect
        self.on_lost = on_lost
        self.up = asyncio.Event()
        """Set while connected."""
        self.lost: BrokerUnreachable | None = None
        """Set when the connection is gone for good (no ``reconnect``, or closed)."""
        self.last_error: str | None = None
        """Why the last connection attempt or subscription failed (for timeout messages)."""
        self.reconnects = 0
        self._node = 0
        self._protocol: Protocol = self.negotiation.protocol(0)
        self._client: aiomqtt.Client | None = None
        self._subscribed: dict[str, int] = {}  # topic -> QoS, in the order subscribed
        self._supervisor: asyncio.Task[None] | None = None
        self._publishing: set[asyncio.Task[None]] = set()

    @property
    def opened(self) -> bool:
        return self._supervisor is not None

    @property
    def protocol(self) -> aiomqtt.ProtocolVersion:
        """The MQTT version of the connection (the last one while reconnecting)."""
        return _version(self._protocol)

    @property
    def node(self) -> BrokerAddress:
        """The node of the connection (the last one while reconnecting)."""
        return self.nodes[self._node]

    @property
    def where(self) -> str:
        if len(self.nodes) == 1:
            return self.nodes[0].where
        return ",".join(n.where for n in self.nodes)

    def _new_client(self, node: BrokerAddress, protocol: Protocol) -> aiomqtt.Client:
        v5 = protocol == "5"
        tls = self.tls_context if self.tls_context is not None else (
            ssl.create_default_context() if node.tls else None)
        client = aiomqtt.Client(
            node.hostname, node.port, username=node.username, password=node.password, identifier=self.client_id,
            protocol=_version(protocol), clean_session=None if v5 else True,
            clean_start=True if v5 else MQTT_CLEAN_START_FIRST_ONLY, tls_context=tls, socket_options=[NODELAY],
            timeout=self.timeout, logger=LOGGER, will=self.will)
        client._client.connect_timeout = min(TCP_CONNECT_TIMEOUT_S, self.timeout)
        client.pending_calls_threshold = self.pending_warning
        return client

    async def _attempt(self, index: int) -> aiomqtt.Client:
        """Connect to node ``index``, falling back to 3.1.1 at once when ``auto`` and 5 got no CONNACK."""
        node = self.nodes[index]
        while True:
            protocol = self.negotiation.protocol(index)
            client = self._new_client(node, protocol)
            try:
                await open_client(client)
            except AttemptFailed as exc:
                if exc.kind in ("no_connack", "refused_protocol") and self.negotiation.fall_back(
                        index, refused=exc.kind == "refused_protocol"):
                    continue
                if exc.kind == "refused":
                    self.negotiation.answered(index)
                else:
                    self.negotiation.failed(index)
                if exc.kind == "refused_protocol" and protocol == "5":
                    exc.reason = f"refused MQTT 5 ({exc.reason}): it speaks 3.1.1 only; use protocol '3.1.1' or 'auto'"
                elif exc.kind == "no_connack" and protocol == "5" and self.protocol_setting == "5":
                    exc.reason = (f"{exc.reason} to an MQTT 5 CONNECT (refused MQTT 5?): use protocol '3.1.1' or "
                                  "'auto'")
                self.last_error = _describe(node, exc)
                raise
            self.negotiation.answered(index)
            self._node, self._protocol = index, protocol
            return client

    async def open(self) -> None:
        """Connect to the first node that answers (a whole round of failures is raised, not retried), then keep
        the connection in the background."""
        reasons: list[str] = []
        for _ in self.nodes:
            index = self.rotation.index
            try:
                client = await self._attempt(index)
            except AttemptFailed as exc:
                reasons.append(_describe(self.nodes[index], exc))
                self.rotation.failed()
                continue
            self.rotation.connected()
            self._client = client
            self.up.set()
            self._supervisor = asyncio.get_running_loop().create_task(self._supervise(client),
                                                                      name="lpsdk.connection")
            return
        if len(reasons) == 1:
            raise BrokerUnreachable(reasons[0])
        raise BrokerUnreachable(f"no broker node answered ({len(reasons)} tried): " + "; ".join(reasons))

    async def close(self) -> None:
        self.lost = self.lost or BrokerUnreachable("the client is closed")
        self.up.clear()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        await self._drop()

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await close_client(client)

    async def _supervise(self, client: aiomqtt.Client) -> None:
        while True:
            try:
                async for message in client.messages:
                    self.on_message(message)
                error = "the message stream ended"
            except aiomqtt.MqttError as exc:
                error = str(exc)
            self.up.clear()
            for task in self._publishing:  # aiomqtt would wait for their PUBACKs until its own timeout
                task.cancel()
            if not self.reconnect:
                self.lost = BrokerUnreachable(f"connection to {self.node.where} lost: {error}")
                if self.on_lost is not None:
                    self.on_lost(self.lost)
                await self._drop()
                return
            self.last_error = f"connection to {self.node.where} lost: {error}"
            await self._drop()
            client = await self._reconnect()

    async def _reconnect(self) -> aiomqtt.Client:
        """The next node first; after a whole round of failures, a doubling wait."""
        delay = self.rotation.failed()
        while True:
            await asyncio.sleep(max(delay, 0.01) * random.uniform(0.8, 1.2))
            index = self.rotation.index
            try:
                client = await self._attempt(index)
            except AttemptFailed:
                delay = self.rotation.failed()
                continue
            try:
                for topic, qos in self._subscribed.items():
                    await self._subscribe_retrying(client, topic, qos)
            except BrokerUnreachable as exc:  # SubscriptionFailed included: this node cannot serve us now
                self.last_error = str(exc)
                await close_client(client)
                delay = self.rotation.failed()
                continue
            except asyncio.CancelledError:  # closed while reconnecting: do not leave this connection open
                await close_client(client)
                raise
            self.rotation.connected()
            self._client = client
            self.reconnects += 1
            self.last_error = None
            self.up.set()
            if self.on_reconnect is not None:
                await self.on_reconnect()
            return client

    def _current(self) -> aiomqtt.Client | None:
        if self.lost is not None:
            raise self.lost
        return self._client if self.up.is_set() else None

    async def _subscribe_retrying(self, client: aiomqtt.Client, topic: str, qos: int = 1) -> None:
        delay = 0.1
        for attempt in range(1, self.subscribe_attempts + 1):
            try:
                await subscribe_checked(client, topic, timeout=self.timeout, qos=qos)
                return
            except SubscriptionFailed as exc:
                self.last_error = str(exc)
                if attempt == self.subscribe_attempts:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def subscribe(self, topic: str, *, again: bool = False, qos: int = 1) -> None:
        """Subscribe (again: the broker resends the retained messages), checking the SUBACK; a subscription the
        broker keeps refusing raises ``SubscriptionFailed``. While the connection is down, the subscription is
        made by the reconnect. ``qos`` 0 for wildcards over many hosts: Mosquitto hands a QoS 1 subscriber at most
        ``max_inflight_messages`` + ``max_queued_messages`` (20 + 1,000 by default) of the retained messages a
        subscription matches and drops the rest, QoS 0 ones all."""
        if topic in self._subscribed and not again:
            return
        self._subscribed[topic] = qos
        client = self._current()
        if client is None:
            return
        try:
            await self._subscribe_retrying(client, topic, qos)
        except SubscriptionFailed:
            self._subscribed.pop(topic, None)
            raise
        except BrokerUnreachable:
            if not self.reconnect:
                raise

    async def publish(self, topic: str, payload: str, properties: Any = None, *, retain: bool = False) -> None:
        """Publish at QoS 1 (``retain``: as the topic's retained document); while the connection is down, wait for
        the reconnect (the caller's timeout bounds the wait)."""
        while True:
            client = self._current()
            if client is None:
                if not self.reconnect:
                    raise BrokerUnreachable(f"connection to {self.where} lost")
                await self.up.wait()
                continue
            task = asyncio.get_running_loop().create_task(client.publish(topic, payload, qos=1, retain=retain,
                                                                         properties=properties))
            self._publishing.add(task)
            try:
                await task
                return
            except aiomqtt.MqttError as exc:
                error = str(exc)
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if not task.cancelled() or (current is not None and current.cancelling()):
                    raise  # our caller was cancelled (its timeout), not the connection
                error = "connection lost"
            finally:
                self._publishing.discard(task)
            if not self.reconnect:
                raise BrokerUnreachable(f"publish to {self.where} failed: {error}")
            await asyncio.sleep(self.reconnect_min_s)  # the supervisor notices the loss and reconnects
