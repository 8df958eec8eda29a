"""``dyn_ftrace`` records: one per patchable call site, with Linux's flag bits and reference count.

``flags`` packs, as kernel/trace/ftrace.c does, a count of the ops tracing the site in its low
``FTRACE_REF_MAX_SHIFT`` bits and state bits above them:

====  ============  =====================================================================
bit   flag          meaning
====  ============  =====================================================================
31    ENABLED       the site calls (BL) rather than NOPs
30    REGS          some ops wants regs (never on arm64 WITH_ARGS)
26    IPMODIFY      an IPMODIFY ops covers the function (exclusive)
24    DIRECT        a direct trampoline is attached
23    DIRECT_EN     the site branches straight to that trampoline
22    CALL_OPS      the site may call its single ops directly
21    CALL_OPS_EN   the site's literal holds that ops (not ftrace_list_ops)
20    TOUCHED       some callback was attached since boot
19    MODIFIED      IPMODIFY or DIRECT was ever attached
====  ============  =====================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import IntFlag

from daemon.arch.arm64 import callsite


class RecFlag(IntFlag):
    ENABLED = 1 << 31
    REGS = 1 << 30
    REGS_EN = 1 << 29
    TRAMP = 1 << 28
    TRAMP_EN = 1 << 27
    IPMODIFY = 1 << 26
    DISABLED = 1 << 25
    DIRECT = 1 << 24
    DIRECT_EN = 1 << 23
    CALL_OPS = 1 << 22
    CALL_OPS_EN = 1 << 21
    TOUCHED = 1 << 20
    MODIFIED = 1 << 19


FTRACE_REF_MAX_SHIFT = 19
FTRACE_REF_MAX = (1 << FTRACE_REF_MAX_SHIFT) - 1


@dataclass
class DynFtrace:
    """A call site. ``target`` and ``literal`` mirror what guest memory holds now (0 target = NOP)."""

    ip: int  # rec->ip: the word that becomes BL
    name: str
    flags: int = 0
    target: int = 0
    literal: int = 0
    module: str = ""  # "" for kernel text; else the module whose text holds the site
    plt: int = 0  # the module's PLT to ftrace_caller, for a site out of BL range of kernel text

    @property
    def func_addr(self) -> int:
        """The address of the function this site is in (its symbol), not the site's own ip."""
        return func_addr(self.ip)

    @property
    def count(self) -> int:
        return self.flags & FTRACE_REF_MAX

    def has(self, flag: RecFlag) -> bool:
        return bool(self.flags & flag)


def ftrace_call_adjust(entry: int) -> int:
    """The record ip of a ``__patchable_function_entries`` entry (the word that becomes a BL)."""
    return callsite.ftrace_call_adjust(entry)


def func_addr(rec_ip: int) -> int:
    """The function symbol's address for a record ip (arch_ftrace_get_symaddr)."""
    return callsite.func_addr(rec_ip)


def records_from(entries: Iterable[int], name_at: Callable[[int], str | None], *, module: str = "",
                 plt: int = 0) -> list[DynFtrace]:
    """ftrace_process_locs: a record per patchable entry whose function ``name_at(func_addr)`` names (an entry
    with no function symbol starting there is __ftrace_invalid_address__ and never traced)."""
    recs = []
    for entry in entries:
        ip = ftrace_call_adjust(entry)
        name = name_at(func_addr(ip))
        if name is not None:
            recs.append(DynFtrace(ip, name, module=module, plt=plt))
    return recs
