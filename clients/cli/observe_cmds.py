"""``lpctl state`` and ``lpctl events``: what a host publishes for observers (no request is sent).

=====================================================  =============================================================
``lpctl state``                                        the retained ``state`` document (``--json``: exactly)
``lpctl events [--type GLOB] [--count N]``             the ``events`` stream as it is published, until Ctrl-C
=====================================================  =============================================================

Both work with an observer's credentials (deploy/livepatchd.acl lets observers read, not request).
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import json
import sys
from typing import Annotated

import typer
from rich.table import Table

from clients.cli.runner import EXIT_OFFLINE, Options, err, fail, follow, out, remaining, run
from schemas import EventDoc, StateDoc


def _clock(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%H:%M:%S.%f")[:-3]


def _event_line(e: EventDoc) -> str:
    data = " ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in e.data.items())
    return f"{_clock(e.time)}  {e.boot_seq}/{e.seq:<5} {e.type:<28} {data}".rstrip()


def state(ctx: typer.Context) -> None:
    """The host's retained state document: kernel, components (livepatch, ftrace, ...), version."""
    opts: Options = ctx.obj
    doc: StateDoc | None = run(opts, lambda c: c.state(wait=remaining(2.0)))
    if doc is None:
        fail(EXIT_OFFLINE, f"host {opts.host} has published no state on {opts.shown_broker}",
             "lpctl hosts lists the hosts this broker knows")
    if opts.json:
        sys.stdout.write(doc.model_dump_json() + "\n")
        return
    console = out()
    console.print(f"[bold]{doc.host}[/]  state version {doc.version}, boot {doc.boot_seq}, "
                  f"published {_clock(doc.time)} UTC, kernel {doc.kernel.build_id[:16]}… on {doc.kernel.nr_cpus} cpus")
    table = Table("component", "facts")
    for name, section in sorted(doc.components.items()):
        table.add_row(name, json.dumps(section, indent=1, sort_keys=True))
    console.print(table)


def events(ctx: typer.Context,
           type_: Annotated[str, typer.Option("--type", "-t", help="only events whose type matches this glob "
                                              "(e.g. 'patch.*')")] = "*",
           count: Annotated[int | None, typer.Option(min=1, help="stop after this many events")] = None,
           seconds: Annotated[float | None, typer.Option(min=0.01, help="stop after this long")] = None) -> None:
    """Print the host's events as they are published (none are retained), until Ctrl-C."""
    opts: Options = ctx.obj

    def show(event: EventDoc, _left: int | None) -> int:
        if not fnmatch.fnmatchcase(event.type, type_):
            return 0
        sys.stdout.write((event.model_dump_json() if opts.json else _event_line(event)) + "\n")
        return 1

    err().print(f"[dim]following the events of {opts.host} (Ctrl-C to stop)[/]")
    follow(opts, lambda c: c.events(), show, count=count, seconds=seconds)


def install(app: typer.Typer) -> None:
    app.command()(state)
    app.command()(events)
