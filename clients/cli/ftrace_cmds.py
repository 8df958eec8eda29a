"""lpctl commands of the ftrace verbs (installed on the app by clients.cli.main).

=====================================================  =============================================================
command                                                verb
=====================================================  =============================================================
``lpctl ftrace ops list``                              ftrace.ops.list
``lpctl ftrace ops register NAME [-f F] [-n N]``       ftrace.ops.register (``--callback count|nop``, ``--recursion``)
``lpctl ftrace ops unregister NAME``                   ftrace.ops.unregister
``lpctl ftrace ops filter NAME [-f F] [-n N] [--add]`` ftrace.ops.filter
``lpctl ftrace available [PATTERN]``                   ftrace.available_filter_functions (every page)
``lpctl ftrace enabled [--touched]``                   ftrace.enabled_functions (every page)
``lpctl ftrace sysctl [0|1]``                          ftrace.sysctl: read or set kernel.ftrace_enabled
``lpctl trace start [FILTER] [-n N] [--graph]``        trace.start (``--graph``: the function_graph tracer, with
                                                      ``--graph-function`` / ``--graph-notrace``)
``lpctl trace read`` / ``lpctl trace stop``            trace.read / trace.stop: trace lines on stdout
``lpctl trace follow [--count N]``                     the trace topic: lines as they are published, until Ctrl-C
``lpctl hijack create FUNCTION TARGET [--direct]``     hijack.create
``lpctl hijack delete NAME`` / ``--function F``        hijack.delete
``lpctl hijack list``                                  hijack.list
=====================================================  =============================================================

Text output is the kernel's where there is one (available_filter_functions, enabled_functions, trace lines);
``--json`` prints the daemon's reply exactly (for the paged views: one page, ``--offset``/``--limit``; for
``trace follow``: each published batch, one JSON document per line). Exit codes are lpctl's.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import Annotated, Protocol, TypeVar, cast

import typer
from rich.table import Table

from clients.cli.runner import EXIT_USAGE, Options, call_verb, err, fail, follow, out
from clients.sdk import LivepatchClient
from schemas.ftrace import (
    MAX_PAGE,
    AvailableData,
    BatchInfo,
    Callback,
    EnabledData,
    HijackListData,
    OpsData,
    OpsInfo,
    OpsListData,
    SysctlData,
    TraceBatchDoc,
    TraceReadData,
    TraceStartData,
    TraceStopData,
)


class _Page(Protocol):
    @property
    def next_offset(self) -> int | None: ...


P = TypeVar("P", bound=_Page)

ftrace_app = typer.Typer(no_args_is_help=True, help="ftrace: ops with filters, available and enabled functions.")
ops_app = typer.Typer(no_args_is_help=True, help="ftrace ops: a guest callback (count or nop) on filtered functions.")
trace_app = typer.Typer(no_args_is_help=True, help="The function tracer: start, read, stop, follow its stream.")
hijack_app = typer.Typer(no_args_is_help=True, help="Redirect a function to another one (IPMODIFY), or send its "
                         "calls through a direct trampoline.")
ftrace_app.add_typer(ops_app, name="ops")

FilterOpt = Annotated[str | None, typer.Option("--filter", "-f", help="set_ftrace_filter syntax: names, globs, "
                                               "0x addresses, !term; '' means every function")]
NotraceOpt = Annotated[str | None, typer.Option("--notrace", "-n", help="functions to leave out (same syntax)")]
LimitOpt = Annotated[int, typer.Option(min=1, max=MAX_PAGE, help="at most this many records")]


def install(app: typer.Typer) -> None:
    """Add this module's commands (and sub-apps) to lpctl."""
    app.add_typer(ftrace_app, name="ftrace")
    app.add_typer(trace_app, name="trace")
    app.add_typer(hijack_app, name="hijack")


def _batch(batch: BatchInfo | None) -> str:
    if batch is None:
        return "no text changed"
    return f"{batch.sites} sites, {batch.data} words in one stop-machine batch ({batch.pause_us:.0f} µs pause)"


def _functions(n: int) -> str:
    return f"{n} function{'' if n == 1 else 's'}"


# -- ftrace ops ----------------------------------------------------------------------------------------------------


