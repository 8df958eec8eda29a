"""``lpctl rollout …``: the orchestrator's rollouts (create, control, watch, report, rehearse).

The commands talk to ``livepatchd orchestrator`` over the broker (host id ``_orchestrator``); ``--host`` does not
apply. Exit codes: 0 ok; 1 an error reply (its code is printed; with --json, the reply itself), or for ``watch``
a rollout that ended CANCELED or ROLLED_BACK; 2 usage (a spec file that does not parse or validate); 3 broker
unreachable or no reply within --timeout (is the orchestrator running?).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml  # type: ignore[import-untyped]
from pydantic import TypeAdapter, ValidationError
from rich.console import Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from clients.cli.rollout_board import HostBoard
from clients.cli.runner import Options, call_verb, fail, out, run
from clients.sdk import LivepatchClient, ReplyError
from clients.sdk import rollout_api as api
from schemas.fleet import Fault
from schemas.rollout import TERMINAL, ExecState, RolloutDoc, RolloutSpec
from schemas.rollout_api import DryRunData, ListData, ReportData, RolloutData, StatusData
from schemas.topics import ORCHESTRATOR

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

rollout_app = typer.Typer(no_args_is_help=True, help="Rollouts: take a patch across the fleet in waves, through "
                          "the orchestrator (livepatchd orchestrator).",
                          epilog="Exit codes: 0 ok, 1 error reply (or watch: the rollout was canceled or rolled "
                          "back), 2 usage, 3 broker unreachable or no reply (is the orchestrator running?).")

NameArg = Annotated[str, typer.Argument(help="the rollout's name")]


def install(app: typer.Typer) -> None:
    app.add_typer(rollout_app, name="rollout")


@rollout_app.callback()
def _orchestrator(ctx: typer.Context) -> None:
    """Every rollout command addresses the orchestrator, not a host."""
    opts: Options = ctx.obj
    ctx.obj = replace(opts, host=ORCHESTRATOR)


def _load(path: Path, what: str) -> Any:
    try:
        text = path.read_text()
    except OSError as exc:
        fail(EXIT_USAGE, f"cannot read {what} {path}: {exc.strerror}")
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        fail(EXIT_USAGE, f"{path} is not valid JSON/YAML: {exc}")


def _spec(path: Path) -> RolloutSpec:
    doc = _load(path, "rollout spec")
    try:
        return RolloutSpec.model_validate(doc)
    except ValidationError as exc:
        e = exc.errors()[0]
        loc = ".".join(str(x) for x in e["loc"]) or "spec"
        fail(EXIT_USAGE, f"{path}: {loc}: {e['msg']} ({exc.error_count()} error(s))",
             "the spec's JSON Schema is schemas/json/RolloutSpec.json")


def _faults(path: Path | None) -> list[Fault]:
    if path is None:
        return []
    doc = _load(path, "fault plan")
    if isinstance(doc, dict):
        doc = doc.get("faults", [])
    try:
        return TypeAdapter(list[Fault]).validate_python(doc)
    except ValidationError as exc:
        e = exc.errors()[0]
        fail(EXIT_USAGE, f"{path}: {'.'.join(str(x) for x in e['loc'])}: {e['msg']}",
             "a fault plan is a list of faults as in a fleet spec's 'faults' (schemas/json/FleetSpec.json)")


def _show(doc: RolloutDoc) -> None:
    counts = ", ".join(f"{k} {v}" for k, v in doc.counts.items())
    out().print(f"[bold]{doc.name}[/]: {doc.state} (wave {doc.current_wave + 1}/{len(doc.waves)}) — {counts}"
                + (f"\n  {doc.reason}" if doc.reason else ""))


def _waves_table(doc: RolloutDoc) -> Table:
    table = Table("wave", "hosts", "state", "states")
    for w in doc.waves:
        table.add_row(str(w.index), str(w.hosts), w.state, ", ".join(f"{k} {v}" for k, v in w.counts.items()))
    return table


@rollout_app.command()
def create(ctx: typer.Context,
           spec: Annotated[Path, typer.Argument(help="the rollout spec (YAML or JSON; schemas/json/RolloutSpec.json)")],
           dry_run: Annotated[bool, typer.Option("--dry-run", help="plan it and print the plan; store and send "
                                                 "nothing that changes a host")] = False) -> None:
    """Plan a rollout from SPEC against the hosts' retained state and store it (CREATED; then 'rollout start')."""
    s = _spec(spec)
    if dry_run:
        d: DryRunData = call_verb(ctx, lambda c: api.dry_run(c, s))
        out().print(f"dry run of [bold]{s.name}[/]: {len(d.waves)} wave(s) of "
                    f"{', '.join(str(len(w)) for w in d.waves)} host(s); projected {d.projected_s:.0f} s to 100%")
        cov = d.plan.get("coverage", {})
        out().print(f"coverage: {cov.get('covered')}/{cov.get('targets')} targets have a bundle for their build")
        for host, why in sorted(d.removed.items()):
            out().print(f"  REMOVED {host}: {why}")
        if d.offline:
            out().print(f"[yellow]offline now: {', '.join(d.offline)}[/]")
        if d.in_transition:
            out().print(f"[yellow]in a transition now: {', '.join(d.in_transition)}[/]")
        for host, tasks in d.would_stall.items():
            who = "; ".join(f"pid {t.get('pid')} ({t.get('comm')}) {t.get('reason')}" for t in tasks)
            out().print(f"[red]would stall[/] {host}: {who}")
        for host, why in d.unchecked.items():
            out().print(f"[dim]stalls not predicted on {host}: {why}[/]")
        taken: dict[tuple[str, ...], list[str]] = {}
        for host, olds in d.supersedes.items():
            taken.setdefault(tuple(olds), []).append(host)
        for names, where in sorted(taken.items()):
            out().print(f"atomic replace: supersedes {', '.join(names)} on {len(where)} host(s) (disabled as "
                        f"replaced, then unloaded; their functions are in the stall prediction)")
        return
    r: RolloutData = call_verb(ctx, lambda c: api.create(c, s))
    _show(r.rollout)
    out().print(_waves_table(r.rollout))


