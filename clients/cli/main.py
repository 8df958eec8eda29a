"""``lpctl``: the operator CLI of livepatchd, over the SDK.

Exit codes (stable; scripts may rely on them):

    0  success (for ``status``: the host is online)
    1  the daemon answered with an error reply (its code is printed; with --json, the reply itself)
    2  usage error: unknown option, bad argument, missing --host
    3  no answer: broker unreachable, connection refused or lost, or no reply within --timeout
    4  the host is offline, stale (no heartbeat lately), or never announced itself (``status``)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from clients.cli import (
    fleet_cmds,
    ftrace_cmds,
    keys,
    observe_cmds,
    patch_cmds,
    probe_cmds,
    profile_cmds,
    retprobe_cmds,
    rollout_cmds,
)
from clients.cli.help_format import LpctlGroup
from clients.cli.runner import (
    EXIT_OFFLINE,
    EXIT_USAGE,
    Options,
    Protocol,
    call_verb,
    fail,
    out,
    parse_int,
    remaining,
    run,
)
from schemas import CallData, InfoData, StatusDoc, SymbolData, TasksData

app = typer.Typer(name="lpctl", cls=LpctlGroup, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, help="Operate livepatchd daemons over MQTT.",
                  epilog="Exit codes: 0 ok, 1 error reply, 2 usage, 3 broker unreachable or timeout, 4 host offline.")
keys_app = typer.Typer(no_args_is_help=True, help="Ed25519 keys for signing patches.")
app.add_typer(keys_app, name="keys")


@app.callback()
def options(
    ctx: typer.Context,
    *,
    broker: Annotated[list[str] | None, typer.Option(
        envvar="LPCTL_BROKER", help="mqtt://\\[user:pass@]host:port or mqtts://…; a cluster's nodes: repeat the "
        "option or separate URLs with commas (default mqtt://127.0.0.1:1883)")] = None,
    host: Annotated[str | None, typer.Option(envvar="LPCTL_HOST", help="the daemon's host id")] = None,
    json_: Annotated[bool, typer.Option("--json", help="print the daemon's reply (or document) exactly, as JSON")]
    = False,
    timeout: Annotated[float, typer.Option(envvar="LPCTL_TIMEOUT", min=0.1, help="seconds the whole command may "
                                           "take: connecting (every node, reconnects included) and the reply")]
    = 10.0,
    protocol: Annotated[Protocol, typer.Option(envvar="LPCTL_PROTOCOL", help="MQTT version: auto tries 5, then "
                                               "3.1.1 (3.1.1 for the daemon's embedded broker)")] = Protocol.auto,
    tls_ca: Annotated[Path | None, typer.Option(envvar="LPCTL_TLS_CA", help="CA certificate(s) to verify the "
                                                "broker with (PEM); implies TLS")] = None,
    tls_cert: Annotated[Path | None, typer.Option(envvar="LPCTL_TLS_CERT", help="client certificate (PEM) for "
                                                  "brokers that require one; implies TLS")] = None,
    tls_key: Annotated[Path | None, typer.Option(envvar="LPCTL_TLS_KEY", help="its private key (PEM), when not "
                                                 "in the certificate file")] = None,
    client_id: Annotated[str | None, typer.Option(envvar="LPCTL_CLIENT_ID", help="MQTT client id (replies come "
                                                  "on reply/<client id>); a broker that binds ids to user names "
                                                  "(deploy/mosquitto.conf, listener 1883) needs the user name")] = None,
) -> None:
    ctx.obj = Options(",".join(broker or ["mqtt://127.0.0.1:1883"]), host, json_, timeout, protocol, tls_ca,
                      tls_cert, tls_key, client_id)


# -- commands ----------------------------------------------------------------------------------------------------


LIVENESS_COLOR = {"online": "green", "stale": "yellow", "offline": "red"}


def _beat_age(doc: StatusDoc, now: float) -> str:
    if doc.heartbeat_at is None:
        return "-"
    return f"{max(0.0, now - doc.heartbeat_at):.1f} s ago (every {doc.heartbeat_s:g} s)"


@app.command()
def status(ctx: typer.Context) -> None:
    """The host's retained status; exit 4 when it is offline, stale (no heartbeat for 3 periods) or unknown."""
    opts: Options = ctx.obj
    doc: StatusDoc | None = run(opts, lambda c: c.current_status(wait=remaining(2.0)))
    if doc is None:
        if opts.json:
            sys.stdout.write("null\n")
        fail(EXIT_OFFLINE, f"host {opts.host} has never announced itself on {opts.shown_broker}",
             "lpctl hosts lists the hosts this broker knows")
    now = time.time()
    live = doc.liveness(now)
    if opts.json:
        sys.stdout.write(doc.model_dump_json() + "\n")
    else:
        beat = f", last heartbeat {_beat_age(doc, now)}" if doc.heartbeat_at is not None else ""
        out().print(f"{doc.host}: [{LIVENESS_COLOR[live]}]{live}[/] (boot {doc.boot_seq}, {doc.reason}{beat}, "
                    f"livepatchd {doc.version})")
    if live != "online":
        raise typer.Exit(EXIT_OFFLINE)


