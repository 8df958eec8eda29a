"""The SDK's own behaviour: timeouts, unreachable brokers, clients without a host, metrics it causes."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import pytest
from mqtt_fixtures import DaemonThread, Mosquitto, daemon_settings, free_port, run

from clients.sdk import BrokerUnreachable, LivepatchClient, ReplyError, RequestTimeout, SdkError, parse_broker_url


def test_parse_broker_url() -> None:
    assert parse_broker_url("mqtt://u:p%40ss@h:1234") == ("h", 1234, False, "u", "p@ss")
    assert parse_broker_url("mqtts://broker.example") == ("broker.example", 8883, True, None, None)
    assert parse_broker_url("127.0.0.1:1999")[:2] == ("127.0.0.1", 1999)
    with pytest.raises(ValueError, match="expected"):
        parse_broker_url("http://h")


def test_timeout_for_a_host_that_is_not_there(lpd: DaemonThread) -> None:
    async def main() -> None:
        async with LivepatchClient(lpd.url, "not-a-host", timeout=0.3) as c:
            with pytest.raises(RequestTimeout) as exc:
                await c.info()
            assert exc.value.verb == "info"
            assert exc.value.request_id
            assert await c.status(wait=0.2) is None
    run(main())


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_an_oversized_request_gets_its_refusal(lpd: DaemonThread, protocol: str) -> None:
    """Not a timeout: the refusal finds its way back by the id in the payload's first bytes (and, over MQTT 5,
    by the correlation data as well)."""
    async def main() -> None:
        async with LivepatchClient(lpd.url, lpd.host, timeout=5, protocol=protocol) as c:  # type: ignore[arg-type]
            with pytest.raises(ReplyError) as err:
                await c.request("info", {"pad": "a" * 70_000})
            assert err.value.code == "payload_too_large"
            assert err.value.details["limit"] < 70_000
            assert (await c.info()).host == lpd.host
    run(main())


def test_unreachable_broker() -> None:
    async def main() -> None:
        with pytest.raises(BrokerUnreachable, match="cannot reach"):
            async with LivepatchClient(f"mqtt://127.0.0.1:{free_port()}", "h", timeout=2):
                pass
    run(main())


def test_misuse_is_reported(lpd: DaemonThread) -> None:
    async def main() -> None:
        c = LivepatchClient(lpd.url, lpd.host)
        with pytest.raises(SdkError, match="async with"):
            await c.info()
        async with LivepatchClient(lpd.url) as fleet:  # no host: fleet-wide reads only
            assert lpd.host in await fleet.hosts()
            with pytest.raises(SdkError, match="no host"):
                await fleet.info()
    run(main())


def test_generic_request_and_concurrency(lpd: DaemonThread) -> None:
    async def main() -> None:
        async with LivepatchClient(lpd.url, lpd.host) as c:
            data = await c.request("symbol.lookup", {"name": "work_chain"})
            assert data["name"] == "work_chain"
            with pytest.raises(ReplyError) as exc:
                await c.request("info", {"unexpected": 1})
            assert exc.value.code == "bad_request"
            results = await asyncio.gather(*(c.call("getpid_loop", n, cpu=n % 2) for n in range(20)))
            assert [r.value for r in results] == list(range(20))
    run(main())


def test_metrics_count_requests_by_verb_and_result(lpd: DaemonThread) -> None:
    port = lpd.daemon.metrics_port
    assert port is not None

    def scrape() -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line and not line.startswith("#")}

    before = scrape()
    ok_key = 'lpd_requests_total{result="ok",verb="info"}'
    bad_key = 'lpd_requests_total{result="unknown_symbol",verb="symbol.lookup"}'

    async def main() -> None:
        async with LivepatchClient(lpd.url, lpd.host) as c:
            await c.info()
            await c.info()
            with pytest.raises(ReplyError):
                await c.symbol("no_such_symbol_for_metrics")
    run(main())
    after = scrape()
    assert after[ok_key] - before.get(ok_key, 0) == 2
    assert after[bad_key] - before.get(bad_key, 0) == 1
    assert after['lpd_request_duration_seconds_count{verb="info"}'] >= 2
    assert after["lpd_mqtt_connected"] == 1
    assert after["lpd_boot_seq"] == 1


def test_the_client_rides_out_a_broker_restart(tmp_path: Path) -> None:
    """Streams keep flowing and requests made while the broker is away are sent once it is back; a request
    whose timeout runs out meanwhile says why. The daemon reconnects seconds after the client: the request the
    client publishes at once finds no subscriber on the fresh broker, and goes again on the daemon's birth."""
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    lpd = DaemonThread(daemon_settings(tmp_path / "state", broker.url, reconnect_min_s=3.0,
                                       reconnect_max_s=3.0)).start()
    try:
        async def main() -> None:
            async with LivepatchClient(broker.url, lpd.host, timeout=30) as c:
                statuses = c.statuses()
                first = await anext(statuses)
                assert (first.state, first.reason) == ("online", "started")
                broker.stop()
                with pytest.raises(RequestTimeout, match="unreachable"):
                    await c.request("info", {}, timeout=0.5)
                asked = asyncio.ensure_future(c.info())  # made while the broker is down
                await asyncio.sleep(0.3)
                assert not asked.done()
                broker.start()  # same port, nothing retained
                assert (await asked).host == lpd.host
                assert c.reconnects == 1
                async with asyncio.timeout(30):  # the same stream: the daemon's new birth message
                    status = await anext(statuses)
                    while status.reason != "reconnected":
                        status = await anext(statuses)
                assert status.state == "online"
                await statuses.aclose()
        run(main())
    finally:
        lpd.stop()
        broker.stop()
