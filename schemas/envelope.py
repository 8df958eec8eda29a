"""The request/reply envelope: every request carries ``request_id`` (and ``reply_to`` for MQTT 3.1.1)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import Field, field_validator

from schemas._base import Inbound, Outbound, RequestId
from schemas.topics import reply_destination_problem

REPLY_TO_MAX = 256


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
