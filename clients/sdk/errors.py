"""The SDK's exceptions::

    SdkError
      ReplyError          the daemon answered with an error reply (code, message, details)
      RequestTimeout      no reply within the timeout (the request may still run: retry with the same id)
      BrokerUnreachable   cannot connect to the broker, or the connection was lost
"""

from __future__ import annotations

from typing import Any


class SdkError(Exception):
    """Base of every error the SDK raises on purpose."""


class ReplyError(SdkError):
    """An error reply. ``code`` is the daemon's stable error code (``bad_request``, ``unknown_symbol``, …)."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None, *,
                 request_id: str | None = None, verb: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details or {}
        self.request_id = request_id
        self.verb = verb


class RequestTimeout(SdkError):
    def __init__(self, message: str, *, request_id: str | None = None, verb: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.verb = verb


class BrokerUnreachable(SdkError):
    """The broker refused or dropped the connection (``reason`` says why, as paho put it)."""
