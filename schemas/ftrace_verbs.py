"""Request and reply models of the ftrace verbs: ops with filters, tracefs views, the function tracer, hijacks."""

from __future__ import annotations

from schemas.spec import VerbSpec

SPECS: list[VerbSpec] = []
"""This module's verbs; schemas.verbs.VERBS includes them."""