def _control(action: str, help_text: str) -> None:
    def command(ctx: typer.Context, name: NameArg) -> None:
        r: RolloutData = call_verb(ctx, lambda c: api.control(c, action, name))
        _show(r.rollout)

    command.__doc__ = help_text
    rollout_app.command(action)(command)


_control("start", "Start a CREATED rollout (at its start time, in its windows, behind its approval gates).")
_control("pause", "Stop releasing hosts; those in flight finish.")
_control("resume", "Go on after a pause, or after a wave that missed its success threshold.")
_control("cancel", "Cancel every host not started yet; those in flight finish.")
_control("rollback", "Disable and unload the patch on every host the rollout reached, latest wave first.")


@rollout_app.command()
def approve(ctx: typer.Context, name: NameArg,
            wave: Annotated[int | None, typer.Option(min=0, help="the wave to approve (default: the one waiting)")]
            = None) -> None:
    """Open an approval gate (the waiting wave, or a later one ahead of time)."""
    r: RolloutData = call_verb(ctx, lambda c: api.control(c, "approve", name, wave=wave))
    _show(r.rollout)


@rollout_app.command()
def status(ctx: typer.Context, name: NameArg,
           state: Annotated[list[ExecState] | None, typer.Option("--state", help="only hosts in this state "
                                                                  "(repeatable)")] = None) -> None:
    """The rollout, its waves, and a table of its hosts."""
    d: StatusData = call_verb(ctx, lambda c: api.status(c, name, state or []))
    _show(d.rollout)
    out().print(_waves_table(d.rollout))
    table = Table("host", "wave", "build", "state", "attempts", "details")
    for e in d.executions:
        err = e.details.get("error") or {}
        why = err.get("code") or e.details.get("reason") or ""
        table.add_row(e.host, str(e.wave), (e.build_id or "")[:12], e.state.value, str(e.attempts), str(why))
    out().print(table)


@rollout_app.command("list")
def list_(ctx: typer.Context) -> None:
    """Every rollout the orchestrator holds."""
    d: ListData = call_verb(ctx, api.list_rollouts)
    table = Table("name", "state", "wave", "hosts", "states")
    for r in d.rollouts:
        table.add_row(r.name, r.state, f"{r.current_wave + 1}/{len(r.waves)}", str(sum(w.hosts for w in r.waves)),
                      ", ".join(f"{k} {v}" for k, v in r.counts.items()))
    out().print(table)


def _write_report(d: ReportData, out_json: Path | None, markdown: Path | None, plot: Path | None) -> None:
    from clients.rollout import report as rendering  # noqa: PLC0415  (matplotlib only for --plot)

    if out_json is not None:
        out_json.write_text(rendering.dumps(d.report))
    if markdown is not None:
        markdown.write_text(d.markdown)
    if plot is not None:
        rendering.plot(d.report, plot)
    if out_json is None and markdown is None:
        out().print(d.markdown)


OutOpt = Annotated[Path | None, typer.Option("--out", help="write the report document (JSON) here")]
MdOpt = Annotated[Path | None, typer.Option("--markdown", help="write the Markdown rendering here")]
PlotOpt = Annotated[Path | None, typer.Option("--plot", help="write a timeline plot (PNG) of host states per wave")]


@rollout_app.command()
def report(ctx: typer.Context, name: NameArg, out_json: OutOpt = None, markdown: MdOpt = None,
           plot: PlotOpt = None) -> None:
    """The rollout's report: counts, waves, timeline, hosts that did not succeed (Markdown on stdout)."""
    d: ReportData = call_verb(ctx, lambda c: api.report(c, name))
    _write_report(d, out_json, markdown, plot)


