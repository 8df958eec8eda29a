"""An in-process MQTT 3.1.1 broker (amqtt) on 127.0.0.1 and a free port, for a daemon with no broker configured."""

from __future__ import annotations

import logging
import socket
from types import TracebackType

from amqtt.broker import Broker  # type: ignore[import-untyped]
from amqtt.errors import BrokerError  # type: ignore[import-untyped]

from daemon.errors import LivepatchdError


class BrokerStartError(LivepatchdError):
    code = "broker_unavailable"


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the caller binds it at once; a race is retried by the caller)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EmbeddedBroker:
    """``async with EmbeddedBroker() as b:`` serves MQTT 3.1.1 on ``127.0.0.1:b.port`` (anonymous, loopback only).

    asyncio streams set TCP_NODELAY on accepted sockets, so QoS 1 round trips do not stall on Nagle's algorithm.
    """

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or 0
        self._fixed = port is not None
        self._broker: Broker | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    async def start(self) -> None:
        amqtt_log = logging.getLogger("amqtt")
        if amqtt_log.level == logging.NOTSET:  # amqtt is chatty at INFO; a caller's own choice wins
            amqtt_log.setLevel(logging.WARNING)
        last: Exception | None = None
        for _ in range(1 if self._fixed else 5):
            port = self.port if self._fixed else free_port(self.host)
            broker = Broker({
                "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{port}"}},
                "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
            })
            try:
                await broker.start()
            except BrokerError as exc:  # amqtt wraps a bind failure (a port taken meanwhile): try another
                last = exc
                continue
            self._broker, self.port = broker, port
            return
        raise BrokerStartError(f"cannot start the embedded MQTT broker on {self.host}: {last}")

    async def stop(self) -> None:
        if self._broker is not None:
            broker, self._broker = self._broker, None
            await broker.shutdown()

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()
