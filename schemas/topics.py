"""Topic names: the only place that spells them. ``livepatch/v1/<host>/{request/<verb path>,reply,status,…}``.

Every topic level is ``[A-Za-z0-9_-]+``: the strictest brokers reserve more than MQTT does (NATS refuses ``.`` and
`` `` in MQTT topics before 2.10 and maps ``/`` to ``.``; RabbitMQ turns ``.`` into a routing-key separator; AWS IoT
allows at most 8 levels and 256 bytes). A dotted verb (``patch.load``) keeps its name in payloads and schemas; its
topic spells each part as its own level (``request/patch/load``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ROOT = "livepatch/v1"
ALL_STATUS = f"{ROOT}/+/status"
"""Subscribe here to discover hosts (retained births and deaths)."""
ALL_STATE = f"{ROOT}/+/state"
ALL_EVENTS = f"{ROOT}/+/events"


ORCHESTRATOR = "_orchestrator"
"""The rollout orchestrator's place in the topic tree: its API follows a host's layout (``request/<verb>``,
``reply/<client id>``) under this id, which is no host's (fleet and discovery readers skip ids starting with
``_``). Its own documents: ``rollout/<name>`` (retained), ``events``, ``service`` (retained)."""
ORCHESTRATOR_BASE = f"{ROOT}/{ORCHESTRATOR}"
ORCHESTRATOR_EVENTS = f"{ORCHESTRATOR_BASE}/events"
ORCHESTRATOR_SERVICE = f"{ORCHESTRATOR_BASE}/service"


def rollout_topic(name: str) -> str:
    """The retained RolloutDoc of one rollout."""
    return f"{ORCHESTRATOR_BASE}/rollout/{name}"


LEVEL = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""One topic level that every broker we support accepts as it is."""


def verb_path(verb: str) -> str:
    """The topic levels of a verb: ``patch.load`` -> ``patch/load``."""
    parts = verb.split(".")
    if not all(LEVEL.match(p) for p in parts):
        raise ValueError(f"verb {verb!r} must be dot-separated names of A-Z a-z 0-9 _ -")
    return "/".join(parts)


def _check_level(value: str, what: str) -> str:
    if not value or any(c in value for c in "/+#\0") or value.startswith("$"):
        raise ValueError(f"{what} {value!r} must be one topic level without wildcards")
    return value


@dataclass(frozen=True)
class Topics:
    """The topics of one host."""

    host: str

    def __post_init__(self) -> None:
        _check_level(self.host, "host id")

    @property
    def base(self) -> str:
        return f"{ROOT}/{self.host}"

    def request(self, verb: str) -> str:
        return f"{self.base}/request/{verb_path(verb)}"

    @property
    def request_filter(self) -> str:
        """What the daemon subscribes to: every verb, known or not (unknown ones get ``unknown_verb``)."""
        return f"{self.base}/request/#"

    def reply(self, client_id: str | None = None) -> str:
        """The default reply topic, or a client's own (``reply/<client id>``: an ACL can match it with ``%c``)."""
        if client_id is None:
            return f"{self.base}/reply"
        return f"{self.base}/reply/{_check_level(client_id, 'client id')}"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def state(self) -> str:
        return f"{self.base}/state"

    @property
    def events(self) -> str:
        return f"{self.base}/events"

    @property
    def trace(self) -> str:
        return f"{self.base}/trace"

    def verb_of(self, topic: str) -> str | None:
        """The verb of a request topic of this host (``request/patch/load`` -> ``patch.load``), or None for any
        other topic. A request topic whose levels are not plain names (``request/patch.load``, the old spelling)
        gives its raw path, which names no verb: the daemon answers ``unknown_verb`` instead of running it."""
        prefix = f"{self.base}/request/"
        if topic.startswith(prefix):
            levels = topic[len(prefix):].split("/")
            if all(LEVEL.match(level) for level in levels):
                return ".".join(levels)
            return "request/" + "/".join(levels)
        return None

    def is_request_topic(self, topic: str) -> bool:
        return topic.startswith(f"{self.base}/request/")


def is_request_topic(topic: str) -> bool:
    """Whether ``topic`` is any host's request topic (``livepatch/v1/<host>/request/…``)."""
    parts = topic.split("/")
    return len(parts) >= 5 and f"{parts[0]}/{parts[1]}" == ROOT and parts[3] == "request"