def _ops_table(ops: list[OpsInfo]) -> Table:
    table = Table("name", "callback", "functions", "hits", "flags", "filter", "notrace")
    for o in ops:
        table.add_row(o.name, o.callback, str(o.functions), str(o.hits), " ".join(o.flags), o.filter or "(all)",
                      o.notrace or "")
    return table


@ops_app.command("list")
def ops_list(ctx: typer.Context) -> None:
    """The ops registered through the API, with their hits; other owners (tracer, hijacks, patches) by name."""
    data: OpsListData = call_verb(ctx, lambda c: c.ops_list())
    console = out()
    console.print(_ops_table(data.ops) if data.ops else "no ops registered through the API")
    if data.others:
        console.print("other ops: " + ", ".join(f"{o.name} ({_functions(o.functions)})" for o in data.others))


@ops_app.command("register")
def ops_register(ctx: typer.Context,
                 name: Annotated[str, typer.Argument(help="a unique name: a-z, 0-9, '_', '.', '-'")], *,
                 filter_: FilterOpt = None, notrace: NotraceOpt = None,
                 callback: Annotated[str, typer.Option(help="count (ops_func_count) or nop (ops_func_nop)")] = "count",
                 recursion: Annotated[bool, typer.Option(help="FTRACE_OPS_FL_RECURSION")] = False) -> None:
    """Register an ops whose guest callback counts (or ignores) each call of the functions it covers."""
    data: OpsData = call_verb(ctx, lambda c: c.ops_register(name, filter=filter_, notrace=notrace,
                                                           callback=cast(Callback, callback), recursion=recursion))
    address = f" (struct ftrace_ops at {data.ops.address:#x})" if data.ops.address else ""
    out().print(f"registered ops {name}: {_functions(data.ops.functions)}{address}; {_batch(data.batch)}")


@ops_app.command("unregister")
def ops_unregister(ctx: typer.Context, name: Annotated[str, typer.Argument(help="the ops' name")]) -> None:
    """Unregister an ops; prints the calls it counted."""
    data: OpsData = call_verb(ctx, lambda c: c.ops_unregister(name))
    out().print(f"unregistered ops {name} after {data.ops.hits} hits; {_batch(data.batch)}")


@ops_app.command("filter")
def ops_filter(ctx: typer.Context, name: Annotated[str, typer.Argument(help="the ops' name")],
               filter_: FilterOpt = None, notrace: NotraceOpt = None,
               add: Annotated[bool, typer.Option("--add", help="add to the current sets (>>) instead of replacing "
                                                 "them (>)")] = False) -> None:
    """Change the filter and/or notrace set of a registered ops."""
    if filter_ is None and notrace is None:
        fail(EXIT_USAGE, "nothing to change", "give --filter, --notrace or both ('' resets to every function)")
    data: OpsData = call_verb(ctx, lambda c: c.ops_filter(name, filter=filter_, notrace=notrace, reset=not add))
    o = data.ops
    out().print(f"ops {name}: {_functions(o.functions)} (filter {o.filter or '(all)'}, notrace {o.notrace or '-'}); "
                f"{_batch(data.batch)}")


# -- tracefs views ---------------------------------------------------------------------------------------------


def _paged(ctx: typer.Context, page: Callable[[LivepatchClient, int | None, int | None], Awaitable[P]], *,
           offset: int | None, limit: int | None) -> list[P]:
    """With --json, or with --offset/--limit: one page (its reply printed as is); else every page.
    ``page(client, offset, limit)`` asks for one (None: the verb's default)."""
    opts: Options = ctx.obj
    if opts.json or offset is not None or limit is not None:
        return [call_verb(ctx, lambda c: page(c, offset, limit))]
    pages: list[P] = []
    next_offset: int | None = 0
    while next_offset is not None:
        at = next_offset

        def one(c: LivepatchClient, at: int = at) -> Awaitable[P]:
            return page(c, at, MAX_PAGE)
        data = call_verb(ctx, one)
        pages.append(data)
        next_offset = data.next_offset
    return pages


