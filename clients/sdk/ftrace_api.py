"""SDK methods of the ftrace, trace and hijack verbs (mixed into LivepatchClient)."""

from __future__ import annotations


class FtraceApi:
    """ftrace ops, tracefs views, the function tracer and hijacks."""
