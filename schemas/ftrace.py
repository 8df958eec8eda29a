"""Request and reply models of the ftrace verbs: ops with filters, tracefs views, the function tracer, hijacks.

============================  ===========================================================================
verb                          what it does
============================  ===========================================================================
ftrace.ops.register           attach a guest callback (``count`` or ``nop``, never an address) to functions
ftrace.ops.unregister         detach it (its hits are reported one last time)
ftrace.ops.list               the ops registered through the API, with hits; other owners by name
ftrace.ops.filter             change an ops' filter / notrace while it stays registered
ftrace.available_filter_functions   the traceable functions, paged, optionally matching a glob
ftrace.enabled_functions      enabled_functions (or touched_functions) exactly as tracefs prints it, paged
trace.start / trace.stop      the function tracer; while it runs the daemon drains its rings every 100 ms
trace.read                    what was drained since the last read: trace lines and structured records
hijack.create / .delete       redirect a function to another (IPMODIFY) or through a direct trampoline
hijack.list                   the hijacks
============================  ===========================================================================

Filters use set_ftrace_filter syntax: terms separated by spaces or commas, globs (``work_step_*``), addresses
(``0xffff…``), ``!term`` to remove; a term that matches no traceable function is refused
(``ftrace_filter_no_match``). An empty or absent filter means every traceable function, as in Linux.

While the function tracer runs, batches of records are published on ``livepatch/v1/<host>/trace`` as
:class:`TraceBatchDoc` (not retained).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from schemas._base import SCHEMA_VERSION, Address, HostId, Outbound
from schemas.envelope import Request
from schemas.spec import VerbSpec

MAX_PAGE = 2000
"""The most names, enabled-function records or trace records one reply carries (keeps replies < 1 MiB)."""
TRACE_BUFFER = MAX_PAGE
"""Records the daemon keeps between two trace.read calls (the oldest are discarded first and counted)."""
MAX_RING_ENTRIES = 1 << 16
DIRECT_TRAMPOLINES = ("my_tramp", "ftrace_stub_direct_tramp")
"""The only targets of a ``direct`` hijack: a direct trampoline is entered with x9 = the caller and x30 = the
traced function's body, which no ordinary (C ABI) function expects."""

OpsName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9_.-]+$",
                               description="unique per daemon: lower-case letters, digits, '_', '.', '-'")]
HijackName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")]
FilterExpr = Annotated[str, Field(max_length=4096, description="set_ftrace_filter syntax; empty = every function")]
FunctionName = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[^\s,!]+$")]
Sympos = Annotated[int, Field(ge=0, le=1_000_000, description="1-based position among same-named functions")]
Callback = Literal["count", "nop"]


class BatchInfo(Outbound):
    """The stop-machine batch a change was applied in (absent when nothing had to be written)."""

    sites: int = Field(description="call-site instructions rewritten")
    data: int = Field(description="guest words stored (literals, ops-list links, hash pointers)")
    pause_us: float = Field(description="first vCPU parked to last vCPU resumed")


FtraceEventType = Literal[
    "ftrace.ops.registered",    # data: the ops (name, callback, filter, notrace, functions)
    "ftrace.ops.filtered",      # data: the ops after its filter or notrace changed
    "ftrace.ops.unregistered",  # data: name
    "ftrace.sysctl",            # data: ftrace_enabled, sites
    "hijack.created",           # data: the hijack (function, target, mode)
    "hijack.deleted",           # data: name, function
    "profile.started",          # data: filter, functions
    "profile.stopped",          # data: functions (with hits), hits
    "trace.started",            # data: filter, notrace, functions, entries_per_cpu
    "trace.stopped",            # data: records, dropped
    "ftrace.restored",          # data: ops, hijacks (re-applied at boot, before online)
    "ftrace.restore_failed",    # data: kind, name, code, message
]
"""Events of the ftrace verbs (on ``events``, with the daemon's own ``EventType``)."""

# -- ops -------------------------------------------------------------------------------------------------------


class OpsInfo(Outbound):
    name: str
    callback: Callback = Field(description="count: ops_func_count (per-CPU hits); nop: ops_func_nop")
    filter: str | None = Field(description="the filter expression(s) applied, None: every function")
    notrace: str | None
    filter_functions: int | None = Field(description="functions in the filter hash; None: no filter (all)")
    notrace_functions: int
    functions: int = Field(description="functions the ops covers now (filter minus notrace)")
    flags: list[str] = Field(description="FTRACE_OPS_FL_* names")
    address: Address | None = Field(description="its struct ftrace_ops in guest memory while registered")
    hits: int = Field(description="calls counted by the callback (always 0 for nop)")


