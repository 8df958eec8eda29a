"""Protocol negotiation that always converges, and broker lists (``schemas.brokers``), against real brokers.

RabbitMQ 3.x (before 3.13) closes the connection on an MQTT 5 CONNECT without a CONNACK: ``auto`` must take that
as a refusal and speak 3.1.1 at once, in the daemon and in the SDK. A listener that accepts and never answers
stands for a broker too busy to send its CONNACK.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from broker_fixtures import RabbitMQ
from mqtt_fixtures import DaemonThread, Mosquitto, daemon_settings, free_port, run
from pydantic import ValidationError
from typer.testing import CliRunner

from clients.cli.main import app
from clients.sdk import BrokerUnreachable, LivepatchClient
from daemon.settings import Settings
from schemas.brokers import Negotiation, Rotation, parse_broker_urls


@pytest.fixture(scope="module")
def rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQ]:
    broker = RabbitMQ(tmp_path_factory.mktemp("rabbitmq"))
    try:
        yield broker.start()
    finally:
        broker.stop()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A TCP listener that accepts connections and never says a word (a broker that sends no CONNACK)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                accepted.append(conn)
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield int(server.getsockname()[1])
    stop.set()
    thread.join(5)
    for conn in accepted:
        conn.close()
    server.close()


def test_the_sdk_falls_back_at_once_when_the_broker_drops_a_v5_connect(rabbitmq: RabbitMQ) -> None:
    async def main() -> tuple[str, float]:
        started = time.monotonic()
        async with LivepatchClient(rabbitmq.url, "nobody", timeout=5) as c:
            return c.mqtt_version, time.monotonic() - started
    version, took = run(main())
    assert version == "3.1.1"
    assert took < 2.0  # not a CONNACK timeout (5 s) first


def test_forcing_v5_on_a_broker_that_drops_it_names_the_fix(rabbitmq: RabbitMQ) -> None:
    async def main() -> None:
        async with LivepatchClient(rabbitmq.url, "nobody", timeout=3, protocol="5"):
            pass
    with pytest.raises(BrokerUnreachable, match=r"CONNACK.*MQTT 5.*'3\.1\.1' or 'auto'"):
        run(main())


def test_the_daemon_converges_on_31_and_info_says_so(rabbitmq: RabbitMQ, tmp_path: Path,
                                                     capfd: pytest.CaptureFixture[str]) -> None:
    d = DaemonThread(daemon_settings(tmp_path, rabbitmq.url, mqtt_protocol="auto")).start(timeout=60)
    try:
        async def main() -> tuple[str | None, str | None]:
            async with LivepatchClient(rabbitmq.url, d.host, timeout=10) as c:
                info = await c.info()
                return (info.broker.protocol, info.broker.node) if info.broker else (None, None)
        assert run(main()) == ("3.1.1", f"127.0.0.1:{rabbitmq.mqtt_port}")
    finally:
        d.stop()
    logged = capfd.readouterr().err
    assert "mqtt_protocol_fallback" in logged
    assert "mqtt_connect_failed" not in logged  # no retry loop on 5, no backoff before 3.1.1


def test_mosquitto_keeps_v5_and_info_says_so(lpd: DaemonThread) -> None:
    async def main() -> str | None:
        async with LivepatchClient(lpd.url, lpd.host) as c:
            info = await c.info()
            assert c.mqtt_version == "5"
            return info.broker.protocol if info.broker else None
    assert run(main()) == "5"


def test_the_embedded_broker_is_spoken_to_in_31(tmp_path: Path) -> None:
    d = DaemonThread(daemon_settings(tmp_path, None)).start(timeout=60)
    try:
        async def main() -> str | None:
            async with LivepatchClient(d.url, d.host, protocol="3.1.1") as c:
                info = await c.info()
                return info.broker.protocol if info.broker else None
        assert run(main()) == "3.1.1"
    finally:
        d.stop()


def test_a_broker_that_never_answers_fails_in_bounded_time(silent_port: int) -> None:
    async def main() -> None:
        async with LivepatchClient(f"mqtt://127.0.0.1:{silent_port}", "x", timeout=0.5):
            pass
    started = time.monotonic()
    with pytest.raises(BrokerUnreachable, match="no CONNACK"):
        run(main())
    assert time.monotonic() - started < 3.0  # 5 then 3.1.1, each bounded by the timeout


def test_a_silent_node_is_skipped_for_the_next_one(silent_port: int, mosquitto: Mosquitto) -> None:
    async def main() -> str:
        async with LivepatchClient(f"mqtt://127.0.0.1:{silent_port},{mosquitto.url}", "x", timeout=0.5) as c:
            return c.node
    assert run(main()) == f"127.0.0.1:{mosquitto.port}"


# -- the rules themselves ------------------------------------------------------------------------------------------


def test_negotiation_converges() -> None:
    n = Negotiation("auto", 2)
    assert n.protocol(0) == "5"
    assert n.fall_back(0, refused=False)  # closed before CONNACK: 3.1.1 at once
    assert n.protocol(0) == "3.1.1"
    n.failed(0)  # 3.1.1 failed too: the node is down, not v5-less
    assert n.protocol(0) == "5"
    assert n.fall_back(0, refused=False)
    n.answered(0)  # 3.1.1 answered: keep it
    n.failed(0)
    assert n.protocol(0) == "3.1.1"
    assert not n.fall_back(0, refused=True)  # nothing lower to fall to
    assert n.protocol(1) == "5"  # a silence counts for its node only
    assert n.fall_back(1, refused=True)
    n.failed(1)
    assert n.protocol(1) == "3.1.1"  # a CONNACK refusal is definitive
    cluster = Negotiation("auto", 3)
    assert cluster.fall_back(0, refused=True)
    assert [cluster.protocol(i) for i in range(3)] == ["3.1.1"] * 3  # and holds for every node of the broker
    cluster.failed(2)
    assert cluster.protocol(2) == "3.1.1"
    assert not Negotiation("5", 1).fall_back(0, refused=True)
    assert Negotiation("3.1.1", 1).protocol(0) == "3.1.1"


def test_rotation_tries_every_node_before_backing_off() -> None:
    r = Rotation(3, 0.1, 0.5)
    waits = [r.failed() for _ in range(9)]
    assert waits == [0.0, 0.0, 0.1, 0.0, 0.0, 0.2, 0.0, 0.0, 0.4]
    assert r.index == 0
    r.connected()
    assert [r.failed() for _ in range(3)] == [0.0, 0.0, 0.1]
    single = Rotation(1, 0.1, 0.3)
    assert [single.failed() for _ in range(4)] == [0.1, 0.2, 0.3, 0.3]


def test_broker_lists() -> None:
    nodes = parse_broker_urls("mqtt://a:1, mqtts://u:p%2Cq@b, c:3")
    assert [(n.hostname, n.port, n.tls) for n in nodes] == [("a", 1, False), ("b", 8883, True), ("c", 3, False)]
    assert nodes[1].password == "p,q"
    assert parse_broker_urls(["mqtt://a:1", "mqtt://b:2,mqtt://c:3"])[2].port == 3
    for bad, why in (("mqtt://a:1,,mqtt://b:2", "empty entry"), ("", "empty entry"),
                     ("mqtt://a:1,mqtt://a:1", "twice"), ("http://a", "expected mqtt"),
                     ("mqtt://a:99999", "out of range"), ("mqtt://a/x", "only mqtt")):
        with pytest.raises(ValueError, match=why):
            parse_broker_urls(bad)


def test_lpctl_info_shows_the_protocol(lpd: DaemonThread) -> None:
    result = CliRunner().invoke(app, ["--broker", lpd.url, "--host", lpd.host, "info"])
    assert result.exit_code == 0, result.output
    assert f"127.0.0.1:{lpd.url.rsplit(':', 1)[1]} (MQTT 5)" in result.stdout
    result = CliRunner().invoke(app, ["--broker", lpd.url, "--host", lpd.host, "--json", "info"])
    assert json.loads(result.stdout)["data"]["broker"]["protocol"] == "5"


def test_the_daemon_takes_a_list_and_skips_a_dead_node(mosquitto: Mosquitto, tmp_path: Path) -> None:
    dead = f"mqtt://127.0.0.1:{free_port()}"
    d = DaemonThread(daemon_settings(tmp_path, f"{dead},{mosquitto.url}")).start(timeout=60)
    try:
        assert d.daemon.bridge is not None
        assert d.daemon.bridge.link is not None
        assert d.daemon.bridge.link.node.port == mosquitto.port
        assert d.url == f"{dead},{mosquitto.url}"
    finally:
        d.stop()


def test_daemon_broker_settings() -> None:
    s = Settings(broker_url="mqtt://u:p@a:1,mqtts://b", username="svc", tls_ca_file=None)
    nodes = s.brokers()
    assert nodes is not None
    assert [(n.hostname, n.port, n.tls, n.username, n.password) for n in nodes] == [
        ("a", 1, False, "svc", "p"), ("b", 8883, True, "svc", None)]
    with pytest.raises(ValidationError, match="twice"):
        Settings(broker_url="mqtt://a:1,mqtt://a:1")
