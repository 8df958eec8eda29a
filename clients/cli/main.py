"""``lpctl``: the operator CLI of livepatchd, over the SDK.

Exit codes (stable; scripts may rely on them):

    0  success (for ``status``: the host is online)
    1  the daemon answered with an error reply (its code is printed; with --json, the reply itself)
    2  usage error: unknown option, bad argument, missing --host
    3  no answer: broker unreachable, connection refused or lost, or no reply within --timeout
    4  the host is offline, stale (no heartbeat lately), or never announced itself (``status``)
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import json
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar
from urllib.parse import urlsplit, urlunsplit

import typer
from rich.console import Console
from rich.table import Table

from clients.cli import keys
from clients.cli.deadline import Deadline
from clients.cli.help_format import LpctlGroup
from clients.sdk import BrokerUnreachable, LivepatchClient, RawReply, RequestTimeout, SdkError, SubscriptionFailed
from schemas import CallData, InfoData, StatusDoc, SymbolData, TasksData

T = TypeVar("T")

EXIT_OK, EXIT_ERROR_REPLY, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_OFFLINE = 0, 1, 2, 3, 4


class Protocol(enum.StrEnum):
    auto = "auto"
    v5 = "5"
    v311 = "3.1.1"


@dataclass(frozen=True)
class Options:
    broker: str
    host: str | None
    json: bool
    timeout: float
    protocol: Protocol
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @property
    def shown_broker(self) -> str:
        """The broker URL(s) as error messages name them: with the password, if any, left out."""
        return ",".join(_without_password(url) for url in self.broker.split(","))

    def tls_context(self) -> ssl.SSLContext | None:
        """The trust anchors and client certificate given, if any (mqtts:// alone: the system's trust store)."""
        if self.tls_ca is None and self.tls_cert is None:
            return None
        ctx = ssl.create_default_context(cafile=str(self.tls_ca) if self.tls_ca else None)
        if self.tls_cert is not None:
            ctx.load_cert_chain(str(self.tls_cert), str(self.tls_key) if self.tls_key else None)
        return ctx


def _without_password(url: str) -> str:
    parts = urlsplit(url.strip())
    if parts.password is None:
        return url.strip()
    netloc = f"{parts.username}:***@{parts.netloc.rpartition('@')[2]}"
    return urlunsplit(parts._replace(netloc=netloc))


app = typer.Typer(name="lpctl", cls=LpctlGroup, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, help="Operate livepatchd daemons over MQTT.",
                  epilog="Exit codes: 0 ok, 1 error reply, 2 usage, 3 broker unreachable or timeout, 4 host offline.")
keys_app = typer.Typer(no_args_is_help=True, help="Ed25519 keys for signing patches.")
app.add_typer(keys_app, name="keys")


def out() -> Console:
    return Console(file=sys.stdout, highlight=False, soft_wrap=True)


def err() -> Console:
    return Console(file=sys.stderr, highlight=False, soft_wrap=True)


def fail(code: int, message: str, hint: str | None = None) -> NoReturn:
    console = err()
    console.print(f"[bold red]error:[/] {message}")
    if hint:
        console.print(f"[dim]hint: {hint}[/]")
    raise typer.Exit(code)


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
) -> None:
    ctx.obj = Options(",".join(broker or ["mqtt://127.0.0.1:1883"]), host, json_, timeout, protocol, tls_ca,
                      tls_cert, tls_key)


def _client(opts: Options, *, need_host: bool = True) -> LivepatchClient:
    if need_host and not opts.host:
        fail(EXIT_USAGE, "no host given", "pass --host HOST or set LPCTL_HOST (lpctl hosts lists them)")
    try:
        tls = opts.tls_context()
    except (OSError, ssl.SSLError) as exc:
        fail(EXIT_USAGE, f"cannot load the TLS files: {exc}", "check --tls-ca, --tls-cert and --tls-key")
    try:
        return LivepatchClient(opts.broker, opts.host, timeout=opts.timeout, protocol=opts.protocol.value,
                               tls_context=tls)
    except ValueError as exc:
        fail(EXIT_USAGE, str(exc))