class ForeignOps(Outbound):
    """An ops registered by something else than this API (tracer, hijack, livepatch)."""

    name: str
    flags: list[str]
    functions: int


class OpsRegisterRequest(Request):
    """Register an ftrace ops whose callback is one of the guest's safe sample callbacks."""

    name: OpsName
    callback: Callback = "count"
    filter: FilterExpr | None = None
    notrace: FilterExpr | None = None
    recursion: bool = Field(default=False, description="FTRACE_OPS_FL_RECURSION: the site calls through the "
                            "list function, which guards against recursion")


class OpsData(Outbound):
    ops: OpsInfo
    batch: BatchInfo | None = None


class OpsUnregisterRequest(Request):
    name: OpsName


class OpsListRequest(Request):
    """Every ops registered through the API, with hits and functions covered; other owners by name."""


class OpsListData(Outbound):
    ops: list[OpsInfo]
    others: list[ForeignOps]


class OpsFilterRequest(Request):
    """ftrace_set_filter / ftrace_set_notrace on a registered ops; ``reset: false`` adds to the current set."""

    name: OpsName
    filter: FilterExpr | None = None
    notrace: FilterExpr | None = None
    reset: bool = True

    @model_validator(mode="after")
    def _something(self) -> OpsFilterRequest:
        if self.filter is None and self.notrace is None:
            raise ValueError("give 'filter', 'notrace' or both")
        return self


# -- tracefs views ---------------------------------------------------------------------------------------------


class AvailableRequest(Request):
    """available_filter_functions, a page at a time (10,000+ names do not fit one reply)."""

    pattern: Annotated[str, Field(min_length=1, max_length=256)] | None = Field(
        default=None, description="a glob on the function name ('work_*'); without wildcards, an exact name")
    offset: int = Field(default=0, ge=0, le=10_000_000)
    limit: int = Field(default=1000, ge=1, le=MAX_PAGE)


class AvailableData(Outbound):
    functions: list[str] = Field(description="lines of available_filter_functions ('name' or 'name [module]')")
    total: int = Field(description="functions matching, over every page")
    offset: int
    next_offset: int | None = Field(description="offset of the next page, None after the last")


class EnabledRequest(Request):
    """enabled_functions (``touched``: touched_functions), exactly as tracefs prints it, a page of records."""

    touched: bool = False
    offset: int = Field(default=0, ge=0, le=10_000_000)
    limit: int = Field(default=MAX_PAGE, ge=1, le=MAX_PAGE)


class EnabledData(Outbound):
    text: str = Field(description="the file's text for this page's records (the whole file when next_offset "
                                  "is None and offset is 0)")
    functions: int = Field(description="records in this page")
    total: int = Field(description="records in the whole file")
    offset: int
    next_offset: int | None


class SysctlRequest(Request):
    """sysctl kernel.ftrace_enabled: read it (no parameter) or set it. Cleared, every traced call site is a NOP
    again; it cannot be cleared while a live patch (a PERMANENT ops) is registered, and no live patch can be
    enabled while it is cleared (both ``ftrace_busy``, -16)."""

    ftrace_enabled: bool | None = Field(default=None, description="the new value; omit to read the current one")


class SysctlData(Outbound):
    ftrace_enabled: bool
    changed: bool = Field(description="whether this request changed it")
    sites: int = Field(description="call sites rewritten by the change (0 when unchanged)")


# -- the function tracer ---------------------------------------------------------------------------------------


class TraceStartRequest(Request):
    """``echo function > current_tracer`` (or ``function_graph``) with set_ftrace_filter / set_ftrace_notrace
    expressions."""

    tracer: Literal["function", "function_graph"] = Field(
        default="function", description="function: one line per call; function_graph: entries and returns, "
        "nested, with durations")
    filter: FilterExpr | None = None
    notrace: FilterExpr | None = None
    graph_function: FilterExpr | None = Field(
        default=None, description="function_graph only, set_graph_function: record only calls made while the task "
        "is inside one of these functions (themselves included); empty = no restriction")
    graph_notrace: FilterExpr | None = Field(
        default=None, description="function_graph only, set_graph_notrace: never record these functions nor "
        "anything they call")
    entries_per_cpu: int = Field(default=4096, ge=2, le=MAX_RING_ENTRIES, description="ring size, a power of two")

    @model_validator(mode="after")
    def _power_of_two(self) -> TraceStartRequest:
        if self.entries_per_cpu & (self.entries_per_cpu - 1):
            raise ValueError("entries_per_cpu must be a power of two")
        return self

    @model_validator(mode="after")
    def _graph_only(self) -> TraceStartRequest:
        if self.tracer != "function_graph" and (self.graph_function is not None or self.graph_notrace is not None):
            raise ValueError("graph_function and graph_notrace need tracer function_graph")
        return self


