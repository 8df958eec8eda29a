"""End to end through a real mosquitto and the real kernel: every verb, bad input, duplicates, documents."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid

import aiomqtt
import pytest
from mqtt_fixtures import DaemonThread, run

from clients.sdk import LivepatchClient, ReplyError
from schemas import CallData, InfoData, StateDoc, StatusDoc, SymbolData, Topics

NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


async def raw_request(lpd: DaemonThread, verb: str, payload: bytes, *, version: str = "3.1.1") -> dict[str, object]:
    """Publish a raw payload (as a 3.1.1 client without reply_to) and return the reply from ``reply``."""
    topics = Topics(lpd.host)
    proto = aiomqtt.ProtocolVersion.V311 if version == "3.1.1" else aiomqtt.ProtocolVersion.V5
    async with aiomqtt.Client("127.0.0.1", int(lpd.url.rsplit(":", 1)[1]), protocol=proto,
                              socket_options=NODELAY) as c:
        await c.subscribe(topics.reply(), qos=1)
        await c.publish(topics.request(verb), payload, qos=1)
        async with asyncio.timeout(10):
            async for msg in c.messages:
                assert isinstance(msg.payload, bytes)
                doc: dict[str, object] = json.loads(msg.payload)
                return doc
    raise AssertionError("no reply")


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_every_verb_through_the_sdk(lpd: DaemonThread, protocol: str) -> None:
    async def main() -> None:
        async with LivepatchClient(lpd.url, lpd.host, protocol=protocol) as c:  # type: ignore[arg-type]
            assert c.mqtt_version == protocol
            info = await c.info()
            assert isinstance(info, InfoData)
            assert info.host == lpd.host
            assert info.nr_cpus == 2
            assert info.arch == "arm64"
            assert info.boot_seq == 1
            assert info.kernel_build_id == lpd.daemon.kernel.image.build_id  # type: ignore[union-attr]
            assert info.tasks == 12
            assert info.symbols > 1000

            sym = await c.symbol("work_chain")
            assert isinstance(sym, SymbolData)
            assert sym.is_func
            assert sym.offset == 0
            assert sym.description == f"work_chain+0x0/{sym.size:#x}"
            back = await c.symbol(address=sym.address + 8)
            assert (back.name, back.offset) == ("work_chain", 8)

            call = await c.call("getpid_loop", 1000, cpu=1)
            assert isinstance(call, CallData)
            assert (call.value, call.signed, call.cpu, call.function) == (1000, 1000, 1, "getpid_loop")
            assert call.address == (await c.symbol("getpid_loop")).address

            tasks = await c.tasks()
            assert {t.kind for t in tasks.tasks} >= {"idle", "worker", "loadgen"}
            assert {t.cpu for t in (await c.tasks(cpu=1)).tasks} == {1}
    run(main())


def test_call_returns_the_guest_result(lpd: DaemonThread) -> None:
    kernel = lpd.daemon.kernel
    assert kernel is not None
    expected = kernel.call("work_chain", 7)

    async def main() -> None:
        async with LivepatchClient(lpd.url, lpd.host) as c:
            result = await c.call("work_chain", 7)
            assert result.value == expected
            negative = await c.call("getpid_loop", 0, cpu=0)
            assert negative.value == 0
    run(main())


@pytest.mark.parametrize(("verb", "payload", "code"), [
    ("info", b"{not json", "bad_request"),
    ("info", b"[1, 2]", "bad_request"),
    ("info", b'{"request_id": "x1", "extra": 1}', "bad_request"),
    ("info", b'{"request_id": 5}', "bad_request"),
    ("call", b'{"request_id": "x2", "function": "work_chain", "args": [1,2,3,4,5,6,7,8,9]}', "bad_request"),
    ("call", b'{"request_id": "x3", "function": "work_chain", "args": ["1"]}', "bad_request"),
    ("call", b'{"request_id": "x4", "function": "work_chain", "args": [18446744073709551616]}', "bad_request"),
    ("symbol.lookup", b'{"request_id": "x5", "name": "a", "address": 4096}', "bad_request"),
    ("symbol.lookup", b'{"request_id": "x6", "address": "0xzz"}', "bad_request"),
    ("nosuch.verb", b'{"request_id": "x7"}', "unknown_verb"),
    ("info", b'{"request_id": "x8", "pad": "' + b"a" * 70000 + b'"}', "payload_too_large"),
    ("symbol.lookup", b'{"request_id": "x9", "name": "no_such_symbol"}', "unknown_symbol"),
    ("call", b'{"request_id": "x10", "function": "cpu_data"}', "invalid_argument"),
    ("call", b'{"request_id": "x11", "function": "work_chain", "cpu": 5}', "invalid_argument"),
])
def test_bad_requests_get_stable_error_codes(lpd: DaemonThread, verb: str, payload: bytes, code: str) -> None:
    suffix = uuid.uuid4().hex[:6]
    payload = payload.replace(b'"x', f'"{suffix}-x'.encode())

    async def main() -> None:
        reply = await raw_request(lpd, verb, payload)
        assert reply["ok"] is False
        error = reply["error"]
        assert isinstance(error, dict)
        assert error["code"] == code, error
        assert error["message"]
        assert "data" not in reply
        if code == "payload_too_large":  # not parsed, but its id was found in its first bytes
            assert reply["request_id"] == f"{suffix}-x8"
        # still serving, and nothing was journaled for a refused request
        async with LivepatchClient(lpd.url, lpd.host) as c:
            assert (await c.info()).host == lpd.host
    run(main())


def test_error_reply_raises_typed_exception(lpd: DaemonThread) -> None:
    async def main() -> None:
        async with LivepatchClient(lpd.url, lpd.host) as c:
            with pytest.raises(ReplyError) as err:
                await c.symbol("definitely_not_a_symbol")
            assert err.value.code == "unknown_symbol"
            assert err.value.details == {"symbol": "definitely_not_a_symbol"}
            assert err.value.verb == "symbol.lookup"
            raw = await c.request_raw("call", {"function": "work_chain", "bogus": True})
            assert not raw.reply.ok
            assert raw.reply.error is not None
            assert raw.reply.error.code == "bad_request"
            assert raw.reply.error.details["errors"][0]["loc"] == ["bogus"]
            assert json.loads(raw.payload)["error"]["code"] == "bad_request"
    run(main())


def test_duplicate_request_id_gets_the_journaled_reply(lpd: DaemonThread) -> None:
    service = lpd.daemon.service
    assert service is not None
    rid = f"dup-{uuid.uuid4().hex}"

    async def main() -> None:
        async with LivepatchClient(lpd.url, lpd.host) as c:
            first = await c.request_raw("info", request_id=rid)
            accepted = service.journal.counts()["accepted"]
            await asyncio.sleep(0.01)  # uptime_s would differ if info ran again
            again = await c.request_raw("info", request_id=rid)
            assert again.payload == first.payload
            assert service.journal.counts()["accepted"] == accepted
            entry = service.journal.get(rid)
            assert entry is not None
            assert entry.attempts == 1
            # same id, other parameters: refused, the journaled request untouched
            conflict = await c.request_raw("tasks", request_id=rid)
            assert conflict.reply.error is not None
            assert conflict.reply.error.code == "request_id_conflict"
            assert service.journal.get(rid) == entry
        # a v5 client and a 3.1.1 client retrying the same id both get it, each on its own reply topic
        async with LivepatchClient(lpd.url, lpd.host, protocol="3.1.1") as c:
            assert (await c.request_raw("info", request_id=rid)).payload == first.payload
    run(main())


def test_concurrent_duplicates_execute_once(lpd: DaemonThread) -> None:
    service = lpd.daemon.service
    assert service is not None
    rid = f"cdup-{uuid.uuid4().hex}"

    async def main() -> None:
        async with LivepatchClient(lpd.url, lpd.host) as a, LivepatchClient(lpd.url, lpd.host) as b:
            params = {"function": "getpid_loop", "args": [20_000_000]}
            r1, r2 = await asyncio.gather(a.request_raw("call", params, request_id=rid),
                                          b.request_raw("call", params, request_id=rid))
            assert r1.payload == r2.payload
            assert r1.reply.ok
            entry = service.journal.get(rid)
            assert entry is not None
            assert entry.attempts == 1
    run(main())


def test_retained_status_and_state(lpd: DaemonThread) -> None:
    async def main() -> None:
        async with LivepatchClient(lpd.url, lpd.host) as c:
            status = await c.status()
            assert isinstance(status, StatusDoc)
            assert (status.state, status.boot_seq, status.reason, status.host) == ("online", 1, "started", lpd.host)
            state = await c.state()
            assert isinstance(state, StateDoc)
            assert state.kernel.nr_cpus == 2
            assert state.boot_seq == 1
            assert state.version >= 1
            hosts = await c.hosts()
            assert hosts[lpd.host].state == "online"
    run(main())


def test_state_changes_are_versioned_and_streamed(lpd: DaemonThread) -> None:
    service = lpd.daemon.service
    assert service is not None

    async def main() -> None:
        async with LivepatchClient(lpd.url, lpd.host) as c:
            stream = c.states()
            first = await anext(stream)
            service.state.set_component("test", {"marker": first.version})  # from another thread, as handlers do
            second = await anext(stream)
            assert second.version == first.version + 1
            assert second.components["test"] == {"marker": first.version}
            events = c.events()
            waiter = asyncio.ensure_future(anext(events))
            await asyncio.sleep(0.2)  # the subscription is in place
            service.events.emit("test.marker", value=42)
            event = await asyncio.wait_for(waiter, 10)
            assert (event.type, event.data, event.host) == ("test.marker", {"value": 42}, lpd.host)
            await stream.aclose()
            await events.aclose()
    run(main())


def test_v5_reply_goes_to_the_response_topic_with_the_correlation_data(lpd: DaemonThread) -> None:
    from paho.mqtt.packettypes import PacketTypes  # noqa: PLC0415
    from paho.mqtt.properties import Properties  # noqa: PLC0415

    topics = Topics(lpd.host)
    response_topic = f"{topics.reply()}/v5-{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        async with aiomqtt.Client("127.0.0.1", int(lpd.url.rsplit(":", 1)[1]), socket_options=NODELAY,
                                  protocol=aiomqtt.ProtocolVersion.V5) as c:
            await c.subscribe(response_topic, qos=1)
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = response_topic
            props.CorrelationData = b"\x00\xffcorrelation"
            await c.publish(topics.request("symbol.lookup"), b'{"request_id": "v5-corr", "name": "work_chain"}',
                            qos=1, properties=props)
            async with asyncio.timeout(10):
                message = await anext(c.messages)
            assert message.topic.value == response_topic
            assert message.properties is not None
            assert message.properties.CorrelationData == b"\x00\xffcorrelation"
            assert isinstance(message.payload, bytes)
            assert json.loads(message.payload)["data"]["name"] == "work_chain"
    run(main())


def test_reply_to_in_the_payload_and_its_limits(lpd: DaemonThread) -> None:
    topics = Topics(lpd.host)
    mine = f"{topics.reply()}/custom-{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        async with aiomqtt.Client("127.0.0.1", int(lpd.url.rsplit(":", 1)[1]), socket_options=NODELAY,
                                  protocol=aiomqtt.ProtocolVersion.V311) as c:
            await c.subscribe(mine, qos=1)
            await c.subscribe(topics.reply(), qos=1)
            rid = uuid.uuid4().hex
            await c.publish(topics.request("info"), json.dumps({"request_id": rid, "reply_to": mine}), qos=1)
            # a reply_to that names a request topic (of any daemon) is refused on 'reply' instead
            loop_rid = uuid.uuid4().hex
            await c.publish(topics.request("info"),
                            json.dumps({"request_id": loop_rid, "reply_to": Topics("other").request("call")}), qos=1)
            seen: dict[str, str] = {}
            codes: dict[str, str | None] = {}
            async with asyncio.timeout(10):
                async for message in c.messages:
                    assert isinstance(message.payload, bytes)
                    doc = json.loads(message.payload)
                    seen[doc["request_id"]] = message.topic.value
                    codes[doc["request_id"]] = doc["error"]["code"] if not doc["ok"] else None
                    if len(seen) == 2:
                        break
            assert seen == {rid: mine, loop_rid: topics.reply()}
            assert codes == {rid: None, loop_rid: "forbidden_reply_topic"}
    run(main())


def test_the_old_dotted_topic_spelling_names_no_verb(lpd: DaemonThread) -> None:
    """``request/symbol.lookup`` (a ``.`` inside a level, refused or split by NATS and RabbitMQ) runs nothing."""
    async def main() -> None:
        topics = Topics(lpd.host)
        async with aiomqtt.Client("127.0.0.1", int(lpd.url.rsplit(":", 1)[1]),
                                  protocol=aiomqtt.ProtocolVersion.V311, socket_options=NODELAY) as c:
            await c.subscribe(topics.reply(), qos=1)
            await c.publish(f"{topics.base}/request/symbol.lookup", b'{"request_id": "dot-1", "name": "work_chain"}',
                            qos=1)
            async with asyncio.timeout(10):
                async for msg in c.messages:
                    assert isinstance(msg.payload, bytes)
                    doc = json.loads(msg.payload)
                    assert doc["request_id"] == "dot-1"
                    assert not doc["ok"]
                    assert doc["error"]["code"] == "unknown_verb"
                    return
    run(main())
