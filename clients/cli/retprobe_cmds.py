"""``lpctl kretprobe`` and ``lpctl fprobe``: return probes and function entry/exit probes, in the kernel's
dynamic-event syntax.

=========================================================================  =============================================
``lpctl kretprobe add 'r[N]:NAME SYM' [--trampoline brk|rethook]``         kretprobe.register (N: maxactive per CPU)
``lpctl kretprobe del NAME`` / ``lpctl kretprobe list``                    kretprobe.unregister / kretprobe.list
``lpctl fprobe add 'f:NAME GLOB[,GLOB][%return]' [--flag save_regs…]``     fprobe.register (%return: an exit handler)
``lpctl fprobe del NAME`` / ``list`` / ``read``                            fprobe.unregister / .list / .read
=========================================================================  =============================================

A kretprobe's return records are read with ``lpctl probe read`` (one trace for kprobe events, as in tracefs).
"""

from __future__ import annotations

from typing import Annotated

import typer

from clients.cli.runner import call_verb, err, out
from schemas.retprobes import (
    FprobeListData,
    FprobeReadData,
    FprobeRegisterData,
    KretprobeListData,
    KretprobeRegisterData,
    parse_retprobe_definition,
)

kretprobe_app = typer.Typer(no_args_is_help=True, help="kretprobes: return probes through a hijacked return "
                            "address (kprobe_events 'r:' syntax).")
fprobe_app = typer.Typer(no_args_is_help=True, help="fprobes: entry/exit probes on ftrace, arguments only "
                         "(fprobe_events 'f:' syntax, globs).")


def _parse(definition: str, kind: str) -> None:
    try:
        d = parse_retprobe_definition(definition)
    except ValueError as exc:
        err().print(f"[red]bad probe definition:[/] {exc}")
        raise typer.Exit(2) from None
    if d.kind != kind:
        err().print(f"[red]bad probe definition:[/] expected an '{kind}:' line")
        raise typer.Exit(2)


@kretprobe_app.command("add")
def kretprobe_add(ctx: typer.Context,
                  definition: Annotated[str, typer.Argument(metavar="'r[N]:NAME SYM'", help="a kprobe_events line")],
                  trampoline: Annotated[str, typer.Option(help="brk (a BRK exception, genuine pt_regs) or rethook "
                                                               "(no exception, synthesized pstate)")] = "brk",
                  ) -> None:
    """Register a kretprobe on a function."""
    _parse(definition, "r")
    d = parse_retprobe_definition(definition)
    data: KretprobeRegisterData = call_verb(ctx, lambda c: c.kretprobe_register(
        d.name, d.target, maxactive=d.maxactive or 10, trampoline=trampoline))
    out().print(f"{data.definition}  ({data.trampoline} trampoline, {data.maxactive} instances per CPU, at "
                f"{data.address:#x})")


@kretprobe_app.command("del")
def kretprobe_del(ctx: typer.Context, name: Annotated[str, typer.Argument(help="the probe's event name")]) -> None:
    """Remove a kretprobe (returns already hijacked still go back to their callers)."""
    data = call_verb(ctx, lambda c: c.kretprobe_unregister(name))
    out().print(f"removed {data.name}: {data.hits} returns, {data.nmissed} missed, {data.in_flight} in flight")


@kretprobe_app.command("list")
def kretprobe_list(ctx: typer.Context) -> None:
    """The r: lines, then returns handled, entries missed (maxactive) and instances in use."""
    data: KretprobeListData = call_verb(ctx, lambda c: c.kretprobe_list())
    out().print(data.kprobe_events, end="")
    for p in data.probes:
        out().print(f"  {p.name:<32} {p.hits:12d} {p.nmissed:12d} {p.in_use:6d}  {p.trampoline}")


@fprobe_app.command("add")
def fprobe_add(ctx: typer.Context,
               definition: Annotated[str, typer.Argument(metavar="'f:NAME GLOB[%return]'",
                                                         help="an fprobe_events line (globs, comma-separated)")],
               flag: Annotated[list[str] | None, typer.Option(
                   help="an ftrace ops flag: save_regs (refused on arm64) or save_regs_if_supported")] = None,
               ) -> None:
    """Register an fprobe on the functions a glob selects."""
    _parse(definition, "f")
    d = parse_retprobe_definition(definition)
    data: FprobeRegisterData = call_verb(ctx, lambda c: c.fprobe_register(d.name, d.target, exit=d.exit,
                                                                          flags=flag or []))
    out().print(f"{data.definition}  ({data.functions} functions)")


@fprobe_app.command("del")
def fprobe_del(ctx: typer.Context, name: Annotated[str, typer.Argument(help="the probe's event name")]) -> None:
    """Remove an fprobe."""
    data = call_verb(ctx, lambda c: c.fprobe_unregister(name))
    out().print(f"removed {data.name}: {data.hits} entries, {data.exit_hits} exits")


@fprobe_app.command("list")
def fprobe_list(ctx: typer.Context) -> None:
    """The f: lines, then entries, exits and misses."""
    data: FprobeListData = call_verb(ctx, lambda c: c.fprobe_list())
    out().print(data.fprobe_events, end="")
    for p in data.probes:
        out().print(f"  {p.name:<32} {p.hits:12d} {p.exit_hits:12d} {p.nmissed:12d}")


@fprobe_app.command("read")
def fprobe_read(ctx: typer.Context) -> None:
    """The fprobe records since the last read, as trace lines."""
    data: FprobeReadData = call_verb(ctx, lambda c: c.fprobe_read())
    out().print(data.text, end="", markup=False, highlight=False)
    if data.lost:
        err().print(f"[yellow]# {data.lost} records lost (overwritten before this read)[/]")


def install(app: typer.Typer) -> None:
    app.add_typer(kretprobe_app, name="kretprobe")
    app.add_typer(fprobe_app, name="fprobe")