@app.command()
def info(ctx: typer.Context) -> None:
    """Kernel and daemon facts."""
    data: InfoData = call_verb(ctx, lambda c: c.info())
    table = Table(show_header=False, box=None)
    for key, value in (("host", data.host), ("livepatchd", data.version), ("kernel build id", data.kernel_build_id),
                       ("arch", data.arch), ("cpus", data.nr_cpus), ("boot", data.boot_seq),
                       ("uptime", f"{data.uptime_s:.1f} s"), ("symbols", data.symbols), ("tasks", data.tasks),
                       ("requests", f"{data.requests.accepted} accepted, {data.requests.answered} answered, "
                                    f"{data.requests.replayed} replayed at boot"),
                       ("broker", f"{data.broker.node} (MQTT {data.broker.protocol})" if data.broker else "unknown")):
        table.add_row(f"[bold]{key}[/]", str(value))
    out().print(table)


@app.command()
def call(ctx: typer.Context,
         function: Annotated[str, typer.Argument(help="kernel function name")],
         args: Annotated[list[str] | None, typer.Argument(
             help="up to 8 integer arguments (0x… for hex; put -- before negative ones)")] = None,
         cpu: Annotated[int, typer.Option(min=0, help="vCPU to run it on")] = 0,
         sympos: Annotated[int, typer.Option(min=0, help="which of several same-named symbols (1-based)")] = 0,
         ) -> None:
    """Call a kernel function on a vCPU and print its return value."""
    values = [parse_int(a) for a in args or []]
    data: CallData = call_verb(ctx, lambda c: c.call(function, *values, cpu=cpu, sympos=sympos))
    out().print(f"{data.function}({', '.join(str(v) for v in values)}) on cpu {data.cpu} = {data.value} "
                f"({data.value:#x}{f', signed {data.signed}' if data.signed < 0 else ''})")


@app.command()
def symbols(ctx: typer.Context,
            symbol: Annotated[str, typer.Argument(help="a symbol name, or an address (0x…) to describe")],
            sympos: Annotated[int, typer.Option(min=0, help="which of several same-named symbols (1-based)")] = 0,
            ) -> None:
    """Look a symbol up by name, or find the symbol that contains an address."""
    if symbol[:1].isdigit():
        address = parse_int(symbol)
        data: SymbolData = call_verb(ctx, lambda c: c.symbol(address=address))
    else:
        data = call_verb(ctx, lambda c: c.symbol(symbol, sympos=sympos))
    kind = "function" if data.is_func else "object"
    out().print(f"{data.description}  {data.address + data.offset:#x}  {kind}, {data.size} bytes, sympos {data.sympos}")


@app.command()
def tasks(ctx: typer.Context,
          cpu: Annotated[int | None, typer.Option(min=0, help="only this CPU's tasks")] = None) -> None:
    """The kernel's tasks."""
    data: TasksData = call_verb(ctx, lambda c: c.tasks(cpu))
    table = Table("pid", "cpu", "kind", "comm", "state")
    for t in data.tasks:
        table.add_row(str(t.pid), str(t.cpu), t.kind, t.comm, t.state)
    out().print(table)


@keys_app.command("generate")
def keys_generate(ctx: typer.Context,
                  name: Annotated[str, typer.Argument(help="key name: writes NAME.key and NAME.pub")] = "livepatch",
                  out_dir: Annotated[Path, typer.Option("--out", help="directory for the two files")] = Path(),
                  force: Annotated[bool, typer.Option(help="overwrite existing files")] = False) -> None:
    """Generate an Ed25519 key pair: NAME.key (PKCS#8 PEM, mode 0600) and NAME.pub (SubjectPublicKeyInfo PEM)."""
    opts: Options = ctx.obj
    try:
        pair = keys.generate(out_dir, name, force=force)
    except FileExistsError as exc:
        fail(EXIT_USAGE, f"{exc.filename} exists", "pass --force to overwrite it")
    except OSError as exc:
        fail(EXIT_USAGE, f"cannot write the key pair: {exc}")
    if opts.json:
        sys.stdout.write(json.dumps({"private_key": str(pair.private_path), "public_key": str(pair.public_path),
                                     "key_id": pair.key_id}) + "\n")
        return
    out().print(f"private key: {pair.private_path} (keep it secret)\npublic key:  {pair.public_path}\n"
                f"key id:      {pair.key_id}")


# hosts/fleet, state/events, the ftrace/trace/hijack and the patch commands live in their own modules, over
# clients.cli.runner
fleet_cmds.install(app)
observe_cmds.install(app)
ftrace_cmds.install(app)
profile_cmds.install(app)
probe_cmds.install(app)
retprobe_cmds.install(app)
patch_cmds.install(app)
rollout_cmds.install(app)


def main() -> None:
    """The ``lpctl`` console script."""
    app()


if __name__ == "__main__":
    main()
