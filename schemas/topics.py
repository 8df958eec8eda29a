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


def host_of(topic: str) -> str | None:
    """The host level of any ``livepatch/v1/<host>/…`` topic."""
    parts = topic.split("/")
    if len(parts) >= 4 and f"{parts[0]}/{parts[1]}" == ROOT:
        return parts[2]
    return None