def _run(opts: Options, work: Callable[[LivepatchClient], Awaitable[T]], *, need_host: bool = True,
         budget: float | None = None, stream: bool = False) -> T:
    """Connect, run ``work``, disconnect, within ``budget`` seconds (default ``--timeout``) in all: connecting to
    every node, reconnecting and waiting for replies included. A ``stream`` (events, trace follow) runs until it
    ends; only its connection is bounded. Past the budget the command exits 3, even when a thread is stuck in
    a blocking connect: a watchdog ends the process two seconds later."""
    client = _client(opts, need_host=need_host)
    total = opts.timeout if budget is None else budget
    _deadline.set(time.monotonic() + total)
    connected = False
    watchdog = Deadline(total + 2.0, lambda: _no_answer(opts, total, connected))

    async def main() -> T:
        nonlocal connected
        async with asyncio.timeout(total) as scope:
            async with client:
                connected = True
                if stream:
                    scope.reschedule(None)
                    watchdog.cancel()
                return await work(client)
    watchdog.start()
    try:
        return asyncio.run(main())
    except TimeoutError:
        fail(EXIT_UNREACHABLE, _no_answer(opts, total, connected),
             f"check that {opts.host} is online: lpctl --host {opts.host} status" if connected and opts.host
             else "check --broker (or LPCTL_BROKER); --timeout gives the command more time")
    except RequestTimeout as exc:  # every message of a connection problem names the broker it used
        fail(EXIT_UNREACHABLE, f"{exc}, over {opts.shown_broker}",
             f"check that {opts.host} is online: lpctl --host {opts.host} status; and that it uses this broker "
             "(--broker, LPCTL_BROKER)")
    except BrokerUnreachable as exc:
        where = f"{exc} (--broker {opts.shown_broker})"
        if "MQTT 5" in str(exc):
            fail(EXIT_UNREACHABLE, where, "pass --protocol 3.1.1 (or auto; LPCTL_PROTOCOL) for this broker")
        if isinstance(exc, SubscriptionFailed):
            fail(EXIT_UNREACHABLE, where, "check the broker's ACL for this user (it must read the topic)")
        fail(EXIT_UNREACHABLE, where, "check --broker (or LPCTL_BROKER) and the broker's credentials")
    except SdkError as exc:
        fail(EXIT_USAGE, str(exc))
    finally:
        watchdog.cancel()


_deadline: contextvars.ContextVar[float] = contextvars.ContextVar("lpctl_deadline")


def remaining(at_most: float) -> float:
    """Seconds left before the command's deadline (a little less, so that a wait inside it ends first), at most
    ``at_most``."""
    left = _deadline.get(time.monotonic() + at_most) - time.monotonic() - 0.05
    return max(0.01, min(at_most, left))


def _no_answer(opts: Options, total: float, connected: bool) -> str:
    if connected:
        return f"no answer within {total:g} s (--timeout) from {opts.host or 'the hosts'} over {opts.shown_broker}"
    return f"could not connect to {opts.shown_broker} within {total:g} s (--timeout)"


def _follow(opts: Options, items: Callable[[LivepatchClient], AsyncIterator[T]],
            show: Callable[[T, int | None], int], *, count: int | None, seconds: float | None) -> None:
    """Print a stream's items until ``count`` were shown, ``seconds`` passed, or Ctrl-C. ``show(item, left)``
    writes one item (at most ``left`` lines of it, when a count is given) and says how many it showed."""
    async def follow(client: LivepatchClient) -> int:
        shown = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                async for item in items(client):
                    shown += show(item, None if count is None else count - shown)
                    sys.stdout.flush()
                    if count is not None and shown >= count:
                        break
        return shown
    try:
        _run(opts, follow, stream=True)
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


def _request(ctx: typer.Context, verb: str, params: dict[str, Any]) -> dict[str, Any]:
    """Send one request; print the reply exactly with --json; exit 1 on an error reply."""
    opts: Options = ctx.obj
    raw: RawReply = _run(opts, lambda c: c.request_raw(verb, params, timeout=remaining(opts.timeout)))
    if opts.json:
        sys.stdout.write(raw.payload + "\n")
    reply = raw.reply
    if not reply.ok:
        error = reply.error
        if not opts.json:
            code, message = (error.code, error.message) if error else ("internal", "error reply")
            details = f" {json.dumps(error.details)}" if error and error.details else ""
            fail(EXIT_ERROR_REPLY, f"{code}: {message}{details}")
        raise typer.Exit(EXIT_ERROR_REPLY)
    if opts.json:
        raise typer.Exit(EXIT_OK)
    return reply.data or {}


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not an integer (decimal, 0x hex, 0o octal or 0b binary)") from None


