"""Errors of the request path itself (the payload, the verb, the request id), with their stable codes."""

from __future__ import annotations

from daemon.errors import LivepatchdError


class RequestError(LivepatchdError):
    """The request was refused before anything ran."""

    code = "bad_request"
    errno = -22  # -EINVAL


class BadRequest(RequestError):
    """Not JSON, not an object, or not valid for the verb's schema (unknown fields included)."""

    code = "bad_request"


class InvalidReplyTopic(RequestError):
    """The v5 response topic or ``reply_to`` is not a topic a reply can be published to (a wildcard, a control
    character or non-character, too long, empty, ``$``…): refused before anything is journaled, answered on the
    default reply topic."""

    code = "invalid_reply_topic"


class ForbiddenReplyTopic(RequestError):
    """The v5 response topic or ``reply_to`` names a topic of the daemons' namespace that is not a reply topic
    (a request, ``status``, ``state``, ``events``, ``trace``…): a reply there would pose as that document."""

    code = "forbidden_reply_topic"
    errno = -1  # -EPERM


class UnknownVerb(RequestError):
    code = "unknown_verb"
    errno = -95  # -EOPNOTSUPP


class PayloadTooLarge(RequestError):
    code = "payload_too_large"
    errno = -7  # -E2BIG


class RequestIdConflict(RequestError):
    """A journaled request id came back with a different verb or different parameters."""

    code = "request_id_conflict"
    errno = -17  # -EEXIST


class InvalidArgument(RequestError):
    """Valid for the schema, invalid for this kernel (a CPU it does not have, a symbol that is not a function)."""

    code = "invalid_argument"


class JournalUnreadable(LivepatchdError):
    """A journal row cannot be read back (written by an older version, damaged): its request is answered with
    this instead of being executed again, or its reply instead of being repeated."""

    code = "journal_unreadable"
    errno = -5  # -EIO


class CallNotAllowed(RequestError):
    """The call verbs run only the functions the image marks callable, unless the daemon allows any call."""

    code = "call_not_allowed"
    errno = -1  # -EPERM


class RequestTimeout(LivepatchdError):
    code = "timeout"
    errno = -110  # -ETIMEDOUT


class StorageFull(LivepatchdError):
    """The state directory's file system is full: the request was not journaled (nor acknowledged as accepted)
    and not executed; read-only verbs are still served. Retry once space is freed."""

    code = "storage_full"
    errno = -28  # -ENOSPC


INTERNAL = "internal"
"""The code of an unexpected failure (a bug): the message says so; the traceback goes to the log only."""