TOPIC_MAX_BYTES = 65535
"""MQTT's limit on a topic name (a two-byte length prefix), in UTF-8 bytes."""
TOPIC_MAX_SEPARATORS = 200
"""Mosquitto drops the connection of a client that publishes to a topic with more ``/`` than this
(``TOPIC_HIERARCHY_LIMIT``): a reply there would cost the daemon its connection."""


def _forbidden_characters() -> re.Pattern[str]:
    # What Mosquitto refuses in any UTF-8 string (mosquitto_validate_utf8: it drops the connection), and
    # what no topic name may hold: U+0000, the C0 and C1 controls and DEL, the non-characters (U+FDD0-U+FDEF
    # and the last two code points of every plane), lone surrogates (not encodable as UTF-8), and the wildcards.
    spans = [(0x00, 0x1F), (0x7F, 0x9F), (0xFDD0, 0xFDEF), (0xD800, 0xDFFF)]
    spans += [((plane << 16) | 0xFFFE, (plane << 16) | 0xFFFF) for plane in range(17)]
    return re.compile("[" + "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in spans) + r"+#]")


_FORBIDDEN = _forbidden_characters()


def publish_topic_problem(topic: str) -> str | None:
    """Why a client cannot publish to ``topic`` (a broker would refuse it or drop the connection), or None.

    A topic name is non-empty, does not start with ``$`` (the broker's own topics), holds no wildcard
    (``+``, ``#``), no control character (U+0000-U+001F, U+007F-U+009F), no non-character (U+FDD0-U+FDEF,
    U+FFFE, U+FFFF and their equivalents in every plane) and no lone surrogate, is at most 65,535 bytes in
    UTF-8 and has at most 200 ``/``.
    """
    if not topic:
        return "a topic name cannot be empty"
    if topic.startswith("$"):
        return "a topic name cannot start with '$' (reserved for the broker)"
    bad = _FORBIDDEN.search(topic)
    if bad is not None:
        char = bad.group()
        what = "a wildcard" if char in "+#" else "a character no topic name may hold"
        return f"it holds {what}: U+{ord(char):04X} at index {bad.start()}"
    size = len(topic.encode())
    if size > TOPIC_MAX_BYTES:
        return f"it is {size} bytes in UTF-8 (at most {TOPIC_MAX_BYTES})"
    if topic.count("/") > TOPIC_MAX_SEPARATORS:
        return f"it has {topic.count('/') + 1} levels (at most {TOPIC_MAX_SEPARATORS + 1})"
    return None


def is_reply_topic(topic: str) -> bool:
    """Whether ``topic`` is a host's reply topic: ``livepatch/v1/<host>/reply`` or ``…/reply/<anything>``."""
    parts = topic.split("/", 4)
    return len(parts) >= 4 and f"{parts[0]}/{parts[1]}" == ROOT and parts[3] == "reply"


def in_namespace(topic: str) -> bool:
    """Whether ``topic`` is under ``livepatch/v1`` (the daemons' requests, documents, replies and streams)."""
    return topic == ROOT or topic.startswith(f"{ROOT}/")


def reply_destination_problem(topic: str) -> tuple[str, str] | None:
    """Why the daemon will not publish a reply to ``topic``: ``("invalid", why)`` for a topic no client can
    publish to, ``("forbidden", why)`` for a topic of the daemons' namespace that is not a reply topic (a reply
    there would pose as a request, a status, a state or an event); None when it may."""
    problem = publish_topic_problem(topic)
    if problem is not None:
        return "invalid", f"is not a topic name a reply can be published to: {problem}"
    if in_namespace(topic) and not is_reply_topic(topic):
        return "forbidden", (f"names a topic of the daemons' namespace ({ROOT}/...) that is not a reply topic: "
                             f"use {ROOT}/<host>/reply or a topic below it")
    return None


def host_of(topic: str) -> str | None:
    """The host level of any ``livepatch/v1/<host>/…`` topic."""
    parts = topic.split("/")
    if len(parts) >= 4 and f"{parts[0]}/{parts[1]}" == ROOT:
        return parts[2]
    return None
