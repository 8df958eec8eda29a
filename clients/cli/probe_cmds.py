"""``lpctl probe``: kprobes (BRK probes handled in the guest), in the kernel's ``kprobe_events`` syntax.

=====================================================  =============================================================
``lpctl probe add 'p:NAME SYM+OFF [ARGS]' [--post]``   kprobe.register; ARGS: ``x0``, ``%x1``, ``n=%x2:u64``, ``$arg1``
``lpctl probe del NAME``                               kprobe.unregister
``lpctl probe list``                                   kprobe.list: kprobe_events and kprobe_profile (hits, nmissed)
``lpctl probe read``                                   kprobe.read: the recorded hits as trace lines
``lpctl probe stream on|off``                          kprobe.stream: hits on the trace topic (``trace follow``)
=====================================================  =============================================================
"""

from __future__ import annotations

from typing import Annotated

import typer

from clients.cli.runner import call_verb, err, out
from schemas.kprobes import KprobeListData, KprobeReadData, KprobeRegisterData, parse_probe_definition

probe_app = typer.Typer(no_args_is_help=True, help="kprobes: BRK probes on kernel instructions, handled in the "
                        "guest (kprobe_events syntax).")


@probe_app.command("add")
def probe_add(ctx: typer.Context,
              definition: Annotated[str, typer.Argument(metavar="'p:NAME SYM+OFF [ARGS]'",
                                                        help="a kprobe_events line")],
              post: Annotated[bool, typer.Option("--post", help="add the counting post handler")] = False) -> None:
    """Register and arm a kprobe."""
    try:
        parse_probe_definition(definition)
    except ValueError as exc:
        err().print(f"[red]bad probe definition:[/] {exc}")
        raise typer.Exit(2) from None
    data: KprobeRegisterData = call_verb(ctx, lambda c: c.probe_add(definition, post=post))
    slot = f" slot {data.slot:#x}" if data.slot else ""
    out().print(f"{data.definition}  ({data.mode}{slot}, insn {data.insn} at {data.address:#x})")


@probe_app.command("del")
def probe_del(ctx: typer.Context, name: Annotated[str, typer.Argument(help="the probe's event name")]) -> None:
    """Disarm and remove a kprobe."""
    data = call_verb(ctx, lambda c: c.kprobe_unregister(name))
    out().print(f"removed {data.name}: {data.hits} hits, {data.nmissed} missed")


@probe_app.command("list")
def probe_list(ctx: typer.Context) -> None:
    """kprobe_events, then kprobe_profile (event, hits, nmissed)."""
    data: KprobeListData = call_verb(ctx, lambda c: c.kprobe_list())
    out().print(data.kprobe_events, end="")
    if data.probes:
        err().print("[dim]# kprobe_profile[/]")
        out().print(data.kprobe_profile, end="")


@probe_app.command("read")
def probe_read(ctx: typer.Context) -> None:
    """The hits recorded since the last read, as the trace file prints kprobe events."""
    data: KprobeReadData = call_verb(ctx, lambda c: c.kprobe_read())
    out().print(data.text, end="", markup=False, highlight=False)
    if data.lost:
        err().print(f"[yellow]# {data.lost} records lost (overwritten before this read)[/]")


@probe_app.command("stream")
def probe_stream(ctx: typer.Context,
                 state: Annotated[str, typer.Argument(metavar="on|off", help="start or stop publishing hits")]) -> None:
    """Publish probe hits on the trace topic (follow them with `lpctl trace follow`)."""
    if state not in ("on", "off"):
        err().print("[red]bad state:[/] on or off")
        raise typer.Exit(2)
    data = call_verb(ctx, lambda c: c.kprobe_stream(state == "on"))
    out().print(f"probe hits {'stream to' if data.streaming else 'no longer stream to'} {data.topic}")


def install(app: typer.Typer) -> None:
    app.add_typer(probe_app, name="probe")
