"""``lpctl hosts`` and ``lpctl fleet``: every host of a broker from its retained documents, and the fleet runner.

=====================================================  =============================================================
``lpctl hosts [--label K=V] [--build B] [--state S]``  the hosts that left a retained status or state, filtered
``        [--patched NAME] [--follow]``                (a table: id, build, labels, status, patches, transition,
                                                       faults; ``--json``: one object per host); ``--follow``:
                                                       then each change of a selected host, a line each
``lpctl fleet up --state-dir D [--hosts N|--spec F]``  start ``livepatchd fleet`` in the background (pid file
                                                       ``D/.fleet/runner.pid``, log ``D/.fleet/runner.log``)
``lpctl fleet status --state-dir D``                   is the runner alive, how many of its hosts are online
``lpctl fleet scale N --state-dir D``                  grow or shrink the running fleet to N hosts
``lpctl fleet down --state-dir D``                     SIGTERM the runner and wait until it has stopped
=====================================================  =============================================================

``lpctl hosts`` sends nothing to the hosts (an observer's credentials do): it is ``FleetClient.hosts()``. The
``fleet`` commands read the runner's own files (``D/.fleet/status.json``, written by the runner) and run
``livepatchd`` for what changes it; ``fleet status`` also counts the hosts online from their retained statuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from clients.cli.runner import (
    EXIT_ERROR_REPLY,
    EXIT_OFFLINE,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    Options,
    Protocol,
    err,
    fail,
    out,
    remaining,
    run_client,
    tls_or_fail,
)
from clients.sdk import FleetClient, HostFilter, HostRecord, parse_label

LIVENESS_COLOR = {"online": "green", "stale": "yellow", "offline": "red", "unknown": "dim"}


class HostState(enum.StrEnum):
    online = "online"
    stale = "stale"
    offline = "offline"
    unknown = "unknown"


def fleet_client(opts: Options, broker: str | None = None) -> FleetClient:
    tls = tls_or_fail(opts)
    try:
        return FleetClient(broker or opts.broker, timeout=opts.timeout, protocol=opts.protocol.value,
                           tls_context=tls, client_id=opts.client_id)
    except ValueError as exc:
        fail(EXIT_USAGE, str(exc))


def _labels(values: list[str] | None) -> dict[str, str]:
    labels: dict[str, str] = {}
    for text in values or []:
        try:
            name, value = parse_label(text)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="'--label'") from None
        labels[name] = value
    return labels


# -- lpctl hosts -------------------------------------------------------------------------------------------------


def hosts(ctx: typer.Context, *,
          label: Annotated[list[str] | None, typer.Option(
              metavar="NAME=VALUE", help="only hosts with this label value (repeat: all must hold)")] = None,
          build: Annotated[str | None, typer.Option(
              help="only hosts on this kernel build: its version string (6.1-lp1) or build id (a prefix will do)")]
          = None,
          state: Annotated[HostState | None, typer.Option(
              help="only hosts in this status (stale: online but no heartbeat for 3 periods; unknown: a state "
                   "but no status)", case_sensitive=False)] = None,
          patched: Annotated[str | None, typer.Option(
              metavar="NAME", help="only hosts where this patch is loaded and enabled")] = None,
          wait: Annotated[float, typer.Option(min=0.05, help="the list is complete once no retained document came "
                                              "for this many seconds; with none at all, as long again for "
                                              "discovery answers")] = 0.5,
          follow_: Annotated[bool, typer.Option("--follow", "-f", help="after the list, print each change of a "
                                                "selected host (added, changed, removed) until Ctrl-C")] = False,
          count: Annotated[int | None, typer.Option(min=1, help="with --follow: stop after this many changes")]
          = None,
          seconds: Annotated[float | None, typer.Option(min=0.01, help="with --follow: stop after this long")]
          = None) -> None:
    """List the hosts of this broker from their retained status and state alone: build, labels, status (online,
    stale, offline), patches, transition, faults."""
    opts: Options = ctx.obj
    selected = HostFilter(labels=_labels(label), build=build, state=state.value if state is not None else None,
                          patched=patched)

    async def listing(fleet: FleetClient) -> None:
        found = await fleet.hosts(selected, quiet=wait, wait=remaining(opts.timeout))
        _show(found, opts, filtered=selected != HostFilter())
        if not follow_:
            return
        sys.stdout.flush()
        shown = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                async for change in fleet.changes(selected, initial=False):
                    r = change.record
                    if opts.json:
                        line = json.dumps({"change": change.kind, **r.to_json()})
                    else:
                        line = (f"{dt.datetime.now(dt.UTC).strftime('%H:%M:%S.%f')[:-3]}  {change.kind:<8} {r.id}  "
                                f"{r.status}  {_build(r)}  patches: {_patches(r)}  transition: {_transition(r)}")
                    sys.stdout.write(line + "\n")
                    sys.stdout.flush()
                    shown += 1
                    if count is not None and shown >= count:
                        break

    try:
        run_client(opts, fleet_client(opts), listing, budget=opts.timeout + 2 * wait, stream=follow_)
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


def _show(found: list[HostRecord], opts: Options, *, filtered: bool) -> None:
    if opts.json:
        sys.stdout.write(json.dumps({r.id: r.to_json() for r in found}) + "\n")
        return
    if not found:
        out().print("no hosts match" if filtered else "no hosts have announced themselves on this broker")
        return
    table = Table()
    # the host id is what a reader greps for and copies: never cut or folded, the other columns give way
    table.add_column("host", no_wrap=True, min_width=max((len(r.id) for r in found), default=4))
    for name in ("build", "labels", "status", "patches", "transition", "faults"):
        table.add_column(name)
    for r in found:
        table.add_row(r.id, _build(r), ",".join(f"{k}={v}" for k, v in sorted(r.labels.items())) or "-",
                      f"[{LIVENESS_COLOR[r.status]}]{r.status}[/]" + (f" (boot {r.boot_seq})" if r.boot_seq else ""),
                      _patches(r), _transition(r), ",".join(r.faults) or "-")
    console = out()
    console.print(table)
    counts = {s: sum(r.status == s for r in found) for s in LIVENESS_COLOR}
    console.print(f"{len(found)} hosts: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))


def _build(r: HostRecord) -> str:
    if r.release:
        return r.release
    return r.build_id[:12] if r.build_id else "-"


def _patches(r: HostRecord) -> str:
    shown = []
    for p in r.patches:
        shown.append(p.name + ("" if p.enabled and not p.transition else " (in transition)" if p.transition
                               else " (disabled)"))
    return ", ".join(shown) or "-"


def _transition(r: HostRecord) -> str:
    t = r.transition
    if t is None:
        return "-"
    stalled = f", stalled on {len(t.blocked)} tasks" if t.stalled else ""
    return f"{t.target} {t.patch}{stalled}"


# -- lpctl fleet -------------------------------------------------------------------------------------------------

fleet_app = typer.Typer(no_args_is_help=True, help="Run a fleet of simulated hosts (livepatchd fleet) in the "
                        "background: up, status, scale, down.")

StateDir = Annotated[Path, typer.Option(envvar="LIVEPATCHD_STATE_DIR", help="the fleet's state dir (every host's "
                                        "state, the runner's pid file and log under .fleet/)")]
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0
START_POLL_S = 0.1

# Started by ``fleet up`` and gone as soon as the runner is up: the runner, in a session of its own, outlives
# lpctl (and is nobody's child to reap), and a runner that dies at start gives its exit code to lpctl.
_LAUNCHER = """
import json, os, subprocess, sys, time
status, log, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
with open(log, "ab") as f:
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=f, start_new_session=True)
print(p.pid, flush=True)
while p.poll() is None:
    try:
        with open(status) as s:
            if json.load(s).get("pid") == p.pid:
                os._exit(0)
    except (OSError, ValueError, AttributeError):
        pass
    time.sleep(0.1)
