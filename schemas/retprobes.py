"""The kretprobe and fprobe verbs (``kretprobe.register|unregister|list``, ``fprobe.register|unregister|list|read``),
their events and state sections, and the parser of the kernel's ``r:`` and ``f:`` dynamic-event lines.

A kretprobe is a kprobe at a function's address whose handler hijacks the return (x30) to a trampoline:
``brk`` (a BRK exception: the return handler sees a genuine pt_regs) or ``rethook`` (no exception: registers
saved by hand, pstate synthesized). Its return records (x0 = the return value) come through ``kprobe.read``, in
the kernel's format for kretprobe events (``NAME: (CALLER+OFF/SIZE <- FUNC) arg1=0x…``).

An fprobe is an ftrace_ops on every function a glob selects: entry handler with the ARGS (x0-x7, sp, lr), exit
handler (through the function-graph return hook) with the return value; never a pt_regs. ``save_regs`` is
refused (``ftrace_error``, -EINVAL: arm64 has no DYNAMIC_FTRACE_WITH_REGS); ``save_regs_if_supported`` is
accepted and changes nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from schemas._base import Address, Outbound
from schemas.envelope import Request
from schemas.kprobes import NAME_RE
from schemas.spec import VerbSpec

Trampoline = Literal["brk", "rethook"]
FprobeFlag = Literal["save_regs", "save_regs_if_supported"]
MAXACTIVE_MAX = 256
FILTER_MAX = 1000


@dataclass(frozen=True)
class RetprobeDefinition:
    """A parsed ``r:`` (kretprobe) or ``f:`` (fprobe) dynamic-event line."""

    kind: Literal["r", "f"]
    name: str
    target: str  # r: the function; f: the filter (globs, space-separated)
    maxactive: int | None = None  # r only
    exit: bool = False  # f only: SYM%return


def parse_retprobe_definition(text: str) -> RetprobeDefinition:
    """``r[MAXACTIVE][:[GRP/]EVENT] SYM [$retval]`` (kprobetrace.rst) or
    ``f[:[GRP/]EVENT] GLOB[,GLOB...][%return] [$retval]`` (fprobetrace.rst, with globs as fprobe's filter).

    The default event names are Linux's (``r_SYM_0``, ``SYM__entry`` / ``SYM__exit``); ``$retval`` is the only
    fetch argument (a kretprobe or an fprobe exit records x0 anyway). ValueError for anything else.
    """
    tokens = text.split()
    if len(tokens) < 2:
        raise ValueError("a definition is 'r[MAXACTIVE][:NAME] SYMBOL' or 'f[:NAME] GLOB[%return]'")
    head, target, *fetch = tokens
    if any(f not in ("$retval", "arg1=$retval") for f in fetch):
        raise ValueError("the only fetch argument of r:/f: probes here is $retval")
    kind, _, event = head.partition(":")
    event = event.rpartition("/")[2]
    m = re.fullmatch(r"([rf])([0-9]*)", kind)
    if m is None:
        raise ValueError(f"'r' (kretprobe) or 'f' (fprobe) definitions only, not {kind!r}")
    if m.group(1) == "r":
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", target):
            raise ValueError(f"bad kretprobe point {target!r}: a function name (kretprobes go at its entry)")
        maxactive = int(m.group(2)) if m.group(2) else None
        if maxactive is not None and not 1 <= maxactive <= MAXACTIVE_MAX:
            raise ValueError(f"MAXACTIVE must be 1..{MAXACTIVE_MAX}")
        event = event or f"r_{target}_0".replace(".", "_")
        if not re.fullmatch(NAME_RE, event):
            raise ValueError(f"bad event name {event!r}")
        return RetprobeDefinition("r", event, target, maxactive=maxactive)
    if m.group(2):
        raise ValueError("f: takes no MAXACTIVE")
    exit_ = target.endswith("%return")
    globs = target.removesuffix("%return")
    if not re.fullmatch(r"[A-Za-z0-9_.*?\[\]!]+(,[A-Za-z0-9_.*?\[\]!]+)*", globs):
        raise ValueError(f"bad fprobe filter {globs!r}: globs separated by commas")
    event = event or re.sub(r"[^A-Za-z0-9_]", "_", globs.split(",")[0]) + ("__exit" if exit_ else "__entry")
    if not re.fullmatch(NAME_RE, event):
        raise ValueError(f"bad event name {event!r}")
    return RetprobeDefinition("f", event, globs.replace(",", " "), exit=exit_)


# -- kretprobe.* -----------------------------------------------------------------------------------------------


class KretprobeRegisterRequest(Request):
    """Register a kretprobe on a function (``echo 'r[N]:NAME SYM' >> kprobe_events``)."""

    name: str = Field(pattern=NAME_RE)
    target: str = Field(min_length=1, max_length=200, description="the function (its entry is probed)")
    maxactive: int = Field(default=10, ge=1, le=MAXACTIVE_MAX,
                           description="instances per CPU: returns hijacked at once; an entry finding none is "
                                       "counted in nmissed")
    trampoline: Trampoline = Field(default="brk", description="brk: a BRK exception per return, genuine pt_regs; "
                                   "rethook: registers saved by hand, pstate synthesized")
    record: bool = Field(default=True, description="the return handler records pt_regs (x0 = return value)")


class KretprobeInfo(Outbound):
    name: str
    address: Address
    symbol: str
    trampoline: Trampoline
    maxactive: int
    record: bool
    hits: int = Field(description="returns handled")
    entries: int = Field(description="hits of the entry kprobe")
    nmissed: int = Field(description="entries with no free instance on their CPU (maxactive exhausted)")
    kprobe_nmissed: int = Field(description="entries missed because another probe's handler ran on the CPU")
    in_use: int = Field(description="instances on tasks now (hijacked returns not yet taken)")
    definition: str = Field(description="the probe in kprobe_events syntax")


class KretprobeRegisterData(KretprobeInfo):
    pass


class KretprobeUnregisterRequest(Request):
    name: str = Field(pattern=NAME_RE)


class KretprobeUnregisterData(Outbound):
    name: str
    hits: int
    nmissed: int
    in_flight: int = Field(description="returns still hijacked: they go back to their callers unhandled")


class KretprobeListRequest(Request):
    """The registered kretprobes with their counters."""


class KretprobeListData(Outbound):
    probes: list[KretprobeInfo]
    kprobe_events: str = Field(description="the r: lines of kprobe_events")


# -- fprobe.* --------------------------------------------------------------------------------------------------


class FprobeRegisterRequest(Request):
    """Register an fprobe on every function the filter selects (set_ftrace_filter globs)."""

    name: str = Field(pattern=NAME_RE)
    filter: str = Field(min_length=1, max_length=FILTER_MAX, description="globs, space-separated")
    exit: bool = Field(default=True, description="an exit handler too (the return hooked through fgraph)")
    record: bool = Field(default=True, description="record the args at entry and x0 at exit (fprobe.read)")
    flags: list[FprobeFlag] = Field(default_factory=list, max_length=2,
                                    description="ftrace ops flags: save_regs is refused (-EINVAL on arm64)")


class FprobeInfo(Outbound):
    name: str
    filter: str
    functions: int
    exit: bool
    record: bool
    flags: list[FprobeFlag]
    hits: int
    exit_hits: int
    nmissed: int = Field(description="entries missed: recursion, or a full return stack for the exit")
    definition: str


class FprobeRegisterData(FprobeInfo):
    pass


class FprobeUnregisterRequest(Request):
    name: str = Field(pattern=NAME_RE)


class FprobeUnregisterData(Outbound):
    name: str
    hits: int
    exit_hits: int


class FprobeListRequest(Request):
    """The registered fprobes with their counters."""


class FprobeListData(Outbound):
    probes: list[FprobeInfo]
    fprobe_events: str


class FprobeReadRequest(Request):
    """Drain the fprobe rings: entries and exits recorded since the last read, as trace lines."""


class FprobeHitRecord(Outbound):
    probe: str
    cpu: int
    pid: int
    ts: int = Field(description="cntvct ticks")
    exit: bool
    ip: Address = Field(description="the function's ftrace site (rec->ip)")
    ret: Address = Field(description="the return address (the caller)")
    args: list[int] = Field(description="x0-x7 at entry (zero at exit)")
    sp: int
    lr: int
    retval: int = Field(description="x0 at exit")
    duration: int = Field(description="exit: ticks since the entry")


class FprobeReadData(Outbound):
    text: str
    hits: list[FprobeHitRecord]
    lost: int


SPECS: list[VerbSpec] = [
    VerbSpec("kretprobe.register", KretprobeRegisterRequest, KretprobeRegisterData,
             "Register a kretprobe on a function (its return handler records x0; trampoline brk or rethook).",
             mutating=True),
    VerbSpec("kretprobe.unregister", KretprobeUnregisterRequest, KretprobeUnregisterData,
             "Disarm and remove a kretprobe; returns already hijacked still go back to their callers.",
             mutating=True),
    VerbSpec("kretprobe.list", KretprobeListRequest, KretprobeListData,
             "The kretprobes with hits, nmissed (maxactive exhausted) and instances in use."),
    VerbSpec("fprobe.register", FprobeRegisterRequest, FprobeRegisterData,
             "Register an fprobe (entry/exit, args only) on the functions a glob selects; save_regs refused.",
             mutating=True),
    VerbSpec("fprobe.unregister", FprobeUnregisterRequest, FprobeUnregisterData, "Remove an fprobe.",
             mutating=True),
    VerbSpec("fprobe.list", FprobeListRequest, FprobeListData, "The fprobes with their counters."),
    VerbSpec("fprobe.read", FprobeReadRequest, FprobeReadData,
             "Drain the recorded fprobe entries and exits as trace lines.", mutating=True),
]


# -- state sections and events ---------------------------------------------------------------------------------


class KretprobeState(Outbound):
    address: Address
    trampoline: Trampoline
    hits: int
    nmissed: int
    definition: str


class KretprobesSection(Outbound):
    """``components.kretprobes`` of the state document (counters as of the last change or kretprobe.list)."""

    probes: dict[str, KretprobeState]


class FprobeState(Outbound):
    filter: str
    functions: int
    hits: int
    exit_hits: int
    nmissed: int


class FprobesSection(Outbound):
    """``components.fprobes`` of the state document (counters as of the last change or fprobe.list)."""

    probes: dict[str, FprobeState]


class RetprobeRegisteredEvent(Outbound):
    name: str
    target: str


class RetprobeUnregisteredEvent(Outbound):
    name: str
    hits: int


class RetprobeRestoreFailedEvent(Outbound):
    name: str
    error: str


RetprobeEventType = Literal["kretprobe.registered", "kretprobe.unregistered", "kretprobe.restore_failed",
                            "fprobe.registered", "fprobe.unregistered", "fprobe.restore_failed"]
"""Events of the kretprobe and fprobe verbs (on ``events``, with the daemon's own ``EventType``)."""

class KretprobeRegisteredEvent(RetprobeRegisteredEvent):
    """target: the function."""


class FprobeRegisteredEvent(RetprobeRegisteredEvent):
    """target: the filter."""


class KretprobeUnregisteredEvent(RetprobeUnregisteredEvent):
    """hits: returns handled."""


class FprobeUnregisteredEvent(RetprobeUnregisteredEvent):
    """hits: entries."""


class KretprobeRestoreFailedEvent(RetprobeRestoreFailedEvent):
    pass


class FprobeRestoreFailedEvent(RetprobeRestoreFailedEvent):
    pass


EVENTS: dict[str, type[Outbound]] = {
    "kretprobe.registered": KretprobeRegisteredEvent, "kretprobe.unregistered": KretprobeUnregisteredEvent,
    "kretprobe.restore_failed": KretprobeRestoreFailedEvent, "fprobe.registered": FprobeRegisteredEvent,
    "fprobe.unregistered": FprobeUnregisteredEvent, "fprobe.restore_failed": FprobeRestoreFailedEvent}
