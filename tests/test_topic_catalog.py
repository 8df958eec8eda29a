"""Every topic the daemon, the SDK and lpctl use, checked against the strictest broker rules we know of.

* NATS (MQTT gateway): no ``.`` or space in a topic (NATS < 2.10 closes the connection; ``/`` becomes ``.``),
  and no ``*`` or ``>`` (NATS subject wildcards).
* RabbitMQ (rabbitmq_mqtt): ``.`` becomes a routing-key separator, so ``request/+`` would miss ``patch.load``.
* AWS IoT Core: at most 7 ``/`` (8 levels), at most 256 bytes, no leading ``$`` (reserved topics).
"""

from __future__ import annotations

import re

import pytest

from clients.sdk import LivepatchClient
from schemas import ALL_EVENTS, ALL_STATE, ALL_STATUS, VERBS, Topics
from schemas.discovery import DISCOVER, discover_reply, valid_reply_to

LEVEL = re.compile(r"^[A-Za-z0-9_-]+$")
LONGEST_HOST = "h" * 64  # the longest host id the daemon's settings accept
LONGEST_CLIENT = "c" * 64


def catalog() -> list[str]:
    t = Topics(LONGEST_HOST)
    names = [t.request(verb) for verb in VERBS]
    names += [t.reply(), t.reply(LONGEST_CLIENT), t.status, t.state, t.events, t.trace]
    names += [t.request_filter, ALL_STATUS, ALL_STATE, ALL_EVENTS]
    names += [DISCOVER, discover_reply(LONGEST_CLIENT)]
    return names


def strict_violations(topic: str) -> list[str]:
    problems = []
    if len(topic.encode()) > 256:
        problems.append("longer than 256 bytes (AWS IoT)")
    if topic.count("/") > 7:
        problems.append("more than 7 slashes (AWS IoT)")
    if topic.startswith("$"):
        problems.append("starts with $ (reserved)")
    for i, level in enumerate(topic.split("/")):
        last = i == topic.count("/")
        if level == "+" or (level == "#" and last):
            continue  # a filter's wildcard level
        if not LEVEL.match(level):
            problems.append(f"level {level!r} is not [A-Za-z0-9_-]+ (NATS, RabbitMQ)")
    return problems


def test_every_topic_passes_the_strictest_rules() -> None:
    names = catalog()
    assert len(names) > len(VERBS) > 20
    bad = {topic: strict_violations(topic) for topic in names if strict_violations(topic)}
    assert bad == {}


def test_the_rules_catch_what_brokers_refuse() -> None:
    assert strict_violations("livepatch/v1/h/request/patch.load")  # the old spelling
    assert strict_violations("livepatch/v1/h/request/a b")
    assert strict_violations("livepatch/v1/h/request/a*")
    assert strict_violations("a/b/c/d/e/f/g/h/i")
    assert strict_violations("$SYS/x")


def test_dotted_verbs_become_levels_and_back() -> None:
    t = Topics("web-01")
    for verb in VERBS:
        topic = t.request(verb)
        assert "." not in topic
        assert t.verb_of(topic) == verb


@pytest.mark.parametrize("verb", ["patch..load", "patch.", ".x", "a/b", "a b", "a+", "#"])
def test_a_verb_that_cannot_be_spelled_is_refused(verb: str) -> None:
    with pytest.raises(ValueError, match="verb"):
        Topics("web-01").request(verb)


def test_the_sdk_reply_topic_passes() -> None:
    client = LivepatchClient("mqtt://127.0.0.1:1", "web-01")
    assert client.topics is not None
    assert strict_violations(client.topics.reply(client.client_id)) == []


def test_discovery_stays_clear_of_every_host_and_answers_only_its_own_replies() -> None:
    assert not DISCOVER.startswith("livepatch/v1/")  # no host id can collide with it
    assert valid_reply_to(discover_reply("lpsdk-1"))
    for bad in ("livepatch/v1/h/request/call", f"{DISCOVER}/reply/a/b", f"{DISCOVER}/reply/+", f"{DISCOVER}/reply/",
                f"{DISCOVER}/replyx", "livepatch/discover/v1/reply/#"):
        assert not valid_reply_to(bad), bad
