"""The verbs through the brokers users run: NATS 2.15 (single node, and a 3-node cluster with the daemon and the
client on different nodes) and RabbitMQ 3.x with rabbitmq_mqtt — each private, started once for this module.
(Mosquitto runs every other MQTT test.)

Walks lpctl and the SDK through info, call, call.read, a signed patch's load / enable / read / disable / unload,
the function tracer, ftrace ops, hijacks, the retained state, events and host discovery (which on RabbitMQ comes
from the broadcast discovery request: retained statuses never reach its wildcard subscriptions).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from broker_fixtures import Nats, NatsCluster, RabbitMQ
from mqtt_fixtures import DaemonThread, run
from test_lpctl_ftrace import ONE_CALL, TRACE_LINE
from test_service_patch import ORIGINAL_CMDLINE, PATCHED_CMDLINE, signed, trusting_settings
from typer.testing import CliRunner

from clients.cli.main import app
from clients.sdk import LivepatchClient, ReplyError

runner = CliRunner()


@dataclass
class Setup:
    kind: str
    daemon: DaemonThread
    client_broker: str
    """What the clients are given: on the cluster, the nodes in another order (another node first)."""
    daemon_node: str


@pytest.fixture(scope="module", params=["nats", "nats-cluster", "rabbitmq"])
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    kind: str = request.param
    work = tmp_path_factory.mktemp(kind)
    broker: Nats | NatsCluster | RabbitMQ
    if kind == "nats":
        broker = Nats(work)
    elif kind == "nats-cluster":
        broker = NatsCluster(work)
    else:
        broker = RabbitMQ(work)
    try:
        broker.start()
        if isinstance(broker, NatsCluster):
            urls = [n.url for n in broker.nodes]
            daemon_url, client_url = ",".join(urls), ",".join(urls[1:] + urls[:1])
        else:
            daemon_url = client_url = broker.url
        d = DaemonThread(trusting_settings(work / "state", daemon_url, heartbeat_s=1.0)).start(timeout=90)
        try:
            yield Setup(kind, d, client_url, daemon_url.split(",")[0].removeprefix("mqtt://"))
        finally:
            d.stop()
    finally:
        broker.stop()


def lpctl(s: Setup, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["--broker", s.client_broker, "--host", s.daemon.host, "--timeout", "20", *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def ok(s: Setup, *args: str) -> str:
    code, out, err = lpctl(s, *args)
    assert code == 0, f"{args}: {err}"
    return out


def test_info_and_calls(setup: Setup) -> None:
    reply = json.loads(ok(setup, "--json", "info"))
    assert reply["data"]["host"] == setup.daemon.host
    assert reply["data"]["broker"] == {"node": setup.daemon_node, "protocol": "3.1.1"}  # neither speaks 5 here
    assert "(MQTT 3.1.1)" in ok(setup, "info")
    assert re.search(r"work_chain\(16\) on cpu 1 = \d+", ok(setup, "call", "work_chain", "16", "--cpu", "1"))
    code, _, err = lpctl(setup, "call", "no_such_function")
    assert code == 1
    assert "unknown_symbol" in err


def test_patch_load_enable_read_disable_unload(setup: Setup, tmp_path: Path) -> None:
    bundle = tmp_path / "cmdline.lpb"
    bundle.write_bytes(signed("livepatch_cmdline").to_bytes())
    assert ok(setup, "patch", "load", str(bundle)).startswith("loaded livepatch_cmdline (signed by")
    assert ok(setup, "read", "proc_cmdline_read") == ORIGINAL_CMDLINE
    assert "enabled (transition complete)" in ok(setup, "patch", "enable", "livepatch_cmdline", "--wait")
    assert ok(setup, "read", "proc_cmdline_read") == PATCHED_CMDLINE
    assert "livepatch_cmdline" in ok(setup, "patch", "list")
    assert "disabled (transition complete)" in ok(setup, "patch", "disable", "livepatch_cmdline", "--wait")
    ok(setup, "patch", "unload", "livepatch_cmdline")
    assert ok(setup, "read", "proc_cmdline_read") == ORIGINAL_CMDLINE


def test_trace_ops_and_hijacks(setup: Setup) -> None:
    assert ok(setup, "trace", "start", "work_step_*", "--entries", "256").startswith("function: tracing 3 functions")
    ok(setup, "call", "work_chain", "7", "--cpu", "1")
    lines = ok(setup, "trace", "read").splitlines()
    assert [(m.group(6), m.group(7)) for m in map(TRACE_LINE.match, lines) if m] == ONE_CALL
    ok(setup, "trace", "stop")
    assert ok(setup, "ftrace", "ops", "register", "steps", "-f", "work_step_*").startswith("registered ops steps")
    assert "steps" in ok(setup, "ftrace", "ops", "list")
    assert ok(setup, "ftrace", "ops", "unregister", "steps").startswith("unregistered ops steps")
    assert ok(setup, "hijack", "create", "work_step_c", "ftrace_stub").startswith("hijack work_step_c:")
    assert "work_step_c" in ok(setup, "hijack", "list")
    assert ok(setup, "hijack", "delete", "work_step_c").startswith("hijack work_step_c removed")
    assert ok(setup, "hijack", "list").strip() == "no hijacks"


def test_state_status_and_hosts(setup: Setup) -> None:
    doc = json.loads(ok(setup, "--json", "state"))
    assert (doc["host"], {"ftrace", "livepatch"} <= set(doc["components"])) == (setup.daemon.host, True)
    assert f"{setup.daemon.host}: online" in ok(setup, "status")
    hosts = json.loads(ok(setup, "--json", "hosts"))
    assert hosts[setup.daemon.host]["liveness"] == "online"
    # its retained state too (on RabbitMQ: read from the host's own state topic after discovery found it)
    assert hosts[setup.daemon.host]["build_id"] == doc["kernel"]["build_id"]
    shown = ok(setup, "hosts", "--state", "online", "--build", doc["kernel"]["build_id"][:12])
    assert setup.daemon.host in shown


def test_sdk_requests_states_and_events(setup: Setup) -> None:
    async def main() -> None:
        async with LivepatchClient(setup.client_broker, setup.daemon.host, timeout=20) as c:
            assert (await c.info()).host == setup.daemon.host
            assert (await c.call("work_chain", 3)).function == "work_chain"
            state = await anext(c.states())
            assert state.host == setup.daemon.host
            events = c.events()
            first = asyncio.ensure_future(anext(events))
            await asyncio.sleep(0.5)  # subscribed (SUBACK read) before the refusal
            with pytest.raises(ReplyError, match="unknown_symbol"):
                await c.call("no_such_function")
            event = await asyncio.wait_for(first, 20)
            assert (event.type, event.data["code"]) == ("request.failed", "unknown_symbol")
            with contextlib.suppress(StopAsyncIteration):
                await events.aclose()
            assert setup.daemon.host in await c.hosts(1.0)
            assert setup.daemon.host in await c.discover(1.0)
    run(main())
