"""The kernel's own verbs (``info``, ``symbol.lookup``, ``call``, ``tasks``): one request model and one reply-data
model each, and their ``SPECS`` (collected with the other subsystems' in ``schemas.catalog.VERBS``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from schemas._base import Address, HostId, Outbound
from schemas.envelope import Request
from schemas.spec import VerbSpec

MAX_CALL_ARGS = 8
I64_MIN = -(1 << 63)
U64_MAX = (1 << 64) - 1

# -- info ------------------------------------------------------------------------------------------------------


class InfoRequest(Request):
    """Kernel and daemon facts; no parameters."""


class RequestCounts(Outbound):
    accepted: int = Field(description="requests journaled since the journal was created")
    answered: int
    replayed: int = Field(description="requests re-executed at this boot after a crash")


class BrokerLink(Outbound):
    """The broker connection the daemon answers on."""

    node: str = Field(description="the node in use, host:port (of the configured broker URLs)")
    protocol: Literal["5", "3.1.1"] = Field(description="the MQTT version negotiated with that node")


class CallPolicy(Outbound):
    """Which kernel functions the call verbs (``call``, ``call.read``) run."""

    allow_any: bool = Field(description="any function (a lab setting: allow_any_call); false: only ``callable``")
    callable: list[str] = Field(description="the functions the kernel image marks callable (readers, syscall "
                                "entry points, test helpers); others are refused with call_not_allowed")


class InfoData(Outbound):
    host: HostId
    version: str = Field(description="livepatchd version")
    schema_version: int
    kernel_build_id: str
    arch: str
    nr_cpus: int
    boot_seq: int = Field(description="incremented at every daemon start; pairs status births and deaths")
    uptime_s: float
    symbols: int
    tasks: int
    requests: RequestCounts
    broker: BrokerLink | None = Field(default=None, description="the connection this reply came over")
    calls: CallPolicy | None = Field(default=None, description="what the call verbs may run")
    cpus_online: list[int] | None = Field(default=None, description="the vCPUs running; one missing from "
                                          "0..nr_cpus-1 stopped for good (a fault outside a job, BUG())")
    tlb_mode: Literal["virtual", "cpu"] | None = Field(default=None, description="the vCPUs' TLB (setting tlb_mode, "
                                                       "serve --tlb-mode): virtual or cpu (Unicorn's emulated one)")


# -- symbol.lookup ---------------------------------------------------------------------------------------------


class SymbolLookupRequest(Request):
    """By ``name`` (with ``sympos`` when the name is duplicated, as klp does), or by ``address``."""

    name: str | None = Field(default=None, min_length=1, max_length=256)
    sympos: int = Field(default=0, ge=0, le=1_000_000, description="1-based position among same-named symbols")
    address: Address | None = None

    @model_validator(mode="after")
    def _one_key(self) -> SymbolLookupRequest:
        if (self.name is None) == (self.address is None):
            raise ValueError("give exactly one of 'name' and 'address'")
        if self.address is not None and self.sympos:
            raise ValueError("'sympos' applies to a lookup by name only")
        return self


class SymbolData(Outbound):
    name: str
    sympos: int
    address: Address
    size: int
    is_func: bool
    offset: int = Field(description="address - symbol start (0 for a lookup by name)")
    description: str = Field(description="'name+0xoff/0xsize', as %pS prints it")


# -- call ------------------------------------------------------------------------------------------------------



class CallRequest(Request):
    """Run a kernel function on a vCPU (in a kworker task there) with up to 8 integer arguments."""

    function: str = Field(min_length=1, max_length=256, description="a function symbol name")
    sympos: int = Field(default=0, ge=0, le=1_000_000)
    args: list[int] = Field(default_factory=list, max_length=MAX_CALL_ARGS,
                            json_schema_extra={"items": {"type": "integer", "minimum": I64_MIN, "maximum": U64_MAX}})
    cpu: int = Field(default=0, ge=0, le=63)

    @model_validator(mode="after")
    def _arg_range(self) -> CallRequest:
        for a in self.args:
            if not I64_MIN <= a <= U64_MAX:
                raise ValueError("each argument must fit in 64 bits (signed or unsigned)")
        return self


class CallData(Outbound):
    function: str
    address: Address
    cpu: int
    value: int = Field(description="x0 on return, unsigned 64-bit")
    signed: int = Field(description="x0 on return, as a signed 64-bit value")


# -- tasks -----------------------------------------------------------------------------------------------------


class TasksRequest(Request):
    """The kernel's task list; optionally one CPU's tasks only."""

    cpu: int | None = Field(default=None, ge=0, le=63)


class TaskEntry(Outbound):
    pid: int
    cpu: int
    kind: str
    comm: str
    state: str = Field(description="'running' (current on its CPU), 'waiting' or 'runnable'")


class TasksData(Outbound):
    tasks: list[TaskEntry]


# -- the specs ------------------------------------------------------------------------------------------------


SPECS: list[VerbSpec] = [
    VerbSpec("info", InfoRequest, InfoData, "Kernel build id, CPUs, boot sequence, uptime and counts."),
    VerbSpec("symbol.lookup", SymbolLookupRequest, SymbolData,
             "Resolve a symbol name (with sympos) to its address, or an address to name+offset/size."),
    VerbSpec("call", CallRequest, CallData,
             "Call a kernel function on a vCPU with up to 8 integer arguments; returns x0.", mutating=True),
    VerbSpec("tasks", TasksRequest, TasksData, "The kernel's tasks: pid, CPU, kind, comm, state."),
]


# -- events (on ``events``: ``EventDoc.data`` of each type) ------------------------------------------------------


class CallFinishedLateEvent(Outbound):
    """``call.finished_late``: a call (or call.read) answered ``timeout`` has now returned, or died with its vCPU."""

    verb: str
    request_id: str | None
    function: str
    address: str = Field(description="the function's address, hex")
    cpu: int
    elapsed_s: float = Field(description="since the call started")
    ok: bool
    value: int | None = Field(default=None, description="x0 on return, unsigned 64-bit (ok only)")
    signed: int | None = Field(default=None, description="x0 as a signed 64-bit value (ok only)")
    code: str | None = Field(default=None, description="why it failed (not ok only)")
    message: str | None = None


KernelEventType = Literal["call.finished_late"]
"""Events of the kernel's verbs (on ``events``, with the daemon's own ``EventType``)."""

EVENTS: dict[str, type[Outbound]] = {"call.finished_late": CallFinishedLateEvent}
"""This module's events, by type: the model of each one's ``data`` (``schemas.events.EVENTS`` includes them)."""