os._exit(p.returncode if p.returncode > 0 else 1)
"""


def _dir(state_dir: Path) -> Path:
    return state_dir / ".fleet"


def _pid_file(state_dir: Path) -> Path:
    return _dir(state_dir) / "runner.pid"


def _log_file(state_dir: Path) -> Path:
    return _dir(state_dir) / "runner.log"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a running ``livepatchd fleet`` (not a zombie, not an other program given its pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if stat.rpartition(")")[2].split()[0] in ("Z", "X"):
        return False
    return b"fleet" in cmdline and any(b"daemon.cli" in a or a.endswith(b"livepatchd") for a in cmdline)


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _runner_pid(state_dir: Path) -> int | None:
    """The pid of the runner ``fleet up`` started on ``state_dir``, if it still runs."""
    doc = _read_json(_pid_file(state_dir))
    pid = doc.get("pid") if doc is not None else None
    return pid if isinstance(pid, int) and _alive(pid) else None


def _runner_status(state_dir: Path) -> dict[str, Any]:
    return _read_json(_dir(state_dir) / "status.json") or {}


def _log_tail(state_dir: Path, lines: int = 15) -> str:
    try:
        text = _log_file(state_dir).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _livepatchd(*args: str) -> list[str]:
    return [sys.executable, "-m", "daemon.cli", *args]


def _wait_online(state_dir: Path, pid: int, target: int | None, timeout: float) -> dict[str, Any]:
    """Poll the runner's status file until ``target`` hosts (default: its own target) are online."""
    deadline = time.monotonic() + timeout
    while True:
        status = _runner_status(state_dir)
        want = status.get("target") if target is None else target
        if status.get("pid") == pid and status.get("target") == want and status.get("online") == want:
            return status
        if not _alive(pid):
            fail(EXIT_ERROR_REPLY, f"the fleet runner (pid {pid}) stopped", _log_tail(state_dir) or None)
        if time.monotonic() > deadline:
            fail(EXIT_UNREACHABLE, f"the fleet runs (pid {pid}) but {status.get('online', 0)} of {want} hosts are "
                 f"online after {timeout:g} s", f"lpctl fleet status --state-dir {state_dir}; its log: "
                 f"{_log_file(state_dir)}")
        time.sleep(START_POLL_S)


