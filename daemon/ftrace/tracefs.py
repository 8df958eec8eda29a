"""tracefs views, in the kernel's text formats (kernel-mechanics §5.5), so that tools and eyes used to
/sys/kernel/tracing read them unchanged.

=============================  ===================================================================
file                           function
=============================  ===================================================================
available_filter_functions     :func:`available_filter_functions`
enabled_functions              :func:`enabled_functions` (records with a BL, with flags and ops)
touched_functions              :func:`enabled_functions` with ``touched=True``
trace                          :func:`trace` (the function tracer's format, irq-info header)
trace (function_graph)         :func:`function_graph` (CPU, duration with overhead mark, nested calls)
trace_stat/function<cpu>       :func:`function_stat` (function profiler, without graph times)
=============================  ===================================================================
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from daemon.ftrace.core import Ftrace
from daemon.ftrace.fgraph import GraphRecord
from daemon.ftrace.records import DynFtrace, RecFlag
from daemon.ftrace.tracer import ProfileLine, TraceRecord
from daemon.guest import abi


def available_filter_functions(ftrace: Ftrace) -> str:
    """One ``%ps`` per record, in address order (duplicates appear once per definition, as in Linux)."""
    return "".join(f"{ftrace.name_of(r)}\n" for r in ftrace.records)


def _flags(rec: DynFtrace) -> str:
    f = rec.flags
    return (f" ({rec.count})"
            f"{' R' if f & RecFlag.REGS else '  '}"
            f"{' I' if f & RecFlag.IPMODIFY else '  '}"
            f"{' D' if f & RecFlag.DIRECT else '  '}"
            f"{' O' if f & RecFlag.CALL_OPS else '  '}"
            f"{' M ' if f & RecFlag.MODIFIED else '   '}")


def enabled_line(ftrace: Ftrace, rec: DynFtrace) -> str:
    """A record's line: name, (count) and R/I/D/O/M flags, the ``ops:`` of a CALL_OPS site, ``direct-->``."""
    line = ftrace.name_of(rec) + _flags(rec)
    if rec.flags & RecFlag.CALL_OPS_EN:
        ops = ftrace.unique_ops(rec)
        line += (f"\tops: {ftrace.describe(ops.addr)} ({ftrace.describe(ftrace.kernel.resolve(ops.func))})"
                 if ops is not None else "\tops: ERROR!")
    if rec.flags & RecFlag.DIRECT:
        direct = ftrace.direct_of(rec)
        if direct:
            line += f"\n\tdirect-->{ftrace.describe(direct)}"
    return line + "\n"


def enabled_functions(ftrace: Ftrace, *, touched: bool = False) -> str:
    """enabled_functions (records whose site calls), or touched_functions (ever attached since boot)."""
    want = RecFlag.TOUCHED if touched else RecFlag.ENABLED
    with ftrace.lock:
        return "".join(enabled_line(ftrace, r) for r in ftrace.records if r.flags & want)


_TRACE_HEADER = """\
# tracer: function
#
# entries-in-buffer/entries-written: {shown}/{written}   #P:{ncpus}
#
#                                _-----=> irqs-off/BH-disabled
#                               / _----=> need-resched
#                              | / _---=> hardirq/softirq
#                              || / _--=> preempt-depth
#                              ||| / _-=> migrate-disable
#                              |||| /     delay
#           TASK-PID     CPU#  |||||  TIMESTAMP  FUNCTION
#              | |         |   |||||     |         |
"""


def trace_line(ftrace: Ftrace, rec: TraceRecord, comms: dict[int, str]) -> str:
    """``comm-pid [cpu] flags secs.usecs: func <-parent`` exactly as the function tracer prints it."""
    usecs = rec.ts * 1_000_000 // abi.CNTFRQ_HZ
    secs, rem = divmod(usecs, 1_000_000)
    func = ftrace.symbol_name(rec.ip)
    parent = ftrace.symbol_name(rec.parent_ip)
    comm = comms.get(rec.pid, "<...>")
    return f"{comm:>16}-{rec.pid:<7d} [{rec.cpu:03d}] ..... {secs:5d}.{rem:06d}: {func} <-{parent}\n"


def trace(ftrace: Ftrace, records: Sequence[TraceRecord], *, written: int | None = None) -> str:
    """The ``trace`` file for drained records (``written``: entries written, counting dropped ones)."""
    comms = {t.pid: t.comm for t in ftrace.kernel.tasks()}
    head = _TRACE_HEADER.format(shown=len(records), written=len(records) if written is None else written,
                                ncpus=ftrace.kernel.config.nr_cpus)
    return head + "".join(trace_line(ftrace, r, comms) for r in records)


def function_stat(lines: Iterable[ProfileLine]) -> str:
    """trace_stat/function*: the profiler's table without graph times (the profiler does not use fgraph)."""
    out = ["  Function                               Hit\n", "  --------                               ---\n"]
    out += [f"  {line.name[:30]:<30}  {line.hits:10d}\n" for line in lines]
    return "".join(out)