class TraceStartData(Outbound):
    tracer: Literal["function", "function_graph"] = "function"
    filter: str | None
    notrace: str | None
    graph_function: str | None = None
    graph_notrace: str | None = None
    entries_per_cpu: int
    functions: int = Field(description="functions traced")
    topic: str = Field(description="where batches of records are published while the tracer runs")
    streaming: bool = Field(description="whether this daemon publishes batches on that topic")
    period_ms: int = Field(description="how often the daemon drains the rings")
    batch: BatchInfo | None = None


class TraceEntry(Outbound):
    """One line's record: a function-tracer call, or a function_graph ``call`` (a leaf: entry and return),
    ``entry`` (opens a brace) or ``return`` (closes one)."""

    kind: Literal["function", "call", "entry", "return"] = "function"
    ip: Address = Field(description="rec->ip of the traced function")
    parent_ip: Address = Field(description="the caller (function tracer, entry, call), or the address a "
                                           "return went back to")
    function: str = Field(description="%ps of ip")
    parent: str = Field(description="%ps of parent_ip")
    ts: int = Field(description="guest counter ticks")
    time: float = Field(description="seconds, as the trace line prints them")
    pid: int
    cpu: int
    comm: str
    depth: int | None = Field(default=None, description="function_graph: the call's nesting depth on its task")
    duration_ns: int | None = Field(default=None, description="function_graph: the call's duration (call, return)")


class TraceReadRequest(Request):
    """Drain the rings now and return what was drained since the last read (like reading trace_pipe)."""

    limit: int = Field(default=MAX_PAGE, ge=1, le=MAX_PAGE)


class TraceReadData(Outbound):
    lines: list[str] = Field(description="one trace line per record, in the function tracer's format")
    records: list[TraceEntry]
    written: int = Field(description="entries the guest stored since the tracer started")
    dropped: int = Field(description="entries the guest lost because a ring was full")
    overrun: int = Field(description="drained records discarded unread because the daemon's buffer was full")
    remaining: int = Field(description="records still buffered (read again)")
    running: bool


class TraceStopRequest(Request):
    """Stop the function tracer; the reply carries what was not read yet."""

    limit: int = Field(default=MAX_PAGE, ge=1, le=MAX_PAGE)


class TraceStopData(TraceReadData):
    discarded: int = Field(description="unread records beyond 'limit', gone with the tracer")
    batch: BatchInfo | None = None


# -- the function profiler ------------------------------------------------------------------------------------


class ProfileStartRequest(Request):
    """``echo 1 > function_profile_enabled``: count the calls of each function the filter selects (every
    function when omitted), per CPU, in the guest."""

    filter: FilterExpr | None = None


class ProfileStartData(Outbound):
    filter: str | None
    functions: int = Field(description="functions counted")
    batch: BatchInfo | None = None


class ProfileLine(Outbound):
    function: str
    address: Address
    hits: int


class ProfileReadRequest(Request):
    """trace_stat/function: the counts so far, most called first (functions never called are left out)."""

    limit: int = Field(default=MAX_PAGE, ge=1, le=MAX_PAGE)


class ProfileReadData(Outbound):
    text: str = Field(description="trace_stat/function as tracefs prints it (these lines)")
    functions: list[ProfileLine]
    total_functions: int = Field(description="functions with at least one hit")
    total_hits: int
    running: bool


class ProfileStopRequest(Request):
    """``echo 0 > function_profile_enabled``; the reply carries the final counts."""

    limit: int = Field(default=MAX_PAGE, ge=1, le=MAX_PAGE)


class ProfileStopData(ProfileReadData):
    batch: BatchInfo | None = None


class TraceBatchDoc(Outbound):
    """Published on ``trace`` (not retained) while the function tracer runs: records drained from the rings.

    ``session`` counts trace.start calls of this boot; ``seq`` grows by one per batch within a session (a gap is
    a loss). Probe hits (``kprobe.stream``) come on the same topic with ``source: kprobes``, session 0, their own
    ``seq``, and lines only (in the kernel's kprobe event format; ``records`` empty, ``dropped`` = ring losses).
    """

    schema_version: int = SCHEMA_VERSION
    host: HostId
    boot_seq: int
    source: Literal["ftrace", "kprobes"] = Field(default="ftrace", description="the tracer (ftrace) or the "
                                                 "probes' rings (kprobes: kprobe and kretprobe hits)")
    session: int
    seq: int
    time: float
    lines: list[str]
    records: list[TraceEntry]
    written: int
    dropped: int