@rollout_app.command()
def rehearse(ctx: typer.Context, spec: Annotated[Path, typer.Argument(help="the rollout spec")],  # noqa: PLR0917
             faults: Annotated[Path | None, typer.Option(help="a fault plan: a list of faults (YAML/JSON) as in a "
                                                         "fleet spec")] = None,
             seed: Annotated[int, typer.Option(min=0, help="draws which hosts carry which fault")] = 0,
             out_json: OutOpt = None, markdown: MdOpt = None, plot: PlotOpt = None) -> None:
    """Run SPEC against a simulated twin of its targets with a seeded fault plan, on a simulated clock, and
    report which wave would trip which abort criterion. The same inputs give a byte-identical report."""
    s, f = _spec(spec), _faults(faults)
    d: ReportData = call_verb(ctx, lambda c: api.rehearse(c, s, f, seed), reply_timeout=120.0, budget=125.0)
    _write_report(d, out_json, markdown, plot)


@rollout_app.command()
def watch(ctx: typer.Context, name: NameArg,
          seconds: Annotated[float | None, typer.Option(min=0.1, help="stop after this long")] = None) -> None:
    """Live progress: a bar per wave and a table of the hosts by state, until the rollout ends (Ctrl-C stops
    watching, not the rollout). With --json: each new RolloutDoc, one per line."""
    opts: Options = ctx.obj
    final = {"COMPLETED": EXIT_OK, "CANCELED": EXIT_FAILED, "ROLLED_BACK": EXIT_FAILED}
    if opts.json:
        def show_json(doc: RolloutDoc) -> None:
            print(doc.model_dump_json(), flush=True)
        last = _follow(opts, name, seconds, show_json, None)
    else:
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[states]}"))
        bars: dict[int, Any] = {}
        board = HostBoard()
        live = Live(Group(progress, board.table()), refresh_per_second=4, transient=False)

        def show(doc: RolloutDoc) -> None:
            for w in doc.waves:
                done = sum(v for k, v in w.counts.items() if ExecState(k) in TERMINAL)
                states = ", ".join(f"{k} {v}" for k, v in w.counts.items())
                if w.index not in bars:
                    bars[w.index] = progress.add_task(f"wave {w.index}", total=w.hosts, states=states)
                progress.update(bars[w.index], completed=done, total=w.hosts, states=states,
                                description=f"wave {w.index} {w.state}")
            progress.console.print(f"{doc.name}: {doc.state}" + (f" — {doc.reason}" if doc.reason else ""))

        def redraw() -> None:
            live.update(Group(progress, board.table()))

        with live:
            last = _follow(opts, name, seconds, show, (board, redraw))
            redraw()
    if last is not None and last.state in final:
        raise typer.Exit(final[last.state])


Board = tuple[HostBoard, Callable[[], None]]


async def _track(client: LivepatchClient, name: str, board: HostBoard, redraw: Callable[[], None]) -> None:
    """Keep ``board`` current from the events topic; one more snapshot once the first change is in (the
    subscription is live by then: nothing between the first snapshot and it is lost)."""
    first = True
    async for e in api.execution_changes(client, name):
        changed = board.update(e)
        if first:
            first = False
            await _snapshot(client, name, board)
            changed = True
        if changed:
            redraw()


async def _snapshot(client: LivepatchClient, name: str, board: HostBoard) -> None:
    try:
        d = await api.status(client, name)
    except ReplyError as exc:
        fail(EXIT_FAILED, f"{exc.code}: {exc.message}",
             "'lpctl rollout list' shows the rollouts" if exc.code == "rollout_not_found" else None)
    for e in d.executions:
        board.update(e)


def _follow(opts: Options, name: str, seconds: float | None, show: Any, hosts: Board | None) -> RolloutDoc | None:
    async def each(client: LivepatchClient) -> RolloutDoc | None:
        last: RolloutDoc | None = None
        tracker: asyncio.Task[None] | None = None
        if hosts is not None:
            board, redraw = hosts
            tracker = asyncio.get_running_loop().create_task(_track(client, name, board, redraw))
            await _snapshot(client, name, board)
            redraw()
        try:
            async with asyncio.timeout(seconds):
                async for doc in api.watch(client, name):
                    if last is None or doc.version != last.version or doc.state != last.state:
                        show(doc)
                    last = doc
                    if doc.state in ("COMPLETED", "CANCELED", "ROLLED_BACK"):
                        break
        except TimeoutError:
            pass
        finally:
            if tracker is not None:
                tracker.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await tracker
        if hosts is not None and last is not None and last.state in ("COMPLETED", "CANCELED", "ROLLED_BACK"):
            await _snapshot(client, name, hosts[0])  # the hosts as they ended (a change may still be in flight)
        return last
    try:
        return run(opts, each, stream=True)
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
