"""A daemon told to speak MQTT 5 to a broker that speaks 3.1.1 only hears why: a warning whose hint is about the
protocol (--protocol 3.1.1 or auto), once per node, whether the broker refuses the CONNECT or stays silent."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import aiomqtt
from mqtt_fixtures import run
from structlog.testing import capture_logs

from daemon.mqtt.connect import BrokerConfig, Connector, aiomqtt_protocol
from daemon.mqtt.embedded import EmbeddedBroker
from schemas.brokers import BrokerAddress, Protocol

V5_CONNACK_UNSUPPORTED = b"\x20\x03\x00\x84\x00"  # CONNACK, reason 0x84 "unsupported protocol version", no properties


@contextlib.asynccontextmanager
async def fake_broker(answer: Callable[[asyncio.StreamWriter], None]) -> AsyncIterator[int]:
    """A TCP server that reads a CONNECT and answers with ``answer(writer)``; yields its port."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(4096)
        answer(writer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def make(node: BrokerAddress, protocol: Protocol, connack_s: float) -> aiomqtt.Client:
    return aiomqtt.Client(node.hostname, node.port, protocol=aiomqtt_protocol(protocol), identifier="hint-test",
                          timeout=connack_s)


async def warnings_for(port: int, seconds: float) -> list[dict[str, object]]:
    config = BrokerConfig((BrokerAddress("127.0.0.1", port),), protocol="5", reconnect_min_s=0.05,
                          reconnect_max_s=0.1, connect_timeout_s=1.0)
    with capture_logs() as logs, contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await Connector(config, make).connect()  # never connects: it keeps trying
    assert sum(1 for e in logs if e["event"] == "mqtt_connect_failed") >= 2, "it kept trying"
    return [e for e in logs if e["log_level"] == "warning"]


def test_a_refused_v5_connect_gets_a_protocol_hint_once() -> None:
    async def main() -> list[dict[str, object]]:
        async with fake_broker(lambda w: w.write(V5_CONNACK_UNSUPPORTED)) as port:
            return await warnings_for(port, 1.5)
    (warning,) = run(main())
    assert warning["event"] == "mqtt_protocol_refused"
    hint = str(warning["hint"])
    assert "--protocol 3.1.1 or auto" in hint
    assert "speaks 3.1.1 only" in hint
    assert "credential" not in hint


def test_a_broker_silent_to_a_v5_connect_gets_a_protocol_hint() -> None:
    async def main() -> list[dict[str, object]]:
        async with EmbeddedBroker() as broker:  # amqtt: 3.1.1 only, never answers a v5 CONNECT
            return await warnings_for(broker.port, 3.0)
    (warning,) = run(main())
    assert warning["event"] == "mqtt_protocol_refused"
    assert "--protocol 3.1.1 or auto" in str(warning["hint"])
