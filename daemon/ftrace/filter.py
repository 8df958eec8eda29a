"""set_ftrace_filter syntax: which records a filter expression selects.

An expression is a list of terms separated by spaces, commas or newlines, applied left to right:

==================  =============================================================
term                effect
==================  =============================================================
``name``            add the function(s) of that name (every duplicate)
``glob``            add every function matching (``*alloc*``, ``mm_*``, ``*_page_?0042``)
``0xffff...``       add the record at that address (function start or rec->ip)
``!term``           remove what ``term`` selects from the set built so far
==================  =============================================================

A term that selects no traceable function is an error, so a typo never silently traces nothing (or, for a
``!`` term, everything).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

from daemon.errors import FilterNoMatch
from daemon.ftrace.records import DynFtrace

_SPLIT = re.compile(r"[\s,]+")


def terms(expr: str | Iterable[str]) -> list[str]:
    parts = _SPLIT.split(expr) if isinstance(expr, str) else [t for e in expr for t in _SPLIT.split(e)]
    return [p for p in parts if p]


def select(expr: str | Iterable[str], records: list[DynFtrace], by_name: dict[str, list[DynFtrace]],
           start: Iterable[int] = ()) -> set[int]:
    """The set of rec->ip the expression selects, applied to ``start`` (``>>`` appends to a filter: a ``!`` term
    then removes from what it already held). FilterNoMatch for a term that matches nothing."""
    chosen: set[int] = set(start)
    for term in terms(expr):
        negate = term.startswith("!")
        pattern = term[1:] if negate else term
        ips = _match(pattern, records, by_name)
        if not ips:
            raise no_match(pattern)
        chosen = chosen - ips if negate else chosen | ips
    return chosen


def no_match(pattern: str) -> FilterNoMatch:
    return FilterNoMatch(f"{pattern!r} matches no traceable function (see available_filter_functions)",
                         pattern=pattern)


def _match(pattern: str, records: list[DynFtrace], by_name: dict[str, list[DynFtrace]]) -> set[int]:
    if pattern.lower().startswith("0x"):
        try:
            addr = int(pattern, 16)
        except ValueError:
            return set()
        return {r.ip for r in records if addr in (r.ip, r.ip - 4)}
    if any(ch in pattern for ch in "*?["):
        rx = re.compile(fnmatch.translate(pattern))
        return {r.ip for r in records if rx.match(r.name)}
    return {r.ip for r in by_name.get(pattern, ())}