# -- hijacks ---------------------------------------------------------------------------------------------------


class HijackCreateRequest(Request):
    """Redirect calls of ``function`` to ``target``.

    ``ipmodify``: an IPMODIFY ops whose guest callback (ftrace_redirect_call) continues the call at ``target``, a
    function in kernel or module text with the same signature; it returns straight to the caller. ``direct``:
    the call goes through direct trampoline ``target`` (only ``my_tramp`` or ``ftrace_stub_direct_tramp``) and
    then runs ``function`` itself. A function has at most one IPMODIFY or direct owner (``ftrace_busy``).
    """

    function: FunctionName
    sympos: Sympos = 0
    target: FunctionName = Field(description="a function name, or its address as a hex string")
    target_sympos: Sympos = 0
    mode: Literal["ipmodify", "direct"] = "ipmodify"
    name: HijackName | None = Field(default=None, description="default: the function's name (with '.sympos')")


class HijackInfo(Outbound):
    name: str
    mode: Literal["ipmodify", "direct"]
    function: str
    sympos: int
    address: Address = Field(description="the hijacked function")
    target: str = Field(description="%pS of the target")
    target_address: Address
    ops: str = Field(description="the ftrace ops' name (what ftrace_busy errors name as owner)")
    ops_address: Address | None


class HijackData(Outbound):
    hijack: HijackInfo
    batch: BatchInfo | None = None


class HijackDeleteRequest(Request):
    """By ``name``, or by the hijacked ``function`` (with ``sympos`` when it is duplicated)."""

    name: HijackName | None = None
    function: FunctionName | None = None
    sympos: Sympos = 0

    @model_validator(mode="after")
    def _one_key(self) -> HijackDeleteRequest:
        if (self.name is None) == (self.function is None):
            raise ValueError("give exactly one of 'name' and 'function'")
        return self


class HijackListRequest(Request):
    """Every hijack in place."""


class HijackListData(Outbound):
    hijacks: list[HijackInfo]


SPECS: list[VerbSpec] = [
    VerbSpec("ftrace.ops.register", OpsRegisterRequest, OpsData,
             "Register an ftrace ops (callback count or nop) on the functions its filter selects.", mutating=True),
    VerbSpec("ftrace.ops.unregister", OpsUnregisterRequest, OpsData, "Unregister an ops registered through the API.",
             mutating=True),
    VerbSpec("ftrace.ops.list", OpsListRequest, OpsListData,
             "The ops registered through the API (hits, functions, flags) and the other ops by name."),
    VerbSpec("ftrace.ops.filter", OpsFilterRequest, OpsData,
             "Change the filter and/or notrace set of a registered ops (reset or add).", mutating=True),
    VerbSpec("ftrace.available_filter_functions", AvailableRequest, AvailableData,
             "The traceable functions, paged, optionally matching a glob."),
    VerbSpec("ftrace.enabled_functions", EnabledRequest, EnabledData,
             "enabled_functions (or touched_functions) as tracefs prints it, paged by record."),
    VerbSpec("ftrace.sysctl", SysctlRequest, SysctlData,
             "Read or set kernel.ftrace_enabled (every traced call site off, or back on).", mutating=True),
    VerbSpec("trace.start", TraceStartRequest, TraceStartData,
             "Start the function tracer; batches of records are published on the trace topic.", mutating=True),
    VerbSpec("trace.stop", TraceStopRequest, TraceStopData, "Stop the function tracer; returns the unread records.",
             mutating=True),
    VerbSpec("trace.read", TraceReadRequest, TraceReadData,
             "Drain the rings now; returns the records not read yet as trace lines and structured records."),
    VerbSpec("profile.start", ProfileStartRequest, ProfileStartData,
             "Start the function profiler (calls per function, counted in the guest).", mutating=True),
    VerbSpec("profile.read", ProfileReadRequest, ProfileReadData,
             "trace_stat/function: calls per function so far, most called first."),
    VerbSpec("profile.stop", ProfileStopRequest, ProfileStopData, "Stop the function profiler; the final counts.",
             mutating=True),
    VerbSpec("hijack.create", HijackCreateRequest, HijackData,
             "Redirect a function to another (IPMODIFY) or through a direct trampoline.", mutating=True),
    VerbSpec("hijack.delete", HijackDeleteRequest, HijackData, "Remove a hijack, by name or by function.",
             mutating=True),
    VerbSpec("hijack.list", HijackListRequest, HijackListData, "Every hijack in place."),
]
"""This module's verbs; schemas.catalog.VERBS includes them."""


