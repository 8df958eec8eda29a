"""Making the bridge's connections: broker nodes in rotation, MQTT version negotiation, checked SUBACKs.

* ``Connector.connect()`` returns a connected aiomqtt client, trying the configured nodes in turn
  (``schemas.brokers.Rotation``: the next node at once, a backoff only after a whole round failed) and
  negotiating the version per node (``schemas.brokers.Negotiation``). It never gives up: the daemon waits for
  its broker as long as it runs.
* ``open_client`` classifies why a connection attempt failed. aiomqtt alone cannot tell "the broker closed the
  socket before its CONNACK" (it then waits for its timeout and says "Operation timed out"): a hook on paho's
  socket-close callback fails the attempt at once with ``NoConnack``.
* ``subscribe_checked`` reads the SUBACK: a subscription the broker refused or never acknowledged raises
  ``SubscribeRefused`` with the broker's reason instead of being taken for granted.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import aiomqtt
import structlog
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.reasoncodes import ReasonCode

from schemas.brokers import BrokerAddress, Negotiation, Protocol, ProtocolSetting, Rotation

log = structlog.get_logger(__name__)

NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
PROTOCOL_HINTS = {
    "refused_protocol": "the broker refused MQTT 5: it speaks 3.1.1 only; start the daemon with --protocol 3.1.1 or "
                        "auto (LIVEPATCHD_MQTT_PROTOCOL)",
    "no_connack": "the broker did not answer an MQTT 5 CONNECT, as a broker speaking 3.1.1 only does: try --protocol "
                  "3.1.1 or auto (LIVEPATCHD_MQTT_PROTOCOL)",
}
UNSUPPORTED_PROTOCOL = {1, 132}  # CONNACK: 3.1.1 "unacceptable protocol version", 5 "unsupported protocol version"


@dataclass(frozen=True)
class BrokerConfig:
    nodes: tuple[BrokerAddress, ...]
    """One broker: a single node or the nodes of a cluster, tried in this order."""
    tls_context: ssl.SSLContext | None = None
    """Used for the nodes whose URL is ``mqtts://``."""
    protocol: ProtocolSetting = "auto"
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 86400
    reconnect_min_s: float = 0.1
    reconnect_max_s: float = 5.0
    connect_timeout_s: float = 10.0
    """The longest wait for a CONNACK. With several nodes the first wait is shorter (``cluster_connack_s``): a
    node of a cluster that cannot load the session yet (NATS while it elects a JetStream leader holds the
    CONNECT for 5 s, then closes it) is left for the next one; after a round in which every node stayed silent
    the wait doubles, up to this."""
    cluster_connack_s: float = 2.0
    subscribe_timeout_s: float = 10.0
    subscribe_attempts: int = 5

    @classmethod
    def loopback(cls, port: int, **options: Any) -> BrokerConfig:
        """One node on 127.0.0.1 (the embedded broker), so callers need not build addresses themselves."""
        return cls((BrokerAddress("127.0.0.1", port),), **options)


class NoConnack(aiomqtt.MqttError):
    """The connection closed before the broker sent its CONNACK."""


@dataclass
class ConnectFailure(Exception):
    kind: Literal["unreachable", "no_connack", "refused_protocol", "refused"]
    reason: str
    rc: int | None = None

    def __str__(self) -> str:
        return self.reason


class SubscribeRefused(aiomqtt.MqttError):
    """The broker refused a subscription (SUBACK failure code) or sent no SUBACK in time."""

    def __init__(self, topic: str, reason: str) -> None:
        super().__init__(f"subscription to {topic} failed: {reason}")
        self.topic = topic
        self.reason = reason


def _rc(exc: MqttConnectError) -> int | None:
    rc: Any = exc.rc
    if rc is None:
        return None
    return int(rc.value if isinstance(rc, ReasonCode) else rc)


