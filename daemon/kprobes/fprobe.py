"""fprobe: entry and exit probes on many functions at once, on ftrace (kernel/trace/fprobe.c).

One fprobe is one ``ftrace_ops`` whose callback is the guest's ``fprobe_entry`` and whose private data is a
``fprobe_table`` entry; its filter is a set_ftrace_filter glob (``work_step_*``, ``kpt_leaf kpt_calls``).
With an exit handler, the entry pushes a ``ret_stack`` entry tagged with the fprobe and swaps ``fregs->lr``
for ``return_to_handler``, whose C half hands the saved return values to ``fprobe_exit``: the function-graph
return machinery, as fprobe rides on fgraph since Linux 6.14.

Handlers see the ARGS only: x0-x7, sp and lr at entry, x0 at exit. arm64's ftrace has no pt_regs to give
(DYNAMIC_FTRACE_WITH_ARGS), so an fprobe asking for ``save_regs`` (FTRACE_OPS_FL_SAVE_REGS) is refused
with -EINVAL by ftrace itself, and ``save_regs_if_supported`` is accepted and gets ftrace_regs like the rest.

An unregistered fprobe's table entry is reused only when no task's ret_stack still holds a return it hooked;
such a return goes back to its caller without the exit handler.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Literal

from daemon.errors import FtraceError, KprobeExists, KprobeNoSpace, KprobeNotFound, KprobeRefused
from daemon.ftrace.core import Ftrace
from daemon.ftrace.ops import FtraceOps, OpsFlag
from daemon.guest import abi

FlagName = Literal["save_regs", "save_regs_if_supported"]
FLAG_NAMES: dict[FlagName, OpsFlag] = {"save_regs": OpsFlag.SAVE_REGS,
                                       "save_regs_if_supported": OpsFlag.SAVE_REGS_IF_SUPPORTED}


@dataclass
class Fprobe:
    name: str
    filter: str
    index: int
    ops: FtraceOps
    exit: bool
    record: bool
    flags: tuple[FlagName, ...]

    @property
    def functions(self) -> int:
        return len(self.ops.filter or ())


@dataclass(frozen=True)
class FprobeHit:
    """One fprobe record: the args at entry, or the return value at exit; ``ret`` is the return address."""

    probe: str
    cpu: int
    pid: int
    ts: int
    exit: bool
    ip: int
    ret: int
    args: tuple[int, ...]
    sp: int
    lr: int
    retval: int
    duration: int


class Fprobes:
    """The fprobes of one kernel, on its :class:`Ftrace`."""

    def __init__(self, ftrace: Ftrace) -> None:
        self.ftrace = ftrace
        self.kernel = ftrace.kernel
        self.memory = self.kernel.memory
        self.table = self.kernel.kallsyms.addr("fprobe_table")
        self.ctlblk = self.kernel.kallsyms.addr("fprobe_ctlblk")
        self._lock = threading.Lock()
        self._probes: dict[str, Fprobe] = {}
        self._ring_seen = [0] * abi.MAX_CPUS
        self.ring_lost = 0

    def _entry(self, index: int) -> int:
        return self.table + index * abi.fprobe.size

    def register(self, name: str, filter: str, *, exit: bool = True, record: bool = False,
                 flags: tuple[str, ...] = ()) -> Fprobe:
        """``flags``: FLAG_NAMES (``save_regs`` is refused by ftrace with -EINVAL)."""
        if not name or not name.replace("_", "").isalnum():
            raise KprobeRefused(f"bad probe name {name!r}", reason="bad name")
        bad = [f for f in flags if f not in FLAG_NAMES]
        if bad:
            raise KprobeRefused(f"unknown fprobe flag {bad[0]!r} (known: {', '.join(FLAG_NAMES)})",
                                reason="bad flag")
        ips = self.ftrace.select(filter)
        if not ips:
            raise KprobeNotFound(f"no traceable function matches {filter!r}", probe=name, filter=filter)
        names: tuple[FlagName, ...] = tuple(f for f in FLAG_NAMES if f in flags)
        ops_flags = OpsFlag(0)
        for f in names:
            ops_flags |= FLAG_NAMES[f]
        with self._lock:
            if name in self._probes:
                raise KprobeExists(f"fprobe {name!r} exists", probe=name)
            index = self._free_index()
            e = self._entry(index)
            fp_flags = abi.FPF_ARMED | (abi.FPF_EXIT if exit else 0) | (abi.FPF_RECORD if record else 0)
            self.memory.write_u64(e + abi.fprobe.offsetof("index"), index)
            for counter in ("hits", "exit_hits", "nmissed"):
                for cpu in range(abi.MAX_CPUS):
                    self.memory.write_u64(e + abi.fprobe.offsetof(counter) + 8 * cpu, 0)
            self.memory.write_u64(e + abi.fprobe.offsetof("flags"), fp_flags)
            ops = FtraceOps(f"fprobe:{name}", func="fprobe_entry", flags=ops_flags, filter=ips, private=e)
            try:
                self.ftrace.register(ops)
            except FtraceError:
                self.memory.write_u64(e + abi.fprobe.offsetof("flags"), 0)
                raise
            p = Fprobe(name, filter, index, ops, exit, record, names)
            self._probes[name] = p
            return p

    def unregister(self, name: str) -> Fprobe:
        with self._lock:
            p = self._probes.get(name)
            if p is None:
                raise KprobeNotFound(f"no fprobe {name!r}", probe=name)
            self.ftrace.unregister(p.ops)  # stop-machine: no CPU is in fprobe_entry for it from here on
            self.memory.write_u64(self._entry(p.index) + abi.fprobe.offsetof("flags"), 0)
            del self._probes[name]
            return p

    def _hooked(self) -> set[int]:
        """fprobe_table entries a task's ret_stack still names (returns hooked and not yet taken)."""
        rs = abi.ftrace_ret_stack
        out: set[int] = set()
        for i in range(self.kernel.boot_params.get("nr_tasks")):
            t = self.kernel.task(i)
            base = t.addr + abi.task_struct.offsetof("ret_stack")
            for d in range(min(t.get("curr_ret_stack"), abi.FTRACE_RETFUNC_DEPTH)):
                a = self.memory.read_u64(base + d * rs.size + rs.offsetof("fprobe"))
                if a:
                    out.add(a)
        return out

    def _free_index(self) -> int:
        used = {p.index for p in self._probes.values()}
        hooked = self._hooked()
        for i in range(abi.FPROBE_MAX):
            if i not in used and self._entry(i) not in hooked:
                return i
        raise KprobeNoSpace(f"at most {abi.FPROBE_MAX} fprobes", limit=abi.FPROBE_MAX)

    # -- state -----------------------------------------------------------------------------------------------

    def find(self, name: str) -> Fprobe | None:
        return self._probes.get(name)

    def get(self, name: str) -> Fprobe:
        p = self._probes.get(name)
        if p is None:
            raise KprobeNotFound(f"no fprobe {name!r}", probe=name)
        return p

    def counter(self, p: Fprobe, name: str) -> int:
        base = self._entry(p.index) + abi.fprobe.offsetof(name)
        return sum(self.memory.read_u64(base + 8 * cpu) for cpu in range(self.kernel.config.nr_cpus))

    def info(self, p: Fprobe) -> dict[str, Any]:
        return {"name": p.name, "filter": p.filter, "functions": p.functions, "exit": p.exit, "record": p.record,
                "flags": list(p.flags), "hits": self.counter(p, "hits"), "exit_hits": self.counter(p, "exit_hits"),
                "nmissed": self.counter(p, "nmissed")}

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            return [self.info(p) for p in sorted(self._probes.values(), key=lambda q: q.name)]

    def drain(self) -> list[FprobeHit]:
        """Records written since the last drain (oldest lost past FPROBE_RING per CPU: ``ring_lost``)."""
        by_index = {p.index: p.name for p in self._probes.values()}
        cb, tr = abi.fprobe_ctlblk, abi.fprobe_trace
        out: list[FprobeHit] = []
        for cpu in range(self.kernel.config.nr_cpus):
            base = self.ctlblk + cpu * cb.size
            head = self.memory.read_u64(base + cb.offsetof("head"))
            first = max(self._ring_seen[cpu], head - abi.FPROBE_RING)
            self.ring_lost += first - self._ring_seen[cpu]
            for seq in range(first, head):
                e = base + cb.offsetof("ring") + (seq % abi.FPROBE_RING) * tr.size
                r = self.memory.read(e, tr.size)
                w = [int.from_bytes(r[i:i + 8], "little") for i in range(0, tr.size, 8)]
                f = {name: w[tr.offsetof(name) // 8] for name in ("ts", "probe", "pid", "exit", "ip", "ret", "sp",
                                                                   "lr", "retval", "duration")}
                a0 = tr.offsetof("args") // 8
                out.append(FprobeHit(by_index.get(f["probe"], "?"), cpu, f["pid"], f["ts"], bool(f["exit"]),
                                     f["ip"], f["ret"], tuple(w[a0:a0 + 8]), f["sp"], f["lr"], f["retval"],
                                     f["duration"]))
            self._ring_seen[cpu] = head
        out.sort(key=lambda h: h.ts)
        return out
