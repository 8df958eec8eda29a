"""Requests that used to crash or poison the daemon (issue 10 §1 and §3), each through a real mosquitto to the real
daemon: nested JSON, reply destinations that cannot (or must not) be published to, and a restart on the same
state directory afterwards."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from mqtt_fixtures import DaemonThread, Mosquitto, daemon_settings, run
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from clients.sdk import LivepatchClient
from daemon.service import Journal, ReplyRoute, Service
from schemas import KernelState, Topics
from schemas.discovery import DISCOVER, DISCOVER_REPLY_PREFIX

NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
DEEP = 5000


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def response_topic(topic: str) -> Any:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = topic
    props.CorrelationData = b"corr"
    return props


async def exchange(url: str, topic: str, payload: bytes, listen: list[str], *, version: str = "3.1.1",
                   properties: Any = None, count: int = 1, timeout: float = 10.0) -> list[tuple[str, dict[str, Any]]]:
    """Publish one request and return the first ``count`` JSON messages (with their topics) on ``listen``."""
    proto = aiomqtt.ProtocolVersion.V311 if version == "3.1.1" else aiomqtt.ProtocolVersion.V5
    got: list[tuple[str, dict[str, Any]]] = []
    async with aiomqtt.Client("127.0.0.1", port_of(url), protocol=proto, socket_options=NODELAY) as c:
        for t in listen:
            await c.subscribe(t, qos=1)
        await c.publish(topic, payload, qos=1, properties=properties)
        async with asyncio.timeout(timeout):
            async for msg in c.messages:
                assert isinstance(msg.payload, bytes)
                got.append((msg.topic.value, json.loads(msg.payload)))
                if len(got) == count:
                    return got
    raise AssertionError("no reply")


async def serves(url: str, host: str) -> None:
    async with LivepatchClient(url, host, timeout=10) as c:
        assert (await c.info()).host == host


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize("payload", [
    nested(DEEP),
    b'{"a":' * DEEP + b"1" + b"}" * DEEP,
    b'{"request_id": "deep-1", "args": ' + nested(DEEP) + b"}",
    b'{"request_id": "deep-2", "reply_to": "x", "extra": {"k": ' + nested(DEEP) + b"}}",
], ids=["array", "object", "in-a-field", "in-a-nested-field"])
def test_deeply_nested_json_is_a_bad_request(lpd: DaemonThread, payload: bytes) -> None:
    assert len(payload) < 65536
    topics = Topics(lpd.host)
    service = lpd.daemon.service
    assert service is not None
    before = service.journal.counts()["accepted"]

    async def main() -> None:
        [(topic, reply)] = await exchange(lpd.url, topics.request("call"), payload, [topics.reply()])
        assert topic == topics.reply()
        assert reply["ok"] is False
        assert reply["error"]["code"] == "bad_request"
        assert "deeper than 32" in reply["error"]["message"]
        assert service.journal.counts()["accepted"] == before
        await serves(lpd.url, lpd.host)
    run(main())


def test_brackets_inside_strings_do_not_count_as_nesting(lpd: DaemonThread) -> None:
    topics = Topics(lpd.host)
    rid = f"brackets-{uuid.uuid4().hex[:8]}"
    name = "[{" * 40 + '\\"' + "]}" * 40  # 80 brackets and an escaped quote, all inside one string

    async def main() -> None:
        payload = json.dumps({"request_id": rid, "name": json.loads(f'"{name}"')}).encode()
        [(_, reply)] = await exchange(lpd.url, topics.request("symbol.lookup"), payload, [topics.reply()])
        assert (reply["request_id"], reply["error"]["code"]) == (rid, "unknown_symbol")  # parsed and looked up
    run(main())


BAD_CHARACTERS = ["\u0001", "\u001f", "\u007f", "\u0085", "\ufffe", "\uffff", "\ufdd0", "\U0001fffe"]


def destination_cases(host: str) -> list[tuple[str, str, str]]:
    """(where the destination is given, the destination, the code it gets)."""
    topics = Topics(host)
    cases = [("v5", "replies/+/x", "invalid_reply_topic"), ("v5", "replies/#", "invalid_reply_topic"),
             ("v5", "a/" * 201 + "b", "invalid_reply_topic"), ("payload", "$SYS/x", "invalid_reply_topic"),
             ("payload", "", "invalid_reply_topic")]
    # (mosquitto itself drops a client whose response topic property holds these: the service test has them)
    cases += [("payload", f"replies/x{c}y", "invalid_reply_topic") for c in BAD_CHARACTERS]
    for topic in (topics.status, topics.state, topics.events, topics.trace, topics.request("info"), topics.base,
                  Topics("other-host").status):
        cases += [("payload", topic, "forbidden_reply_topic"), ("v5", topic, "forbidden_reply_topic")]
    return cases


def test_bad_reply_destinations_are_refused_before_the_journal(lpd: DaemonThread) -> None:
    """Every case is answered with its code on the default reply topic, nothing is journaled, nothing appears on
    the host's own documents, and the daemon keeps serving."""
    topics = Topics(lpd.host)
    service = lpd.daemon.service
    assert service is not None
    before = service.journal.counts()["accepted"]
    documents = [topics.status, topics.state, topics.events, topics.trace]

    async def main() -> None:
        async with aiomqtt.Client("127.0.0.1", port_of(lpd.url), protocol=aiomqtt.ProtocolVersion.V5,
                                  socket_options=NODELAY) as c:
            for t in [topics.reply(), *documents]:
                await c.subscribe(t, qos=1)
            sent: dict[str, tuple[str, str, str]] = {}
            for where, topic, code in destination_cases(lpd.host):
                rid = f"dest-{uuid.uuid4().hex[:10]}"
                sent[rid] = (where, topic, code)
                body: dict[str, Any] = {"request_id": rid}
                if where == "payload":
                    body["reply_to"] = topic
                await c.publish(topics.request("info"), json.dumps(body).encode(), qos=1,
                                properties=response_topic(topic) if where == "v5" else None)
            answered: dict[str, dict[str, Any]] = {}
            async with asyncio.timeout(20):
                async for msg in c.messages:
                    assert isinstance(msg.payload, bytes)
                    doc = json.loads(msg.payload)
                    if msg.topic.value in documents:
                        assert not any(rid in msg.payload.decode() for rid in sent), msg.payload
                        continue
                    assert msg.topic.value == topics.reply()
                    if doc.get("request_id") in sent:
                        answered[doc["request_id"]] = doc
                        if sent[doc["request_id"]][0] == "v5":
                            assert msg.properties is not None
                            assert msg.properties.CorrelationData == b"corr"
                    if len(answered) == len(sent):
                        break
            for rid, (where, topic, code) in sent.items():
                reply = answered[rid]
                assert reply["ok"] is False
                assert reply["error"]["code"] == code, (where, topic, reply)
                assert reply["error"]["details"]["field"] == ("reply_to" if where == "payload"
                                                              else "the MQTT v5 response topic")
        assert service.journal.counts()["accepted"] == before
        await serves(lpd.url, lpd.host)
    run(main())