async def open_client(client: aiomqtt.Client) -> None:
    """``client.__aenter__()``, with a failure classified as a ``ConnectFailure``."""
    paho = client._client
    opened = False
    previous_open, previous_close = paho.on_socket_open, paho.on_socket_close

    def on_open(c: Any, userdata: Any, sock: Any) -> None:
        nonlocal opened
        opened = True
        if previous_open is not None:
            previous_open(c, userdata, sock)

    def on_close(c: Any, userdata: Any, sock: Any) -> None:
        if previous_close is not None:
            previous_close(c, userdata, sock)
        pending = client._connected
        if not pending.done():
            pending.set_exception(NoConnack("the broker closed the connection before its CONNACK"))

    paho.on_socket_open, paho.on_socket_close = on_open, on_close
    try:
        await client.__aenter__()
    except MqttConnectError as exc:
        rc = _rc(exc)
        kind: Literal["refused_protocol", "refused"] = "refused_protocol" if rc in UNSUPPORTED_PROTOCOL else "refused"
        raise ConnectFailure(kind, f"the broker refused the connection: {exc}", rc) from None
    except NoConnack as exc:
        raise ConnectFailure("no_connack", str(exc)) from None
    except aiomqtt.MqttError as exc:
        if opened:  # the socket was open: the broker stayed silent
            raise ConnectFailure("no_connack", f"no CONNACK within {client.timeout} s ({exc})") from None
        raise ConnectFailure("unreachable", str(exc)) from None
    finally:
        paho.on_socket_open, paho.on_socket_close = previous_open, previous_close


async def close_client(client: aiomqtt.Client) -> None:
    """Disconnect, whatever state the connection is in; a loss aiomqtt recorded is read here, so that asyncio
    does not report it as never retrieved."""
    lost = client._disconnected
    if lost.done() and not lost.cancelled():
        lost.exception()
    with contextlib.suppress(aiomqtt.MqttError, OSError, asyncio.TimeoutError):
        async with asyncio.timeout(2):
            await client.__aexit__(None, None, None)


async def publish(client: aiomqtt.Client, topic: str, payload: str | bytes, **kwargs: Any) -> None:
    """``client.publish``, then honour a cancellation that came meanwhile: Python 3.11's ``asyncio.wait_for``
    (aiomqtt's wait for the PUBACK) swallows a cancellation that races the PUBACK's arrival, and a publishing
    loop would then wait for its next message forever instead of ending with its connection."""
    await client.publish(topic, payload, **kwargs)
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def failure_code(code: Any) -> str | None:
    """The reason of a failed SUBACK return code (0x80 and up), or None when the subscription was granted."""
    value = int(code.value if isinstance(code, ReasonCode) else code)
    if value < 0x80:
        return None
    name = getattr(code, "getName", None)
    return f"{name() if callable(name) else 'refused'} (0x{value:02x})"


async def subscribe_checked(client: aiomqtt.Client, topic: str, qos: int, *, timeout: float) -> None:
    """Subscribe and read the SUBACK; ``SubscribeRefused`` when it says no or does not come within ``timeout``.
    Any other MqttError means the connection is gone."""
    try:
        codes = await client.subscribe(topic, qos=qos, timeout=timeout)
    except aiomqtt.MqttError as exc:
        if str(exc) == "Operation timed out":
            raise SubscribeRefused(topic, f"no SUBACK within {timeout} s") from None
        raise
    for code in codes:
        reason = failure_code(code)
        if reason is not None:
            raise SubscribeRefused(topic, f"the broker answered {reason}")


async def subscribe_retrying(client: aiomqtt.Client, topic: str, qos: int, *, attempts: int, timeout: float,
                             first_delay_s: float = 0.2, max_delay_s: float = 5.0) -> None:
    """``subscribe_checked`` up to ``attempts`` times with a doubling wait between them (a clustered broker may
    refuse while it elects a new leader for the session's stream); the last refusal is raised."""
    delay = first_delay_s
    for attempt in range(1, attempts + 1):
        try:
            await subscribe_checked(client, topic, qos, timeout=timeout)
            return
        except SubscribeRefused as exc:
            if attempt == attempts:
                raise
            log.warning("mqtt_subscribe_refused", topic=topic, reason=exc.reason, attempt=attempt,
                        retry_in_s=round(delay, 3))
        await asyncio.sleep(delay)
        delay = min(delay * 2, max_delay_s)


@dataclass
class Link:
    """The connection in use: which node, which MQTT version (``info`` shows it)."""

    node: BrokerAddress
    protocol: Protocol


