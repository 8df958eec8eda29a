"""``lpctl profile``: the function profiler (``function_profile_enabled`` and ``trace_stat/function``).

=====================================================  =============================================================
``lpctl profile start [FILTER]``                       profile.start (every function when FILTER is omitted)
``lpctl profile read [--limit N]``                     profile.read: trace_stat/function, most called first
``lpctl profile stop [--limit N]``                     profile.stop: the final counts
=====================================================  =============================================================
"""

from __future__ import annotations

from typing import Annotated

import typer

from clients.cli.ftrace_cmds import LimitOpt, _batch, _functions
from clients.cli.runner import call_verb, err, out
from schemas.ftrace import MAX_PAGE, ProfileReadData, ProfileStartData

profile_app = typer.Typer(no_args_is_help=True, help="The function profiler: calls per function, counted in the "
                          "guest (trace_stat/function).")


@profile_app.command("start")
def profile_start(ctx: typer.Context,
                  filter_: Annotated[str | None, typer.Argument(
                      metavar="FILTER", help="set_ftrace_filter syntax; omitted: every function")] = None) -> None:
    """Start counting calls per function."""
    data: ProfileStartData = call_verb(ctx, lambda c: c.profile_start(filter_))
    out().print(f"profiling {_functions(data.functions)}; {_batch(data.batch)}")


def _print_counts(data: ProfileReadData) -> None:
    out().print(data.text, end="")
    more = f" (first {len(data.functions)} shown)" if len(data.functions) < data.total_functions else ""
    err().print(f"[dim]# {data.total_hits} calls in {_functions(data.total_functions)}{more}[/]")


@profile_app.command("read")
def profile_read(ctx: typer.Context, limit: LimitOpt = MAX_PAGE) -> None:
    """trace_stat/function: calls per function so far."""
    _print_counts(call_verb(ctx, lambda c: c.profile_read(limit=limit)))


@profile_app.command("stop")
def profile_stop(ctx: typer.Context, limit: LimitOpt = MAX_PAGE) -> None:
    """Stop the profiler and print the final counts."""
    _print_counts(call_verb(ctx, lambda c: c.profile_stop(limit=limit)))


def install(app: typer.Typer) -> None:
    app.add_typer(profile_app, name="profile")
