"""The SDK's exceptions::

    SdkError
      ReplyError          the daemon answered with an error reply (code, message, details)
      RequestTimeout      no reply within the timeout (the request may still run: retry with the same id)
      BrokerUnreachable   cannot connect to the broker, or the connection was lost
        SubscriptionFailed  the broker refused a subscription, or never acknowledged it, after retries
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


class SubscriptionFailed(BrokerUnreachable):
    """The broker refused a subscription (its SUBACK's reason) or sent no SUBACK in time, again and again: the
    replies or documents it would have carried can never arrive."""

    def __init__(self, topic: str, reason: str) -> None:
        super().__init__(f"subscription to {topic} failed: {reason}")
        self.topic = topic
        self.reason = reason