_GRAPH_HEADER = """\
# tracer: function_graph
#
# CPU  DURATION                  FUNCTION CALLS
# |     |   |                     |   |   |   |
"""

# The overhead mark before a duration: the first threshold (ns) the duration exceeds
_MARKS = ((1_000_000_000, "$"), (100_000_000, "@"), (10_000_000, "*"), (1_000_000, "#"), (100_000, "!"),
          (10_000, "+"))


def graph_duration(ns: int) -> str:
    """The duration column: ``mark usecs.nsecs us`` padded to a fixed width (at most 7 digits in all)."""
    mark = next((sym for limit, sym in _MARKS if ns > limit), " ")
    usecs = str(ns // 1000)
    text = usecs
    if len(usecs) < 7:
        text += "." + f"{ns % 1000:03d}"[: 7 - len(usecs)]
    return f"{mark} {text} us " + " " * max(0, 8 - len(text))


_NO_DURATION = " " * 14  # mark, space and the duration's width


def _task_label(pid: int, comms: dict[int, str]) -> str:
    return f"{comms.get(pid, '<...>')[:7]}-{pid}".center(8)


@dataclass(frozen=True)
class GraphLine:
    """One line of function_graph output: a leaf ``call`` (an entry and its return), an ``entry`` that opens
    a brace, or a ``return`` that closes one. ``separator``: the task-switch banner printed before it."""

    text: str
    kind: Literal["call", "entry", "return"]
    record: GraphRecord
    duration_ns: int | None
    separator: str | None = None


class GraphPrinter:
    """function_graph output, fed in chunks (drains) with its state kept between them: the braces still open
    per task and the task last seen per CPU. Within a chunk, an entry whose return is the next event on its
    CPU is one leaf line; an entry at the end of a chunk opens a brace its return closes later."""

    def __init__(self, ftrace: Ftrace) -> None:
        self.ftrace = ftrace
        self.width = len(str(ftrace.kernel.config.nr_cpus - 1))
        self.comms = {t.pid: t.comm for t in ftrace.kernel.tasks()}
        self.open_calls: dict[int, list[tuple[int, int]]] = {}  # pid -> (ip, depth) of entries printed with "{"
        self.task_on: dict[int, int] = {}

    def feed(self, records: Sequence[GraphRecord]) -> list[GraphLine]:
        following: dict[int, int] = {}  # index -> index of the next event on the same CPU
        last: dict[int, int] = {}
        for i in range(len(records) - 1, -1, -1):
            if records[i].cpu in last:
                following[i] = last[records[i].cpu]
            last[records[i].cpu] = i
        skip: set[int] = set()
        out: list[GraphLine] = []
        for i, r in enumerate(records):
            if i in skip:
                continue
            cpu = f" {r.cpu:>{self.width}d}) "
            prev = self.task_on.get(r.cpu)
            banner = None
            if prev is not None and prev != r.pid:
                banner = (f" ------------------------------------------\n{cpu}{_task_label(prev, self.comms)} => "
                          f"{_task_label(r.pid, self.comms)}\n ------------------------------------------\n\n")
            self.task_on[r.cpu] = r.pid
            indent = "  " * r.depth
            name = self.ftrace.symbol_name(r.ip)
            if r.entry:
                j = following.get(i)
                ret = records[j] if j is not None else None
                if ret is not None and not ret.entry and (ret.pid, ret.ip, ret.depth) == (r.pid, r.ip, r.depth):
                    skip.add(j)  # type: ignore[arg-type]
                    out.append(GraphLine(f"{cpu}{graph_duration(ret.duration_ns)}|  {indent}{name}();\n", "call",
                                         r, ret.duration_ns, banner))
                else:
                    self.open_calls.setdefault(r.pid, []).append((r.ip, r.depth))
                    out.append(GraphLine(f"{cpu}{_NO_DURATION}|  {indent}{name}() {{\n", "entry", r, None, banner))
                continue
            stack = self.open_calls.get(r.pid, [])
            matched = bool(stack) and stack[-1] == (r.ip, r.depth)
            if matched:
                stack.pop()
            tail = "" if matched else f" /* {name} */"
            out.append(GraphLine(f"{cpu}{graph_duration(r.duration_ns)}|  {indent}}}{tail}\n", "return", r,
                                 r.duration_ns, banner))
        return out


def function_graph(ftrace: Ftrace, records: Sequence[GraphRecord]) -> str:
    """The function_graph ``trace`` file: a call whose return is the next event on its CPU is one leaf line
    (``func();`` with its duration); others open with ``func() {`` and close with ``}`` and the duration
    (``} /* func */`` when the entry was not seen). A CPU switching tasks gets a separator, as in the kernel.
    """
    lines = GraphPrinter(ftrace).feed(records)
    return _GRAPH_HEADER + "".join((line.separator or "") + line.text for line in lines)
