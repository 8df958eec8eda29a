"""One connection attempt and one subscription, with their failures told apart.

* ``open_client``: ``client.__aenter__()`` whose failure says why — the node is unreachable, it refused (its
  CONNACK's reason, e.g. the MQTT version or the credentials), or it sent no CONNACK at all (it closed the socket
  or stayed silent, as RabbitMQ < 3.13 does with an MQTT 5 CONNECT). aiomqtt alone waits for its timeout when the
  socket closes before the CONNACK; a hook on paho's socket-close callback fails the attempt at once.
* ``subscribe_checked``: a SUBACK with a failure code (0x80 and up), or none within the timeout, is a
  ``SubscriptionFailed`` carrying the broker's reason, never a subscription taken for granted.

(The daemon has the same two steps in ``daemon/mqtt/connect.py``: clients never import the daemon.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Literal

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.reasoncodes import ReasonCode

from clients.sdk.errors import BrokerUnreachable, SubscriptionFailed

UNSUPPORTED_PROTOCOL = {1, 132}  # CONNACK: 3.1.1 "unacceptable protocol version", 5 "unsupported protocol version"


class _LateSuback(logging.Filter):
    """A SUBACK that comes after its subscribe timed out (we already retried) is expected, not an error to print."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "on_subscribe callback" not in record.getMessage()


LOGGER = logging.getLogger("clients.sdk.mqtt")
LOGGER.addFilter(_LateSuback())


class _NoConnack(aiomqtt.MqttError):
    pass


@dataclass
class AttemptFailed(Exception):
    kind: Literal["unreachable", "no_connack", "refused_protocol", "refused"]
    reason: str

    def __str__(self) -> str:
        return self.reason


def _rc(exc: MqttConnectError) -> int | None:
    rc: Any = exc.rc
    if rc is None:
        return None
    return int(rc.value if isinstance(rc, ReasonCode) else rc)


async def open_client(client: aiomqtt.Client) -> None:
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
        if not client._connected.done():
            client._connected.set_exception(_NoConnack("the broker closed the connection before its CONNACK"))

    paho.on_socket_open, paho.on_socket_close = on_open, on_close
    try:
        await client.__aenter__()
    except MqttConnectError as exc:
        kind: Literal["refused_protocol", "refused"] = (
            "refused_protocol" if _rc(exc) in UNSUPPORTED_PROTOCOL else "refused")
        raise AttemptFailed(kind, f"refused the connection: {exc}") from None
    except _NoConnack as exc:
        raise AttemptFailed("no_connack", str(exc)) from None
    except aiomqtt.MqttError as exc:
        if opened:
            raise AttemptFailed("no_connack", f"sent no CONNACK within {client.timeout} s") from None
        raise AttemptFailed("unreachable", str(exc)) from None
    finally:
        paho.on_socket_open, paho.on_socket_close = previous_open, previous_close


async def close_client(client: aiomqtt.Client) -> None:
    """Disconnect, whatever state the connection is in; a loss aiomqtt recorded is read here, so that asyncio
    does not report it as never retrieved."""
    lost = client._disconnected
    if lost.done() and not lost.cancelled():
        lost.exception()
    with contextlib.suppress(aiomqtt.MqttError, OSError, TimeoutError):
        async with asyncio.timeout(2):
            await client.__aexit__(None, None, None)


def failure_code(code: Any) -> str | None:
    value = int(code.value if isinstance(code, ReasonCode) else code)
    if value < 0x80:
        return None
    name = getattr(code, "getName", None)
    return f"{name() if callable(name) else 'refused'} (0x{value:02x})"


async def subscribe_checked(client: aiomqtt.Client, topic: str, *, timeout: float, qos: int = 1) -> None:
    """QoS 1 by default; ``SubscriptionFailed`` on a refusal or no SUBACK in time, ``BrokerUnreachable`` when the
    connection is gone."""
    try:
        codes = await client.subscribe(topic, qos=qos, timeout=timeout)
    except aiomqtt.MqttError as exc:
        if str(exc) == "Operation timed out":
            raise SubscriptionFailed(topic, f"no SUBACK within {timeout:g} s") from None
        raise BrokerUnreachable(f"subscribe to {topic} failed: {exc}") from None
    for code in codes:
        reason = failure_code(code)
        if reason is not None:
            raise SubscriptionFailed(topic, f"the broker answered {reason}")
