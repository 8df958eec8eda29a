"""The request/reply envelope: every request carries ``request_id`` (and ``reply_to`` for MQTT 3.1.1)."""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any

from pydantic import Field, field_validator

from schemas._base import Inbound, Outbound, RequestId
from schemas.topics import reply_destination_problem

REPLY_TO_MAX = 256

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


class Request(Inbound):
    """Fields every request has. A verb's request model adds its own parameters beside them."""

    request_id: RequestId
    reply_to: str | None = Field(
        default=None, max_length=REPLY_TO_MAX,
        description="topic for the reply when the request has no MQTT v5 response topic (MQTT 3.1.1 clients): "
                    "a topic name (non-empty, no leading '$', no wildcard, no control character U+0000-U+001F or "
                    "U+007F-U+009F, no non-character such as U+FFFE, U+FFFF or U+FDD0-U+FDEF) outside livepatch/v1/ "
                    "unless it is a reply topic (livepatch/v1/<host>/reply or below it); otherwise the request is "
                    "refused with invalid_reply_topic or forbidden_reply_topic on the default reply topic")

    @field_validator("reply_to")
    @classmethod
    def _topic_name(cls, value: str | None) -> str | None:
        if value is not None:
            problem = reply_destination_problem(value)
            if problem is not None:
                raise ValueError(f"reply_to {problem[1]}")
        return value


class ErrorBody(Outbound):
    """Why a request failed. ``code`` is a stable string to match on; ``message`` is for people."""

    code: str
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class Reply(Outbound):
    """``{request_id, ok, data}`` on success, ``{request_id, ok: false, error}`` on failure.

    ``request_id`` is null only when the request was too broken to carry one (not JSON, too large).
    """

    request_id: str | None
    ok: bool
    data: dict[str, Any] | None = None
    error: ErrorBody | None = None

    @classmethod
    def success(cls, request_id: str, data: dict[str, Any]) -> Reply:
        return cls(request_id=request_id, ok=True, data=data)

    @classmethod
    def failure(cls, request_id: str | None, code: str, message: str, details: dict[str, Any] | None = None) -> Reply:
        return cls(request_id=request_id, ok=False, error=ErrorBody(code=code, message=message, details=details or {}))

    def to_json(self) -> str:
        """The wire form: ``data`` or ``error``, never both, never a null member."""
        doc: dict[str, Any] = {"request_id": self.request_id, "ok": self.ok}
        if self.ok:
            doc["data"] = self.data if self.data is not None else {}
        else:
            assert self.error is not None
            doc["error"] = self.error.model_dump(mode="json")
        return json.dumps(doc, separators=(",", ":"))
