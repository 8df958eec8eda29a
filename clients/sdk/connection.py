"""``Connection``: one MQTT connection of the SDK, kept alive.

* Connect with TCP_NODELAY, MQTT 5 first and 3.1.1 when the broker refuses 5 (``protocol="auto"``).
* A supervisor task routes incoming messages to ``on_message``. When the connection drops:
  - with ``reconnect`` (the default), it connects again with exponential backoff, subscribes to every topic
    subscribed so far (the broker resends the retained ones) and calls ``on_reconnect``: the client re-sends
    the requests still waiting for a reply, with their ids, and the daemon answers repeats from its journal;
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
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY
from paho.mqtt.reasoncodes import ReasonCode

from clients.sdk.errors import BrokerUnreachable

NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
_UNSUPPORTED_PROTOCOL = {1, 132}  # CONNACK: 3.1.1 "unacceptable protocol version", 5 "unsupported protocol version"


class Connection:
    def __init__(self, hostname: str, port: int, *, client_id: str, username: str | None, password: str | None,
                 tls_context: ssl.SSLContext | None, protocol: Literal["auto", "5", "3.1.1"], timeout: float,
                 on_message: Callable[[aiomqtt.Message], None], reconnect: bool = True,
                 reconnect_min_s: float = 0.05, reconnect_max_s: float = 2.0,
                 on_reconnect: Callable[[], Awaitable[None]] | None = None,
                 on_lost: Callable[[BrokerUnreachable], None] | None = None) -> None:
        self.hostname, self.port = hostname, port
        self.client_id = client_id
        self.username, self.password = username, password
        self.tls_context = tls_context
        self.protocol_setting = protocol
        self.protocol = aiomqtt.ProtocolVersion.V311 if protocol == "3.1.1" else aiomqtt.ProtocolVersion.V5
        self.timeout = timeout
        self.reconnect = reconnect
        self.reconnect_min_s, self.reconnect_max_s = reconnect_min_s, reconnect_max_s
        self.on_message = on_message
        self.on_reconnect = on_reconnect
        self.on_lost = on_lost
        self.up = asyncio.Event()
        """Set while connected."""
        self.lost: BrokerUnreachable | None = None
        """Set when the connection is gone for good (no ``reconnect``, or closed)."""
        self.reconnects = 0
        self._client: aiomqtt.Client | None = None
        self._subscribed: dict[str, None] = {}  # insertion-ordered set
        self._supervisor: asyncio.Task[None] | None = None
        self._publishing: set[asyncio.Task[None]] = set()

    @property
    def opened(self) -> bool:
        return self._supervisor is not None

    @property
    def where(self) -> str:
        return f"{self.hostname}:{self.port}"

    def _new_client(self) -> aiomqtt.Client:
        v5 = self.protocol == aiomqtt.ProtocolVersion.V5
        return aiomqtt.Client(
            self.hostname, self.port, username=self.username, password=self.password, identifier=self.client_id,
            protocol=self.protocol, clean_session=None if v5 else True,
            clean_start=True if v5 else MQTT_CLEAN_START_FIRST_ONLY, tls_context=self.tls_context,
            socket_options=[NODELAY], timeout=self.timeout)

    async def _connect(self) -> aiomqtt.Client:
        while True:
            client = self._new_client()
            try:
                await client.__aenter__()
            except MqttConnectError as exc:
                rc = exc.rc.value if isinstance(exc.rc, ReasonCode) else exc.rc
                if (rc in _UNSUPPORTED_PROTOCOL and self.protocol_setting == "auto"
                        and self.protocol == aiomqtt.ProtocolVersion.V5):
                    self.protocol = aiomqtt.ProtocolVersion.V311
                    continue
                if rc in _UNSUPPORTED_PROTOCOL and self.protocol == aiomqtt.ProtocolVersion.V5:
                    raise BrokerUnreachable(f"broker {self.where} refused MQTT 5 ({exc}): it speaks 3.1.1 only; "
                                            "use protocol '3.1.1' or 'auto'") from None
                raise BrokerUnreachable(f"broker {self.where} refused the connection: {exc}") from None
            except aiomqtt.MqttError as exc:
                raise BrokerUnreachable(f"cannot reach broker {self.where}: {exc}") from None
            return client

    async def open(self) -> None:
        """Connect (a first failure is raised, not retried), then keep the connection in the background."""
        client = await self._connect()
        self._client = client
        self.up.set()
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise(client), name="lpsdk.connection")

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
            await _close(client)

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
                self.lost = BrokerUnreachable(f"connection to {self.where} lost: {error}")
                if self.on_lost is not None:
                    self.on_lost(self.lost)
                await self._drop()
                return
            await self._drop()
            client = await self._reconnect()

    async def _reconnect(self) -> aiomqtt.Client:
        delay = self.reconnect_min_s
        while True:
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self.reconnect_max_s)
            try:
                client = await self._connect()
            except BrokerUnreachable:
                continue
            try:
                for topic in self._subscribed:
                    await client.subscribe(topic, qos=1)
            except aiomqtt.MqttError:
                await _close(client)
                continue
            except asyncio.CancelledError:  # closed while reconnecting: do not leave this connection open
                await _close(client)
                raise
            self._client = client
            self.reconnects += 1
            self.up.set()
            if self.on_reconnect is not None:
                await self.on_reconnect()
            return client

    def _current(self) -> aiomqtt.Client | None:
        if self.lost is not None:
            raise self.lost
        return self._client if self.up.is_set() else None

    async def subscribe(self, topic: str, *, again: bool = False) -> None:
        """Subscribe (again: the broker resends the retained messages). While the connection is down, the
        subscription is made by the reconnect."""
        if topic in self._subscribed and not again:
            return
        self._subscribed[topic] = None
        client = self._current()
        if client is None:
            return
        try:
            await client.subscribe(topic, qos=1)
        except aiomqtt.MqttError as exc:
            if not self.reconnect:
                raise BrokerUnreachable(f"subscribe to {topic} failed: {exc}") from None

    async def publish(self, topic: str, payload: str, properties: Any = None) -> None:
        """Publish at QoS 1; while the connection is down, wait for the reconnect (the caller's timeout bounds
        the wait)."""
        while True:
            client = self._current()
            if client is None:
                if not self.reconnect:
                    raise BrokerUnreachable(f"connection to {self.where} lost")
                await self.up.wait()
                continue
            task = asyncio.get_running_loop().create_task(client.publish(topic, payload, qos=1,
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


async def _close(client: aiomqtt.Client) -> None:
    with contextlib.suppress(aiomqtt.MqttError, OSError):
        await client.__aexit__(None, None, None)
