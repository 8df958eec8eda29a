"""The kprobe verbs (``kprobe.register``, ``kprobe.unregister``, ``kprobe.list``, ``kprobe.read``), their events,
their state section, and the parser of the kernel's ``kprobe_events`` syntax that the SDK and ``lpctl probe add``
accept (``p:myprobe kpt_leaf+0x8 x0 len=%x1:u64``).

A kprobe is a BRK over one instruction of a traceable kernel function: the guest's debug-exception handler runs
the built-in handlers (count; record the registers; set a register) and then either simulates the instruction
(those that read or write the PC) or steps it out of line in a slot. ``mode`` says which
(``step``, ``simulate:<class>``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator, model_validator

from schemas._base import Address, Inbound, Outbound
from schemas.envelope import Request
from schemas.spec import VerbSpec

MAX_FETCH_ARGS = 16
REGISTERS = (*(f"x{i}" for i in range(31)), "sp", "pc", "pstate")
_REG_ALIASES = {"lr": "x30", "fp": "x29"}
NAME_RE = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
ArgType = Literal["x64", "u64", "s64", "x32", "u32", "s32"]


class FetchArg(Outbound):
    """One fetch argument: a register, printed as ``name=value`` in each trace line."""

    name: str = Field(pattern=NAME_RE)
    reg: str = Field(description="x0..x30, sp, pc or pstate (the complete pt_regs of the BRK exception)")
    type: ArgType = "x64"
    offset: int | None = Field(default=None, description="a memory fetch +OFFSET(%REG): the value at reg + "
                               "offset, read in the guest at the hit (None: the register itself)")


class FetchArgIn(Inbound):
    """A fetch argument in a request (register names checked; ``lr``/``fp`` stand for x30/x29)."""

    name: str = Field(pattern=NAME_RE)
    reg: str
    type: ArgType = "x64"
    offset: int | None = Field(default=None, ge=-(1 << 31), le=(1 << 31) - 1,
                               description="+OFFSET(%REG): fetch the memory at reg + offset (base: x0-x30, sp, pc)")

    @field_validator("reg")
    @classmethod
    def _reg(cls, value: str) -> str:
        value = _REG_ALIASES.get(value, value)
        if value not in REGISTERS:
            raise ValueError(f"unknown register {value!r} (x0..x30, sp, pc, pstate, lr, fp)")
        return value

    @model_validator(mode="after")
    def _base(self) -> FetchArgIn:
        if self.offset is not None and self.reg == "pstate":
            raise ValueError("a memory fetch is based on x0-x30, sp or pc, not pstate")
        return self


@dataclass(frozen=True)
class ProbeDefinition:
    """A parsed ``kprobe_events`` line."""

    name: str
    target: str
    args: tuple[FetchArgIn, ...]


def _fetch(token: str, index: int) -> FetchArgIn:
    name, eq, spec = token.partition("=")
    if not eq:
        name, spec = f"arg{index}", token
    spec, _, type_ = spec.partition(":")
    offset = None
    mem = re.fullmatch(r"([+-])(0[xX][0-9a-fA-F]+|[0-9]+)\((.+)\)", spec)
    if mem:  # +|-OFFS(FETCHARG): one level of memory fetch
        offset = int(mem.group(2), 0) * (-1 if mem.group(1) == "-" else 1)
        spec = mem.group(3)
        if "(" in spec:
            raise ValueError("nested memory fetches (+A(+B(%reg))) are not supported")
    m = re.fullmatch(r"\$arg([1-8])", spec)
    if m:
        reg = f"x{int(m.group(1)) - 1}"
    elif spec == "$retval":
        raise ValueError("$retval is a kretprobe's fetch argument (r: probes), not a kprobe's")
    else:
        reg = spec.removeprefix("%")
    return FetchArgIn.model_validate({"name": name, "reg": reg, "type": type_ or "x64", "offset": offset})


def parse_probe_definition(text: str) -> ProbeDefinition:
    """``p[:[GRP/]EVENT] SYM[+OFFS]|0xADDR [FETCHARGS]`` (Documentation/trace/kprobetrace.rst), kprobes only.

    FETCHARG: ``%REG`` or a bare ``REG`` (x0..x30, sp, pc, pstate, lr, fp), ``$argN`` (N = 1..8: x0..x7), or
    ``+OFFS(...)`` / ``-OFFS(...)`` of one of those (the memory at it, read at the hit), each optionally ``NAME=``
    before and ``:TYPE`` (x64, u64, s64, x32, u32, s32) after. The event name defaults to
    ``p_<SYM>_<OFFS>`` as Linux's does; ValueError for anything else.
    """
    tokens = text.split()
    if len(tokens) < 2:
        raise ValueError("a probe definition is 'p[:NAME] SYMBOL[+OFFSET] [FETCHARGS]'")
    head, target, *fetch = tokens
    kind, _, event = head.partition(":")
    if kind != "p":
        raise ValueError(f"only kprobes ('p:') are supported, not {kind!r}")
    event = event.rpartition("/")[2]
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*(\+(0[xX][0-9a-fA-F]+|[0-9]+))?|0[xX][0-9a-fA-F]{1,16}", target):
        raise ValueError(f"bad probe point {target!r}: SYMBOL[+OFFSET] or 0xADDRESS")
    if not event:
        sym, _, off = target.partition("+")
        event = f"p_{sym}_{int(off, 0) if off else 0}".replace(".", "_")
    if not re.fullmatch(NAME_RE, event):
        raise ValueError(f"bad event name {event!r}")
    if len(fetch) > MAX_FETCH_ARGS:
        raise ValueError(f"at most {MAX_FETCH_ARGS} fetch arguments")
    args = tuple(_fetch(tok, i) for i, tok in enumerate(fetch, 1))
    if len({a.name for a in args}) != len(args):
        raise ValueError("fetch argument names must be unique")
    return ProbeDefinition(event, target, args)


# -- kprobe.register -------------------------------------------------------------------------------------------


class KprobeRegisterRequest(Request):
    """Register and arm a kprobe (``echo 'p:NAME SYM+OFF ...' >> kprobe_events; echo 1 > .../enable``)."""

    name: str = Field(pattern=NAME_RE)
    target: str = Field(min_length=1, max_length=200, description="SYMBOL[+OFFSET] or a 0x… address")
    args: list[FetchArgIn] = Field(default_factory=list, max_length=MAX_FETCH_ARGS,
                                   description="registers printed in each trace line (implies record)")
    record: bool = Field(default=False, description="pre handler records pt_regs into the CPU's ring (kprobe.read)")
    post: bool = Field(default=False, description="a post handler (counts post_hits; records too with record)")
    set_reg: int | None = Field(default=None, ge=0, le=30,
                                description="fault injection: the pre handler sets x<set_reg> = set_val")
    set_val: int = Field(default=0, ge=-(1 << 63), le=(1 << 64) - 1)


class KprobeInfo(Outbound):
    name: str
    address: Address
    symbol: str
    offset: int
    insn: str = Field(description="the probed instruction (hex): what the BRK replaced")
    mode: str = Field(description="step (out of line, in slot) or simulate:<class> (PC-relative, no slot)")
    slot: Address | None = None
    record: bool
    post: bool
    hits: int
    nmissed: int = Field(description="hits while another probe's handler ran on the CPU (arm64 does not nest)")
    post_hits: int
    args: list[FetchArg] = Field(default_factory=list)
    definition: str = Field(description="the probe in kprobe_events syntax")


class KprobeRegisterData(KprobeInfo):
    pass


# -- kprobe.unregister -----------------------------------------------------------------------------------------


class KprobeUnregisterRequest(Request):
    name: str = Field(pattern=NAME_RE)


class KprobeUnregisterData(Outbound):
    name: str
    hits: int
    nmissed: int


# -- kprobe.list / kprobe.read ---------------------------------------------------------------------------------


class KprobeListRequest(Request):
    """The registered kprobes with their counters, and ``kprobe_events`` / ``kprobe_profile`` as text."""


class KprobeListData(Outbound):
    probes: list[KprobeInfo]
    kprobe_events: str
    kprobe_profile: str = Field(description="'<event> <hits> <nmissed>' per probe, as tracefs prints it")


class KprobeReadRequest(Request):
    """Drain the probes' register rings: the hits recorded since the last read, as trace lines."""


