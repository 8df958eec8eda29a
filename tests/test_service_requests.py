"""The request path without a broker: parser fuzzing (hypothesis), replay after a crash, the journal."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.kernel.kernel import Kernel
from daemon.service import Journal, Service
from daemon.service.kernel import KernelVerbs
from schemas import VERBS, KernelState, Reply
from schemas.topics import reply_destination_problem

REFUSALS = {"bad_request", "unknown_verb", "payload_too_large", "unknown_symbol", "ambiguous_symbol",
            "invalid_argument", "request_id_conflict", "invalid_reply_topic", "forbidden_reply_topic"}
FIELDS = ["request_id", "reply_to", "name", "sympos", "address", "function", "args", "cpu", "extra"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(1 << 70), max_value=1 << 70) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=10) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20)
requests = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6)
verbs = st.sampled_from([*VERBS, "nope", "", "call/x"])


def make_service(tmp: Path, kernel: Kernel, journal: Journal | None = None) -> Service:
    journal = journal or Journal(tmp / "journal.sqlite3")
    service = Service(host="fuzz", boot_seq=journal.next_boot_seq(), journal=journal, max_payload_bytes=4096,
                      kernel=KernelState(build_id=kernel.image.build_id, nr_cpus=2, booted_at=time.time()))
    service.serve(KernelVerbs(service, kernel, version="test").verbs())
    return service


@pytest.fixture
def fuzz_service(tmp_path: Path, kernel: Kernel) -> Iterator[Service]:
    """One service for all of a fuzz test's examples (its journal keeps what valid examples left)."""
    service = make_service(tmp_path, kernel)
    yield service
    service.journal.close()
    kernel.machine.check()  # every vCPU survived the fuzzing


def check(service: Service, verb: str, payload: bytes) -> Reply:
    before = service.journal.counts()["accepted"]
    outcome = asyncio.run(service.handle(verb, payload))
    reply = Reply.model_validate_json(outcome.payload)  # always a well-formed reply
    assert reply_destination_problem(outcome.route.topic) is None  # to a topic it can and may be published to
    assert reply == outcome.reply
    if reply.ok:
        assert reply.data is not None
        assert outcome.journaled
    else:
        assert reply.error is not None
        assert reply.error.code in REFUSALS, reply.error
        assert reply.error.message
    if not outcome.journaled:  # refused before acceptance: the journal did not change
        assert service.journal.counts()["accepted"] == before
    return reply


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(verb=verbs, payload=st.binary(max_size=300))
def test_fuzz_raw_payloads(fuzz_service: Service, verb: str, payload: bytes) -> None:
    check(fuzz_service, verb, payload)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(verb=verbs, doc=requests)
def test_fuzz_structured_requests(fuzz_service: Service, verb: str, doc: dict[str, Any]) -> None:
    reply = check(fuzz_service, verb, json.dumps(doc).encode())
    if reply.ok:
        assert verb in VERBS
        assert "extra" not in doc
        assert reply.request_id == doc["request_id"]


def test_oversized_payload_is_refused_unparsed(tmp_path: Path, kernel: Kernel) -> None:
    service = make_service(tmp_path, kernel)
    pad = "a" * 5000
    # the id is looked for in the first and last 4 KiB only, as a plain string
    for doc, rid in [({"request_id": "big", "x": pad}, "big"), ({"x": pad, "request_id": "end"}, "end"),
                     ({"x": pad, "request_id": "mid", "y": pad}, None), ({"request_id": 'q\\"x', "x": pad}, None),
                     ({"request_id": "bad id", "x": pad}, "bad id")]:
        reply = check(service, "info", json.dumps(doc).encode())
        assert reply.error is not None
        assert (reply.error.code, reply.request_id) == ("payload_too_large", rid)
    def routed(reply_to: str) -> str:
        payload = json.dumps({"request_id": "r", "reply_to": reply_to, "x": pad}).encode()
        return asyncio.run(service.handle("info", payload)).route.topic
    assert routed("my/replies") == "my/replies"
    assert routed("a/+/b") == service.topics.reply()  # not a topic name: the default reply topic


def test_unanswered_request_is_replayed_by_the_next_run(tmp_path: Path, kernel: Kernel) -> None:
    path = tmp_path / "journal.sqlite3"
    journal = Journal(path)
    assert journal.next_boot_seq() == 1
    params = {"request_id": "crash-1", "function": "getpid_loop", "args": [123], "cpu": 1, "sympos": 0}
    journal.accept("crash-1", "call", json.dumps(params), fp="x", reply_topic="somewhere/reply", correlation=b"c1",
                   boot_seq=1)  # accepted, then the daemon "died"
    journal.close()

    service = make_service(tmp_path, kernel, Journal(path))
    assert service.boot_seq == 2
    assert asyncio.run(service.replay()) == 1
    entry = service.journal.get("crash-1")
    assert entry is not None
    assert entry.attempts == 2
    assert entry.reply is not None
    assert json.loads(entry.reply)["data"]["value"] == 123
    pending = service.undelivered()  # published after the connection comes up
    assert [(o.request_id, o.route.topic, o.route.correlation) for o in pending] == [
        ("crash-1", "somewhere/reply", b"c1")]
    service.delivered(pending[0])
    assert service.undelivered() == []
    assert asyncio.run(service.replay()) == 0


def test_journal_prunes_only_delivered_requests(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite3")
    for i in range(10):
        rid = f"r{i}"
        journal.accept(rid, "info", "{}", fp="f", reply_topic="t", correlation=None, boot_seq=1)
        journal.answer(rid, "{}")
        if i < 8:
            journal.delivered(rid)
    assert journal.prune(keep=3) == 5
    left = [f"r{i}" for i in range(10) if journal.get(f"r{i}") is not None]
    assert left == ["r5", "r6", "r7", "r8", "r9"]
    assert journal.counts() == {"accepted": 10, "answered": 10}
    assert journal.next_state_version() == 1
    assert journal.next_state_version() == 2