@dataclass
class Connector:
    """Connections to one broker for one client id, made with ``make(node, protocol, connack_timeout_s)`` (the
    caller builds the
    aiomqtt client: will, session, properties)."""

    config: BrokerConfig
    make: Callable[[BrokerAddress, Protocol, float], aiomqtt.Client]
    rotation: Rotation = field(init=False)
    negotiation: Negotiation = field(init=False)
    attempts: int = 0
    """Attempts since the last successful connection."""
    hinted: set[BrokerAddress] = field(default_factory=set)
    """Nodes already told about as refusing MQTT 5."""
    connack_s: float = field(init=False)
    _silent_in_round: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        cfg = self.config
        self.rotation = Rotation(len(cfg.nodes), cfg.reconnect_min_s, cfg.reconnect_max_s)
        self.negotiation = Negotiation(cfg.protocol, len(cfg.nodes))
        self.connack_s = self._first_connack_wait()

    def _first_connack_wait(self) -> float:
        cfg = self.config
        return cfg.connect_timeout_s if len(cfg.nodes) == 1 else min(cfg.cluster_connack_s, cfg.connect_timeout_s)

    def _silent(self, silent: bool) -> None:
        """Count a node that stayed silent; after a whole round of them, wait longer for a CONNACK."""
        self._silent_in_round = self._silent_in_round + 1 if silent else 0
        if self._silent_in_round >= len(self.config.nodes):
            self._silent_in_round = 0
            self.connack_s = min(self.connack_s * 2, self.config.connect_timeout_s)

    @property
    def node(self) -> BrokerAddress:
        return self.config.nodes[self.rotation.index]

    async def connect(self) -> tuple[aiomqtt.Client, Link]:
        """Until a node accepts: a connected client and what it is connected to."""
        while True:
            index = self.rotation.index
            node = self.config.nodes[index]
            protocol = self.negotiation.protocol(index)
            self.attempts += 1
            client = self.make(node, protocol, self.connack_s)
            try:
                await open_client(client)
            except ConnectFailure as exc:
                if exc.kind in ("no_connack", "refused_protocol") and self.negotiation.fall_back(
                        index, refused=exc.kind == "refused_protocol"):
                    log.info("mqtt_protocol_fallback", node=node.where, to="3.1.1", why=exc.reason)
                    continue
                if exc.kind == "refused":
                    self.negotiation.answered(index)
                else:
                    self.negotiation.failed(index)
                self._silent(exc.kind == "no_connack" and exc.reason.startswith("no CONNACK within"))
                delay = self.rotation.failed()
                if protocol == "5" and exc.kind in ("no_connack", "refused_protocol") and node not in self.hinted:
                    # what a 3.1.1-only broker does to a v5 CONNECT (amqtt stays silent): say so once per node,
                    # rather than let it pass for an address or credentials problem
                    self.hinted.add(node)
                    log.warning("mqtt_protocol_refused", node=node.where, error=exc.reason,
                                hint=PROTOCOL_HINTS[exc.kind])
                log.info("mqtt_connect_failed", node=node.where, protocol=protocol, error=exc.reason, rc=exc.rc,
                         retry_in_s=round(delay, 3), next_node=self.node.where)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                continue
            self.negotiation.answered(index)
            self.rotation.connected()
            self._silent_in_round, self.connack_s = 0, self._first_connack_wait()
            client.timeout = self.config.connect_timeout_s  # PUBACKs and the like: the connection's own waits
            log.info("mqtt_connected", node=node.where, protocol=protocol, attempts=self.attempts)
            return client, Link(node, protocol)

    def lost(self) -> float:
        """The connection was lost (or its setup failed): rotate; returns how long to wait first."""
        self.attempts = 0
        delay = self.rotation.failed()
        return max(delay, self.config.reconnect_min_s)


def aiomqtt_protocol(protocol: Protocol) -> aiomqtt.ProtocolVersion:
    return aiomqtt.ProtocolVersion.V5 if protocol == "5" else aiomqtt.ProtocolVersion.V311


def with_credentials(nodes: tuple[BrokerAddress, ...], username: str | None,
                     password: str | None) -> tuple[BrokerAddress, ...]:
    """Settings' credentials win over each URL's."""
    return tuple(replace(n, username=username or n.username, password=password if password is not None
                         else n.password) for n in nodes)

