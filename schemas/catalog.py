"""The catalog: every verb of this schema version, by name, from each subsystem's ``SPECS``.

A verb's dotted name (``symbol.lookup``, ``ftrace.ops.register``, ``patch.enable``) groups verbs; on the wire
each part is one topic level (``livepatch/v1/<host>/request/symbol/lookup``, see ``schemas.topics``). Adding a
verb = its two models and one ``VerbSpec`` in its subsystem's module (``schemas.kernel``, ``schemas.ftrace``,
``schemas.livepatch``), and a handler in the daemon's service layer.
"""

from __future__ import annotations

from schemas import ftrace, kernel, kprobes, livepatch, patch_insight, retprobes
from schemas.spec import VerbSpec

VERBS: dict[str, VerbSpec] = {spec.verb: spec for spec in (*ftrace.SPECS, *livepatch.SPECS, *patch_insight.SPECS,
                                                         *kernel.SPECS, *kprobes.SPECS,
                                                         *retprobes.SPECS)}
"""Every verb of this schema version, by name."""