@ftrace_app.command("available")
def available(ctx: typer.Context,
              pattern: Annotated[str | None, typer.Argument(help="a glob on the name ('work_*')")] = None,
              offset: Annotated[int | None, typer.Option(min=0, help="first name of the page")] = None,
              limit: Annotated[int | None, typer.Option(min=1, max=MAX_PAGE, help="names in the page")] = None) -> None:
    """available_filter_functions: the traceable functions, one per line (every page unless --offset/--limit)."""
    pages: list[AvailableData] = _paged(
        ctx, lambda c, at, size: c.available_filter_functions(pattern, offset=at or 0, limit=size or 1000),
        offset=offset, limit=limit)
    sys.stdout.write("".join(f"{name}\n" for p in pages for name in p.functions))
    if pages and pages[-1].next_offset is not None:
        err().print(f"[dim]{pages[-1].total} in all; next page: --offset {pages[-1].next_offset}[/]")


@ftrace_app.command("enabled")
def enabled(ctx: typer.Context,
            touched: Annotated[bool, typer.Option(help="touched_functions: every function ever attached")] = False,
            offset: Annotated[int | None, typer.Option(min=0, help="first record of the page")] = None,
            limit: Annotated[int | None, typer.Option(min=1, max=MAX_PAGE, help="records in the page")] = None) -> None:
    """enabled_functions, exactly as tracefs prints it."""
    pages: list[EnabledData] = _paged(
        ctx, lambda c, at, size: c.enabled_functions(touched=touched, offset=at or 0, limit=size or MAX_PAGE),
        offset=offset, limit=limit)
    sys.stdout.write("".join(p.text for p in pages))


@ftrace_app.command("sysctl")
def sysctl(ctx: typer.Context,
           value: Annotated[int | None, typer.Argument(min=0, max=1, help="kernel.ftrace_enabled: 0 turns every traced "
                                                       "call site off, 1 back on; omitted: print it")] = None) -> None:
    """Read or set kernel.ftrace_enabled (refused with ftrace_busy while a live patch is enabled)."""
    data: SysctlData = call_verb(ctx, lambda c: c.ftrace_sysctl(None if value is None else bool(value)))
    note = f"  ({data.sites} call sites rewritten)" if data.changed else ""
    out().print(f"kernel.ftrace_enabled = {int(data.ftrace_enabled)}{note}")


# -- the function tracer -----------------------------------------------------------------------------------------


@trace_app.command("start")
def trace_start(ctx: typer.Context,
                filter_: Annotated[str | None, typer.Argument(
                    metavar="FILTER", help="set_ftrace_filter syntax; omitted: every function")] = None, *,
                notrace: NotraceOpt = None,
                entries: Annotated[int | None, typer.Option(min=2, help="ring entries per CPU (a power of two)")]
                = None,
                graph: Annotated[bool, typer.Option("--graph", help="function_graph: entries and returns, nested, "
                                                     "with durations")] = False,
                graph_function: Annotated[str | None, typer.Option(
                    "--graph-function", help="with --graph, set_graph_function: record only what runs inside these "
                    "functions")] = None,
                graph_notrace: Annotated[str | None, typer.Option(
                    "--graph-notrace", help="with --graph, set_graph_notrace: leave out these functions and what "
                    "they call")] = None) -> None:
    """Start the function tracer (or, --graph, the function_graph tracer)."""
    if not graph and (graph_function is not None or graph_notrace is not None):
        fail(EXIT_USAGE, "--graph-function and --graph-notrace need --graph", "add --graph (function_graph)")
    data: TraceStartData = call_verb(ctx, lambda c: c.trace_start(
        filter_, notrace=notrace, entries_per_cpu=entries, tracer="function_graph" if graph else "function",
        graph_function=graph_function, graph_notrace=graph_notrace))
    stream = f"; batches on {data.topic} (lpctl trace follow)" if data.streaming else ""
    within = "".join(f", {label} {expr!r}" for label, expr in (("inside", data.graph_function),
                                                                ("not under", data.graph_notrace)) if expr)
    out().print(f"{data.tracer}: tracing {_functions(data.functions)}{within}, {data.entries_per_cpu} entries per "
                f"CPU{stream}")


def _print_records(data: TraceReadData) -> None:
    sys.stdout.write("".join(f"{line}\n" for line in data.lines))
    lost = f", {data.dropped} dropped (ring full)" if data.dropped else ""
    lost += f", {data.overrun} overrun (not read in time)" if data.overrun else ""
    more = f", {data.remaining} more to read" if data.remaining else ""
    err().print(f"[dim]# {len(data.lines)} records; {data.written} written{lost}{more}[/]")


