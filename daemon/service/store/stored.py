"""Replies ready to publish, and what the journal holds read back as them.

A journal row is data from disk, not a promise: it may have been written by an older version (before reply
destinations were checked), damaged, or edited by hand. Reading one back never raises anything but
``Unreadable`` (with why), so that the daemon answers or drops such a row instead of crashing on it at every
start or reconnect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from pydantic import ValidationError

from daemon.service.store.journal import Entry
from schemas import Reply, Request
from schemas.topics import reply_destination_problem


class ReplyRoute(NamedTuple):
    """Where a reply goes: a topic, and the MQTT v5 correlation data to copy (None for 3.1.1)."""

    topic: str
    correlation: bytes | None


@dataclass(frozen=True)
class Outcome:
    """A reply ready to publish. ``journaled``: mark its delivery in the journal once published."""

    request_id: str | None
    verb: str
    reply: Reply
    payload: str
    route: ReplyRoute
    journaled: bool


class Unreadable(Exception):
    """A journal row the daemon cannot act on; the message says why."""


def stored_route(entry: Entry) -> ReplyRoute:
    topic, correlation = entry.reply_topic, entry.correlation
    if not isinstance(topic, str):
        raise Unreadable(f"its reply topic is a {type(topic).__name__}, not text")
    problem = reply_destination_problem(topic)
    if problem is not None:
        raise Unreadable(f"its reply topic {problem[1]}")
    if correlation is not None and not isinstance(correlation, bytes):
        raise Unreadable(f"its correlation data is a {type(correlation).__name__}, not bytes")
    return ReplyRoute(topic, correlation)


def stored_reply(entry: Entry) -> Reply:
    text = entry.reply
    if not isinstance(text, str):
        raise Unreadable(f"its reply is a {type(text).__name__}, not text")
    try:
        reply = Reply.model_validate_json(text)
    except ValidationError as exc:
        raise Unreadable(f"its reply is not a reply document ({exc.error_count()} errors)") from None
    if reply.request_id != entry.request_id:
        raise Unreadable("its reply answers another request id")
    return reply


def stored_outcome(entry: Entry) -> Outcome:
    """The journaled reply of ``entry``, ready to publish again."""
    reply = stored_reply(entry)
    assert isinstance(entry.reply, str)  # checked by stored_reply
    return Outcome(entry.request_id, str(entry.verb), reply, entry.reply, stored_route(entry), True)


def stored_request(entry: Entry, model: type[Request]) -> Request:
    """The journaled request of ``entry``, validated again by its verb's model."""
    payload = entry.payload
    if not isinstance(payload, str):
        raise Unreadable(f"its request is a {type(payload).__name__}, not text")
    try:
        request = model.model_validate_json(payload)
    except ValidationError as exc:
        raise Unreadable(f"its request is not a valid {model.__name__} ({exc.error_count()} errors)") from None
    if request.request_id != entry.request_id:
        raise Unreadable("its request carries another request id")
    return request


def shown(value: object, limit: int = 128) -> str:
    """A row's value for a log line or an event: a string as it is, anything else as its repr; cut short."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "…"