def test_a_good_response_topic_gets_the_refusal_of_a_bad_reply_to(lpd: DaemonThread) -> None:
    topics = Topics(lpd.host)
    mine = f"{topics.reply()}/v5-{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        payload = json.dumps({"request_id": "r-bad-reply-to", "reply_to": topics.status}).encode()
        [(topic, reply)] = await exchange(lpd.url, topics.request("info"), payload, [mine], version="5",
                                          properties=response_topic(mine))
        assert (topic, reply["error"]["code"]) == (mine, "forbidden_reply_topic")
    run(main())


def test_refusals_for_a_bad_request_id_go_to_reply_to(lpd: DaemonThread) -> None:
    """Issue 11 §5: a 3.1.1 client sees the ``bad_request`` for a missing or invalid id on its ``reply_to``."""
    topics = Topics(lpd.host)
    mine = f"{topics.reply()}/mine-{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        for body, rid in [({"reply_to": mine}, None), ({"request_id": "not valid!", "reply_to": mine}, "not valid!"),
                          ({"request_id": 7, "reply_to": mine}, None), ({"request_id": "", "reply_to": mine}, None),
                          ({"request_id": "x" * 129, "reply_to": mine}, None)]:
            [(topic, reply)] = await exchange(lpd.url, topics.request("info"), json.dumps(body).encode(), [mine])
            assert topic == mine
            assert (reply["request_id"], reply["error"]["code"]) == (rid, "bad_request")
            assert reply["error"]["details"]["errors"][0]["loc"] == ["request_id"]
    run(main())