@trace_app.command("read")
def trace_read(ctx: typer.Context, limit: LimitOpt = MAX_PAGE) -> None:
    """Print the trace lines recorded since the last read (like reading trace_pipe)."""
    _print_records(call_verb(ctx, lambda c: c.trace_read(limit=limit)))


@trace_app.command("stop")
def trace_stop(ctx: typer.Context, limit: LimitOpt = MAX_PAGE) -> None:
    """Stop the function tracer and print the lines not read yet."""
    data: TraceStopData = call_verb(ctx, lambda c: c.trace_stop(limit=limit))
    _print_records(data)
    if data.discarded:
        err().print(f"[dim]# {data.discarded} unread records beyond --limit were discarded[/]")


@trace_app.command("follow")
def trace_follow(ctx: typer.Context,
                 count: Annotated[int | None, typer.Option(min=1, help="stop after this many lines")] = None,
                 seconds: Annotated[float | None, typer.Option(min=0.01, help="stop after this long")] = None) -> None:
    """Print trace lines as the daemon publishes them (while the tracer runs), until Ctrl-C."""
    opts: Options = ctx.obj

    def subscribed() -> None:
        err().print(f"[dim]following the trace of {opts.host} (Ctrl-C to stop)[/]")

    def show(batch: TraceBatchDoc, left: int | None) -> int:
        if opts.json:
            sys.stdout.write(batch.model_dump_json() + "\n")
            return len(batch.lines)
        lines = batch.lines if left is None else batch.lines[:left]
        sys.stdout.write("".join(f"{line}\n" for line in lines))
        return len(lines)

    follow(opts, lambda c: c.trace_batches(subscribed=subscribed), show, count=count, seconds=seconds)


# -- hijacks -------------------------------------------------------------------------------------------------------


@hijack_app.command("create")
def hijack_create(ctx: typer.Context,
                  function: Annotated[str, typer.Argument(help="the function whose calls are redirected")],
                  target: Annotated[str, typer.Argument(help="the function to run instead (name or 0x address); "
                                                         "with --direct, my_tramp or ftrace_stub_direct_tramp")],
                  *,
                  direct: Annotated[bool, typer.Option("--direct", help="a direct call through trampoline TARGET "
                                                       "instead of an IPMODIFY redirect")] = False,
                  name: Annotated[str | None, typer.Option(help="the hijack's name (default: FUNCTION)")] = None,
                  sympos: Annotated[int, typer.Option(min=0, help="which same-named FUNCTION (1-based)")] = 0,
                  target_sympos: Annotated[int, typer.Option(min=0, help="which same-named TARGET")] = 0) -> None:
    """Redirect FUNCTION to TARGET: its callers get TARGET's result (same arguments, same return)."""
    h = call_verb(ctx, lambda c: c.hijack_create(function, target, mode="direct" if direct else "ipmodify", name=name,
                                                 sympos=sympos, target_sympos=target_sympos)).hijack
    how = "calls go through" if h.mode == "direct" else "now runs"
    out().print(f"hijack {h.name}: {h.function} {how} {h.target} ({h.target_address:#x})")


@hijack_app.command("delete")
def hijack_delete(ctx: typer.Context,
                  name: Annotated[str | None, typer.Argument(help="the hijack's name")] = None,
                  function: Annotated[str | None, typer.Option(help="the hijacked function instead of NAME")] = None,
                  sympos: Annotated[int, typer.Option(min=0, help="which same-named FUNCTION (1-based)")] = 0) -> None:
    """Remove a hijack: the function runs its own code again."""
    if (name is None) == (function is None):
        fail(EXIT_USAGE, "give the hijack's NAME or --function (not both)", "lpctl hijack list shows them")
    h = call_verb(ctx, lambda c: c.hijack_delete(name, function=function, sympos=sympos)).hijack
    out().print(f"hijack {h.name} removed: {h.function} runs its own code again")


@hijack_app.command("list")
def hijack_list(ctx: typer.Context) -> None:
    """The hijacks in place."""
    data: HijackListData = call_verb(ctx, lambda c: c.hijack_list())
    if not data.hijacks:
        out().print("no hijacks")
        return
    table = Table("name", "mode", "function", "target", "ops")
    for h in data.hijacks:
        table.add_row(h.name, h.mode, h.function if not h.sympos else f"{h.function} (sympos {h.sympos})", h.target,
                      h.ops)
    out().print(table)
