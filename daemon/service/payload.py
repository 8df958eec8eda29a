"""What a request payload says before it is validated: its JSON object (parsed with bounded nesting), the id and
the reply destination to answer a refusal with, and whether that destination may be published to."""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any

from daemon.service.errors import BadRequest, ForbiddenReplyTopic, InvalidReplyTopic
from schemas.topics import reply_destination_problem

MAX_DEPTH = 32
"""Deepest nesting of arrays and objects a request may have (the deepest verb needs 3). Python's JSON decoder
recurses per level: a 5,000-deep payload of 10 KB would raise RecursionError, which is no parse error."""

_STRUCTURE = re.compile(rb'[\[\]{}"\\]')
_OPEN, _CLOSE, _QUOTE, _BACKSLASH = b"[{", b"]}", ord('"'), ord("\\")


def too_deep(payload: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether ``payload`` nests arrays and objects deeper than ``limit`` (brackets inside strings excepted).
    Linear in the payload, and free for the usual request (fewer brackets than the limit in all)."""
    if payload.count(b"[") + payload.count(b"{") <= limit:
        return False
    depth, in_string, escaped_at = 0, False, -1
    for m in _STRUCTURE.finditer(payload):
        at = m.start()
        if at == escaped_at:
            continue
        c = payload[at]
        if in_string:
            if c == _BACKSLASH:
                escaped_at = at + 1
            elif c == _QUOTE:
                in_string = False
        elif c == _QUOTE:
            in_string = True
        elif c in _OPEN:
            depth += 1
            if depth > limit:
                return True
        elif c in _CLOSE:
            depth -= 1
    return False


def parse_object(payload: bytes) -> dict[str, Any]:
    """The request's JSON object, or ``BadRequest`` (not JSON, not an object, nested deeper than ``MAX_DEPTH``)."""
    if too_deep(payload):
        raise BadRequest(f"payload nests arrays or objects deeper than {MAX_DEPTH} levels", max_depth=MAX_DEPTH)
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"payload is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest(f"payload must be a JSON object, not {type(doc).__name__}")
    return doc


def peek_envelope(doc: dict[str, Any]) -> tuple[str | None, str | None]:
    """Best effort, before validation: the id to answer with (any short string: a refusal names it even when it
    is not a valid id) and the ``reply_to`` string, each read on its own so that a bad id does not lose the reply
    topic (a 3.1.1 client then still sees its refusal)."""
    rid = doc.get("request_id")
    reply_to = doc.get("reply_to")
    return ((rid if isinstance(rid, str) and 0 < len(rid) <= 128 else None),
            (reply_to if isinstance(reply_to, str) else None))


_ENVELOPE_FIELD = re.compile(rb'"(request_id|reply_to)"\s*:\s*"([^"\\]{1,256})"')
PEEK_BYTES = 4096


def peek_oversized(payload: bytes) -> tuple[str | None, str | None]:
    """Best effort, without parsing a payload too large to parse: the id and reply topic to answer with, if
    they appear as plain strings in its first or last ``PEEK_BYTES`` (the SDK writes them first). A match
    inside some nested object is possible and harmless: the reply then goes where the payload says."""
    found: dict[str, str] = {}
    for part in (payload[:PEEK_BYTES], payload[-PEEK_BYTES:]):
        for m in _ENVELOPE_FIELD.finditer(part):
            with contextlib.suppress(UnicodeDecodeError):
                found.setdefault(m.group(1).decode(), m.group(2).decode())
    return peek_envelope(dict(found))


def check_reply_topic(topic: str, what: str) -> None:
    """Refuse a reply destination the daemon must not publish to (``InvalidReplyTopic``, ``ForbiddenReplyTopic``).
    Checked before anything is journaled: a stored reply that can never be published would be retried after
    every reconnect and restart."""
    problem = reply_destination_problem(topic)
    if problem is None:
        return
    kind, why = problem
    shown = topic if len(topic) <= 200 else topic[:200] + "…"
    if kind == "invalid":
        raise InvalidReplyTopic(f"{what} {why}; the refusal is published on the default reply topic",
                                field=what, topic=shown)
    raise ForbiddenReplyTopic(f"{what} {why}", field=what, topic=shown)


def reply_topic_ok(topic: str) -> bool:
    return reply_destination_problem(topic) is None