# -- commands ----------------------------------------------------------------------------------------------------


@app.command()
def hosts(ctx: typer.Context,
          wait: Annotated[float, typer.Option(min=0.05, help="seconds to collect retained statuses, and as long "
                                              "again for discovery answers when there is none (on top of "
                                              "--timeout)")] = 0.5) -> None:
    """List the hosts that announced themselves on this broker: online, stale (no heartbeat for 3 periods) or
    offline."""
    opts: Options = ctx.obj
    found: dict[str, StatusDoc] = _run(opts, lambda c: c.hosts(wait), need_host=False,
                                       budget=opts.timeout + 2 * wait)  # retained, then discovery
    now = time.time()
    if opts.json:
        sys.stdout.write(json.dumps({h: {**s.model_dump(mode="json"), "liveness": s.liveness(now)}
                                     for h, s in found.items()}) + "\n")
        return
    table = Table("host", "state", "boot", "since", "last heartbeat", "version")
    for host, s in found.items():
        live = s.liveness(now)
        table.add_row(host, f"[{LIVENESS_COLOR[live]}]{live}[/]", str(s.boot_seq), s.reason, _beat_age(s, now),
                      s.version)
    out().print(table if found else "no hosts have announced themselves on this broker")


LIVENESS_COLOR = {"online": "green", "stale": "yellow", "offline": "red"}


def _beat_age(doc: StatusDoc, now: float) -> str:
    if doc.heartbeat_at is None:
        return "-"
    return f"{max(0.0, now - doc.heartbeat_at):.1f} s ago (every {doc.heartbeat_s:g} s)"


@app.command()
def status(ctx: typer.Context) -> None:
    """The host's retained status; exit 4 when it is offline, stale (no heartbeat for 3 periods) or unknown."""
    opts: Options = ctx.obj
    doc: StatusDoc | None = _run(opts, lambda c: c.current_status(wait=remaining(2.0)))
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
    data = InfoData.model_validate(_request(ctx, "info", {}))
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
    values = [_int(a) for a in args or []]
    params: dict[str, Any] = {"function": function, "args": values, "cpu": cpu}
    if sympos:
        params["sympos"] = sympos
    data = CallData.model_validate(_request(ctx, "call", params))
    out().print(f"{data.function}({', '.join(str(v) for v in values)}) on cpu {data.cpu} = {data.value} "
                f"({data.value:#x}{f', signed {data.signed}' if data.signed < 0 else ''})")


@app.command()
def symbols(ctx: typer.Context,
            symbol: Annotated[str, typer.Argument(help="a symbol name, or an address (0x…) to describe")],
            sympos: Annotated[int, typer.Option(min=0, help="which of several same-named symbols (1-based)")] = 0,
            ) -> None:
    """Look a symbol up by name, or find the symbol that contains an address."""
    params: dict[str, Any]
    if symbol[:1].isdigit():
        params = {"address": _int(symbol)}
    else:
        params = {"name": symbol, **({"sympos": sympos} if sympos else {})}
    data = SymbolData.model_validate(_request(ctx, "symbol.lookup", params))
    kind = "function" if data.is_func else "object"
    out().print(f"{data.description}  {data.address + data.offset:#x}  {kind}, {data.size} bytes, sympos {data.sympos}")


@app.command()
def tasks(ctx: typer.Context,
          cpu: Annotated[int | None, typer.Option(min=0, help="only this CPU's tasks")] = None) -> None:
    """The kernel's tasks."""
    data = TasksData.model_validate(_request(ctx, "tasks", {} if cpu is None else {"cpu": cpu}))
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


# state/events, the ftrace/trace/hijack and the patch commands live in their own modules, over the helpers above
from clients.cli import ftrace_cmds, observe_cmds, patch_cmds, profile_cmds  # noqa: E402

observe_cmds.install(app)
ftrace_cmds.install(app)
profile_cmds.install(app)
patch_cmds.install(app)


def main() -> None:
    """The ``lpctl`` console script."""
    app()