# -- events (on ``events``: ``EventDoc.data`` of each type) ------------------------------------------------------


class OpsRegisteredEvent(Outbound):
    """``ftrace.ops.registered``: an ops registered through ftrace.ops.register."""

    name: str
    callback: Callback
    functions: int = Field(description="functions it covers")


class OpsUnregisteredEvent(Outbound):
    """``ftrace.ops.unregistered``."""

    name: str
    hits: int = Field(description="calls its callback counted while registered")


class OpsFilteredEvent(Outbound):
    """``ftrace.ops.filtered``: its filter or notrace set changed."""

    name: str
    filter: str | None
    notrace: str | None
    functions: int


class SysctlEvent(Outbound):
    """``ftrace.sysctl``: kernel.ftrace_enabled was set."""

    ftrace_enabled: bool
    sites: int = Field(description="call sites rewritten")


class HijackCreatedEvent(Outbound):
    """``hijack.created``."""

    name: str
    mode: Literal["ipmodify", "direct"]
    function: str
    target: str


class HijackDeletedEvent(Outbound):
    """``hijack.deleted``."""

    name: str
    mode: Literal["ipmodify", "direct"]
    function: str


class ProfileStartedEvent(Outbound):
    """``profile.started``."""

    filter: str | None
    functions: int


class ProfileStoppedEvent(Outbound):
    """``profile.stopped``."""

    functions: int = Field(description="functions with at least one hit")
    hits: int


class TraceStartedEvent(Outbound):
    """``trace.started``."""

    session: int
    tracer: Literal["function", "function_graph"]
    filter: str | None
    functions: int


class TraceStoppedEvent(Outbound):
    """``trace.stopped``."""

    session: int
    written: int
    dropped: int


class FtraceRestoredEvent(Outbound):
    """``ftrace.restored``: the desired ops and hijacks re-applied at boot, before the daemon went online."""

    ops: list[str]
    hijacks: list[str]
    failed: int


class FtraceRestoreFailedEvent(Outbound):
    """``ftrace.restore_failed``: a desired ops or hijack that could not be re-applied at boot."""

    kind: str
    name: str
    code: str
    message: str


EVENTS: dict[str, type[Outbound]] = {
    "ftrace.ops.registered": OpsRegisteredEvent,
    "ftrace.ops.filtered": OpsFilteredEvent,
    "ftrace.ops.unregistered": OpsUnregisteredEvent,
    "ftrace.sysctl": SysctlEvent,
    "hijack.created": HijackCreatedEvent,
    "hijack.deleted": HijackDeletedEvent,
    "profile.started": ProfileStartedEvent,
    "profile.stopped": ProfileStoppedEvent,
    "trace.started": TraceStartedEvent,
    "trace.stopped": TraceStoppedEvent,
    "ftrace.restored": FtraceRestoredEvent,
    "ftrace.restore_failed": FtraceRestoreFailedEvent,
}
"""This module's events, by type: the model of each one's ``data`` (``schemas.events.EVENTS`` includes them)."""


# -- the state section (``StateDoc.components["ftrace"]``) ------------------------------------------------------


class OpsSummary(Outbound):
    name: str
    callback: Callback
    filter: str | None
    notrace: str | None
    functions: int


class HijackSummary(Outbound):
    name: str
    mode: Literal["ipmodify", "direct"]
    function: str
    sympos: int
    target: str = Field(description="%pS of the target")


class TraceSummary(Outbound):
    session: int
    filter: str | None
    notrace: str | None
    entries_per_cpu: int


class ProfileSummary(Outbound):
    filter: str | None
    functions: int


class FtraceSection(Outbound):
    """``components.ftrace`` of the retained state: the API's ops and hijacks, the running tracer and profiler,
    kernel.ftrace_enabled and the counts of ftrace's own tables."""

    ops: list[OpsSummary]
    hijacks: list[HijackSummary]
    trace: TraceSummary | None
    profile: ProfileSummary | None
    ftrace_enabled: bool
    ops_registered: int = Field(description="every registered ftrace ops (tracers, hijacks, livepatch included)")
    enabled_functions: int
    records: int = Field(description="patchable call sites")
    restore_failed: list[FtraceRestoreFailedEvent] = Field(description="desired ops and hijacks not re-applied "
                                                           "at this boot")