class KprobeHitRecord(Outbound):
    probe: str
    cpu: int
    pid: int
    ts: int = Field(description="cntvct ticks")
    post: bool
    regs: dict[str, int]
    mem: list[int | None] = Field(default_factory=list, description="the memory fetch args' values at the hit, "
                                  "in order (null: the address was not mapped, printed (fault))")
    kind: Literal["pre", "post", "ret", "?"] = Field(
        default="pre", description="ret: a kretprobe's return (regs from its trampoline, x0 = the return value)")


class KprobeReadData(Outbound):
    text: str = Field(description="the lines the kernel's trace file prints for kprobe events")
    hits: list[KprobeHitRecord]
    lost: int = Field(description="records overwritten before they were read (ring of KPROBE_RING per CPU)")


class KprobeStreamRequest(Request):
    """Publish probe hits on the ``trace`` topic as they are drained (every 0.2 s) while enabled."""

    enable: bool


class KprobeStreamData(Outbound):
    streaming: bool
    topic: str


SPECS: list[VerbSpec] = [
    VerbSpec("kprobe.register", KprobeRegisterRequest, KprobeRegisterData,
             "Register and arm a BRK kprobe on SYMBOL+OFFSET (refused instructions and places are refused with "
             "kprobe_refused and the reason).", mutating=True),
    VerbSpec("kprobe.unregister", KprobeUnregisterRequest, KprobeUnregisterData,
             "Disarm and remove a kprobe; its slot is freed when no CPU can be in it.", mutating=True),
    VerbSpec("kprobe.list", KprobeListRequest, KprobeListData,
             "The kprobes with hits, nmissed and mode; kprobe_events and kprobe_profile text."),
    VerbSpec("kprobe.read", KprobeReadRequest, KprobeReadData,
             "Drain the recorded hits (record/args probes) as trace lines and register sets.", mutating=True),
    VerbSpec("kprobe.stream", KprobeStreamRequest, KprobeStreamData,
             "Start or stop publishing probe hits on the trace topic (TraceBatchDoc, source kprobes); kprobe.read "
             "still returns every hit once.", mutating=True),
]


# -- state section and events ----------------------------------------------------------------------------------


class KprobeState(Outbound):
    address: Address
    mode: str
    hits: int
    nmissed: int
    definition: str


class KprobesSection(Outbound):
    """``components.kprobes`` of the state document (counters as of the last change or kprobe.list)."""

    probes: dict[str, KprobeState]


class KprobeRegisteredEvent(Outbound):
    name: str
    address: Address
    mode: str


class KprobeUnregisteredEvent(Outbound):
    name: str
    hits: int
    nmissed: int


class KprobeRestoreFailedEvent(Outbound):
    name: str
    error: str


KprobeEventType = Literal["kprobe.registered", "kprobe.unregistered", "kprobe.restore_failed"]
"""Events of the kprobe verbs (on ``events``, with the daemon's own ``EventType``)."""

EVENTS: dict[str, type[Outbound]] = {"kprobe.registered": KprobeRegisteredEvent,
                                     "kprobe.unregistered": KprobeUnregisteredEvent,
                                     "kprobe.restore_failed": KprobeRestoreFailedEvent}