def test_refused_destinations_leave_nothing_to_replay(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """The issue's repros on a daemon of its own: a v5 response topic with '+' (the daemon exited, and again after
    every restart) and reply_to with control and non-characters (the daemon disconnected in a loop after a restart
    on the same state directory)."""
    settings = daemon_settings(tmp_path, mosquitto.url)
    topics = Topics(settings.host_id)
    d = DaemonThread(settings).start()
    try:
        async def poison() -> None:
            await exchange(d.url, topics.request("info"), b'{"request_id": "plus-1"}', [topics.reply()],
                           version="5", properties=response_topic("replies/+/x"))
            for i, c in enumerate(BAD_CHARACTERS):
                payload = json.dumps({"request_id": f"ctl-{i}", "reply_to": f"replies/x{c}y"}).encode()
                [(_, reply)] = await exchange(d.url, topics.request("info"), payload, [topics.reply()])
                assert reply["error"]["code"] == "invalid_reply_topic"
            await serves(d.url, d.host)
        run(poison())
    finally:
        d.stop()
    again = DaemonThread(settings).start()
    try:
        bridge = again.daemon.bridge
        assert bridge is not None
        time.sleep(1.5)  # a poisoned journal showed here: disconnected and reconnected in a loop
        assert bridge.connections == 1
        run(serves(again.url, again.host))
        service = again.daemon.service
        assert service is not None
        assert service.journal.get("plus-1") is None
        assert all(service.journal.get(f"ctl-{i}") is None for i in range(len(BAD_CHARACTERS)))
    finally:
        again.stop()


def test_v5_response_topics_a_broker_let_through_are_refused_too(tmp_path: Path) -> None:
    """Mosquitto drops a client whose response topic property holds a control or non-character; other brokers may
    pass it on. The service refuses it like a bad ``reply_to`` (its own verb handlers are not needed for that)."""
    journal = Journal(tmp_path / "journal.sqlite3")
    service = Service(host="h", boot_seq=journal.next_boot_seq(), journal=journal,
                      kernel=KernelState(build_id="none", nr_cpus=1, booted_at=0.0))

    async def main() -> None:
        for c in [*BAD_CHARACTERS, "\ud800", "+"]:
            outcome = await service.handle("info", b'{"request_id": "v5-bad"}', response_topic=f"r/x{c}",
                                           correlation=b"k")
            assert outcome.reply.error is not None
            assert outcome.reply.error.code == "invalid_reply_topic"
            assert (outcome.route, outcome.journaled) == (ReplyRoute("livepatch/v1/h/reply", b"k"), False)
        outcome = await service.handle("info", b'{"request_id": "v5-bad"}', response_topic="x" * 65536)
        assert outcome.reply.error is not None
        assert outcome.reply.error.code == "invalid_reply_topic"
        assert "65536 bytes" in outcome.reply.error.message
    run(main())
    assert journal.counts()["accepted"] == 0
    journal.close()


def test_a_discovery_request_with_a_control_character_costs_nothing(lpd: DaemonThread) -> None:
    """Discovery answers QoS 0 on the asker's reply topic: one with a control or non-character there used to be
    answered, and Mosquitto dropped the daemon's connection for it."""
    bridge = lpd.daemon.bridge
    assert bridge is not None
    before = bridge.connections

    async def main() -> None:
        async with aiomqtt.Client("127.0.0.1", port_of(lpd.url), socket_options=NODELAY) as c:
            for bad in ["\u0001", "\u0085", "\uffff"]:
                body = {"request_id": f"disc-{uuid.uuid4().hex[:6]}", "reply_to": f"{DISCOVER_REPLY_PREFIX}me{bad}"}
                await c.publish(DISCOVER, json.dumps(body).encode(), qos=0)
        await asyncio.sleep(0.5)
        assert bridge.connections == before
        await serves(lpd.url, lpd.host)
    run(main())
