"""Issue 10 §1: arbitrary topics, payloads and MQTT 5 properties through a real mosquitto to a real daemon, with
restarts on the same state directory in between; after every round the daemon is up and answers ``info``."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import aiomqtt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mqtt_fixtures import DaemonThread, Mosquitto, daemon_settings, run
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from test_hostile_requests import NODELAY, port_of, serves

from schemas import VERBS, Topics
from schemas.topics import verb_path

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(1 << 70), max_value=1 << 70) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)
texts = st.text(max_size=40) | st.sampled_from(["replies/+/x", "replies/#", "$SYS/x", "livepatch/v1/h/status", ""])
documents = st.fixed_dictionaries(
    {"request_id": st.text(max_size=10) | st.integers()},
    optional={"reply_to": texts, "name": st.text(max_size=10), "function": st.just("getpid_loop"),
              "args": st.lists(st.integers(min_value=0, max_value=100), max_size=2), "x": json_values})
payloads = (st.binary(max_size=200) | documents.map(lambda d: json.dumps(d).encode())
            | st.integers(min_value=30, max_value=3000).map(lambda n: b'{"request_id": "d", "x": ' + b"[" * n
                                                            + b"]" * n + b"}"))
messages = st.tuples(
    st.sampled_from(sorted(VERBS)) | st.text(max_size=12),  # a verb, or any level text
    payloads,
    st.none() | texts,  # the v5 response topic
    st.none() | st.binary(max_size=16),  # correlation data
    st.lists(st.tuples(st.text(max_size=6), st.text(max_size=6)), max_size=2),  # user properties
)


async def send(url: str, host: str, batch: list[tuple[Any, ...]]) -> None:
    topics = Topics(host)
    for verb, payload, response, correlation, user in batch:
        try:
            topic = topics.request(verb) if verb in VERBS else f"{topics.base}/request/{verb_path('x')}/{verb}"
        except ValueError:
            topic = f"{topics.base}/request/x"
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        with contextlib.suppress(Exception):  # paho or the broker may refuse what we send: that is the point
            if response is not None:
                props.ResponseTopic = response
            if correlation is not None:
                props.CorrelationData = correlation
            if user:
                props.UserProperty = user
        # a new connection per message: mosquitto drops a client that sends what it refuses
        with contextlib.suppress(Exception):
            async with aiomqtt.Client("127.0.0.1", port_of(url), protocol=aiomqtt.ProtocolVersion.V5,
                                      socket_options=NODELAY, timeout=2) as c:
                await c.publish(topic, payload, qos=1, properties=props)


def test_fuzz_bridge_and_service_with_restarts(mosquitto: Mosquitto, tmp_path: Path) -> None:
    cfg = daemon_settings(tmp_path, mosquitto.url)
    state = {"daemon": DaemonThread(cfg).start(), "rounds": 0}
    budget = time.monotonic() + 45  # bounded in time: the rounds that do not fit are skipped (the machine is shared)

    @settings(max_examples=18, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(batch=st.lists(messages, min_size=1, max_size=5))
    def one_round(batch: list[tuple[Any, ...]]) -> None:
        d: DaemonThread = state["daemon"]  # type: ignore[assignment]
        if time.monotonic() > budget:
            return
        run(send(d.url, d.host, batch))
        state["rounds"] = rounds = int(state["rounds"]) + 1  # type: ignore[call-overload]
        if rounds % 6 == 0:  # a restart on the same state directory: the journal must hold nothing poisonous
            d.stop()
            state["daemon"] = d = DaemonThread(cfg).start()
        assert d.error is None
        run(serves(d.url, d.host))

    try:
        one_round()
    finally:
        d = state["daemon"]
        assert isinstance(d, DaemonThread)
        d.stop()
    assert int(state["rounds"]) >= 6  # type: ignore[call-overload]  (at least one restart happened)