@fleet_app.command("up")
def fleet_up(ctx: typer.Context, *,
             state_dir: StateDir,
             hosts: Annotated[int | None, typer.Option(min=0, help="how many hosts (default: the spec's, else 20)")]
             = None,
             spec: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="a fleet spec (YAML or "
                                                       "JSON; schema: schemas/json/FleetSpec.json)")] = None,
             seed: Annotated[int | None, typer.Option(min=0, help="override the spec's seed")] = None,
             first: Annotated[int | None, typer.Option(min=0, help="the number of the first host id: each runner of "
                                                       "a fleet split over machines on one broker runs its own "
                                                       "range")] = None,
             broker: Annotated[str | None, typer.Option(help="the hosts' broker, mqtt://\\[user:pass@]host:port "
                                                        "(default: an embedded one on a free port)")] = None,
             workers: Annotated[int | None, typer.Option(min=0, help="worker processes (default: one per core; "
                                                         "0: all hosts in the runner)")] = None,
             host_protocol: Annotated[Protocol | None, typer.Option(
                 "--host-protocol", help="the MQTT version the hosts speak (default: auto)")] = None,
             trusted_keys_dir: Annotated[Path | None, typer.Option(help="every host trusts the public keys in this "
                                                                   "directory")] = None,
             wait: Annotated[bool, typer.Option("--wait/--no-wait", help="wait until every host is online (--no-wait: "
                                                "return once the runner runs)")] = True,
             ready_timeout: Annotated[float, typer.Option(min=0.1, help="seconds to wait for the runner and its "
                                                          "hosts")] = READY_TIMEOUT_S) -> None:
    """Start livepatchd fleet in the background on --state-dir, and wait until all its hosts are online."""
    opts: Options = ctx.obj
    running = _runner_pid(state_dir)
    if running is not None:
        fail(EXIT_USAGE, f"a fleet already runs on {state_dir} (pid {running})",
             f"lpctl fleet down --state-dir {state_dir} stops it")
    state_dir = state_dir.resolve()
    args = ["fleet", "--state-dir", str(state_dir)]
    for name, value in (("--hosts", hosts), ("--spec", spec.resolve() if spec else None), ("--seed", seed),
                        ("--first", first),
                        ("--broker", broker), ("--workers", workers), ("--protocol", host_protocol),
                        ("--trusted-keys-dir", trusted_keys_dir.resolve() if trusted_keys_dir else None)):
        if value is not None:
            args += [name, str(value)]
    try:
        _dir(state_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(EXIT_USAGE, f"cannot use {state_dir}: {exc}")
    started = time.monotonic()
    try:
        launched = subprocess.run([sys.executable, "-c", _LAUNCHER, str(_dir(state_dir) / "status.json"),
                                   str(_log_file(state_dir)), *_livepatchd(*args)], capture_output=True, text=True,
                                  timeout=ready_timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        pid_text = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        _record(state_dir, pid_text, args)
        fail(EXIT_UNREACHABLE, f"the fleet runner did not start within {ready_timeout:g} s",
             _log_tail(state_dir) or None)
    if launched.returncode != 0:
        fail(EXIT_USAGE if launched.returncode == EXIT_USAGE else EXIT_ERROR_REPLY,
             f"livepatchd fleet exited at start ({launched.returncode}):\n{_log_tail(state_dir)}")
    pid = _record(state_dir, launched.stdout, args)
    status = _runner_status(state_dir)
    if wait:
        status = _wait_online(state_dir, pid, None, max(0.1, ready_timeout - (time.monotonic() - started)))
    took = time.monotonic() - started
    if opts.json:
        sys.stdout.write(json.dumps({"pid": pid, "state_dir": str(state_dir), "broker_url": status.get("broker_url"),
                                     "target": status.get("target"), "online": status.get("online"),
                                     "log": str(_log_file(state_dir)), "seconds": round(took, 2)}) + "\n")
        return
    online = f", {status.get('online')} online after {took:.1f} s" if wait else ""
    out().print(f"fleet up on {state_dir}: pid {pid}, {status.get('target')} hosts{online}, broker "
                f"{status.get('broker_url')}\nlog: {_log_file(state_dir)}")


def _record(state_dir: Path, pid_text: str, args: list[str]) -> int:
    try:
        pid = int(pid_text.split(maxsplit=1)[0])
    except (IndexError, ValueError):
        fail(EXIT_ERROR_REPLY, "the fleet runner did not start", _log_tail(state_dir) or None)
    doc = {"pid": pid, "args": args, "started_at": time.time()}
    tmp = _pid_file(state_dir).with_name(f".runner.pid.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc) + "\n")
    tmp.replace(_pid_file(state_dir))
    return pid


@fleet_app.command("status")
def fleet_status(ctx: typer.Context, state_dir: StateDir,
                 wait: Annotated[float, typer.Option(min=0.05, help="seconds without a new retained document "
                                                     "after which the count of online hosts is complete")] = 0.5,
                 ) -> None:
    """Whether the fleet runner of --state-dir runs, and how many of its hosts are online: as the runner says,
    and from their retained statuses on its broker. Exit 4 when it does not run."""
    opts: Options = ctx.obj
    pid = _runner_pid(state_dir)
    status = _runner_status(state_dir)
    ids = set(status.get("hosts") or {})
    broker = status.get("broker_url")
    retained: dict[str, int] | None = None
    if pid is not None and isinstance(broker, str):
        async def count(fleet: FleetClient) -> dict[str, int]:
            found = [r for r in await fleet.hosts(quiet=wait, wait=remaining(opts.timeout), discover=False)
                     if r.id in ids]
            return {s: sum(r.status == s for r in found) for s in LIVENESS_COLOR}
        retained = run_client(opts, fleet_client(opts, broker), count, budget=opts.timeout + wait)
    workers = status.get("workers") or []
    if opts.json:
        sys.stdout.write(json.dumps({
            "running": pid is not None, "pid": pid, "state_dir": str(state_dir), "broker_url": broker,
            "target": status.get("target") if pid is not None else None,
            "online": status.get("online") if pid is not None else 0, "retained": retained,
            "workers": workers if pid is not None else [],
            "runner_rss_mb": round(_rss_mb(pid) or 0, 1) if pid is not None else None}) + "\n")
    elif pid is None:
        err().print(f"no fleet runs on {state_dir}" + (" (it stopped)" if status.get("stopped") else ""))
    else:
        rss = sum(w.get("rss_mb") or 0 for w in workers) + (_rss_mb(pid) or 0)
        seen = ", ".join(f"{n} {s}" for s, n in (retained or {}).items() if n) or "none"
        out().print(f"fleet on {state_dir}: running, pid {pid}, broker {broker}\n"
                    f"hosts: {status.get('target')} wanted, {status.get('online')} online (runner); retained "
                    f"statuses: {seen}\nworkers: {len(workers)}; {rss:.0f} MB resident (runner and workers)")
    if pid is None:
        raise typer.Exit(EXIT_OFFLINE)


@fleet_app.command("scale")
def fleet_scale(ctx: typer.Context,
                size: Annotated[int, typer.Argument(min=0, help="the number of hosts to have")],
                state_dir: StateDir,
                wait: Annotated[bool, typer.Option("--wait/--no-wait", help="wait until the fleet has that many hosts "
                                                   "online (--no-wait: return at once)")] = True,
                ready_timeout: Annotated[float, typer.Option(min=0.1, help="seconds to wait for it")]
                = READY_TIMEOUT_S) -> None:
    """Grow (the next host ids boot) or shrink (the highest ids stop, keeping their state dirs) the running
    fleet of --state-dir. Exit 4 when it does not run."""
    opts: Options = ctx.obj
    pid = _runner_pid(state_dir)
    if pid is None:
        fail(EXIT_OFFLINE, f"no fleet runs on {state_dir}", f"lpctl fleet up --state-dir {state_dir} starts one")
    done = subprocess.run(_livepatchd("fleet", "scale", str(size), "--state-dir", str(state_dir)),
                          capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        fail(EXIT_USAGE if done.returncode == EXIT_USAGE else EXIT_ERROR_REPLY,
             f"livepatchd fleet scale failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    started = time.monotonic()
    status = _wait_online(state_dir, pid, size, ready_timeout) if wait else _runner_status(state_dir)
    if opts.json:
        sys.stdout.write(json.dumps({"pid": pid, "target": size, "online": status.get("online") if wait else None,
                                     "seconds": round(time.monotonic() - started, 2)}) + "\n")
        return
    out().print(f"fleet on {state_dir}: {size} hosts" + (
        f", all online after {time.monotonic() - started:.1f} s" if wait else " asked for"))


@fleet_app.command("down")
def fleet_down(ctx: typer.Context, state_dir: StateDir,
               stop_timeout: Annotated[float, typer.Option(min=0.1, help="seconds to wait for the runner to stop "
                                                           "after SIGTERM")] = STOP_TIMEOUT_S,
               kill: Annotated[bool, typer.Option(help="when it has not stopped by then, SIGKILL it and its "
                                                  "workers")] = False) -> None:
    """Stop the fleet runner of --state-dir: SIGTERM (every host publishes offline, the workers stop), then
    wait until it has exited. Nothing to stop is not an error."""
    opts: Options = ctx.obj
    pid = _runner_pid(state_dir)
    if pid is None:
        _pid_file(state_dir).unlink(missing_ok=True)
        if opts.json:
            sys.stdout.write(json.dumps({"stopped": False, "pid": None, "state_dir": str(state_dir)}) + "\n")
        else:
            out().print(f"no fleet runs on {state_dir}")
        return
    started = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    killed = False
    while _alive(pid):
        if time.monotonic() - started > stop_timeout:
            if not kill:
                fail(EXIT_UNREACHABLE, f"the fleet runner (pid {pid}) did not stop within {stop_timeout:g} s",
                     "pass --kill to SIGKILL it and its workers")
            os.killpg(pid, signal.SIGKILL)  # its own session and process group (fleet up)
            killed = True
            break
        time.sleep(START_POLL_S)
    _pid_file(state_dir).unlink(missing_ok=True)
    took = time.monotonic() - started
    if opts.json:
        sys.stdout.write(json.dumps({"stopped": True, "pid": pid, "killed": killed, "seconds": round(took, 2)})
                         + "\n")
        return
    out().print(f"fleet on {state_dir} stopped (pid {pid}, {'killed' if killed else 'SIGTERM'}) in {took:.1f} s")


def install(app: typer.Typer) -> None:
    app.command()(hosts)
    app.add_typer(fleet_app, name="fleet")
