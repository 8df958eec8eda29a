"""What a request payload says before it is validated: its JSON object (parsed with bounded nesting), the id and
the reply destination to answer a refusal with, and whether that destination may be published to."""

from __future__ import annotations

import json
from typing import Any

from daemon.service.pipeline.errors import BadRequest, ForbiddenReplyTopic, InvalidReplyTopic
from schemas.envelope import MAX_DEPTH, too_deep
from schemas.topics import reply_destination_problem


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
