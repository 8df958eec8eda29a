"""What every lpctl command shares: its options, its consoles, and running one SDK call within the command's
deadline, with lpctl's messages and exit codes (the command modules and ``clients.cli.main`` import this; it
imports none of them)."""

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
from typing import NoReturn, TypeVar
from urllib.parse import urlsplit, urlunsplit

import typer
from rich.console import Console

from clients.cli.deadline import Deadline
from clients.sdk import (
    BrokerUnreachable,
    LivepatchClient,
    ReplyError,
    RequestTimeout,
    SdkError,
    SubscriptionFailed,
    capture_replies,
)

T = TypeVar("T")
C = TypeVar("C", bound=contextlib.AbstractAsyncContextManager[object])

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
    client_id: str | None = None

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


def _client(opts: Options, *, need_host: bool = True) -> LivepatchClient:
    if need_host and not opts.host:
        fail(EXIT_USAGE, "no host given", "pass --host HOST or set LPCTL_HOST (lpctl hosts lists them)")
    tls = tls_or_fail(opts)
    try:
        return LivepatchClient(opts.broker, opts.host, timeout=opts.timeout, protocol=opts.protocol.value,
                               tls_context=tls, client_id=opts.client_id)
    except ValueError as exc:
        fail(EXIT_USAGE, str(exc))


def tls_or_fail(opts: Options) -> ssl.SSLContext | None:
    """The TLS context of the options; exit 2 when its files cannot be loaded."""
    try:
        return opts.tls_context()
    except (OSError, ssl.SSLError) as exc:
        fail(EXIT_USAGE, f"cannot load the TLS files: {exc}", "check --tls-ca, --tls-cert and --tls-key")


def run(opts: Options, work: Callable[[LivepatchClient], Awaitable[T]], *, need_host: bool = True,
        budget: float | None = None, stream: bool = False) -> T:
    """Connect, run ``work``, disconnect, within ``budget`` seconds (default ``--timeout``) in all: connecting to
    every node, reconnecting and waiting for replies included. A ``stream`` (events, trace follow) runs until it
    ends; only its connection is bounded. Past the budget the command exits 3, even when a thread is stuck in
    a blocking connect: a watchdog ends the process two seconds later."""
    return run_client(opts, _client(opts, need_host=need_host), work, budget=budget, stream=stream)


def run_client(opts: Options, client: C, work: Callable[[C], Awaitable[T]], *, budget: float | None = None,
               stream: bool = False) -> T:
    """``run`` with a client of the caller's (a ``FleetClient``, say): the same deadline, messages and exit
    codes."""
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
             "(--broker, LPCTL_BROKER); a broker that binds client ids to user names needs --client-id <user>")
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


def follow(opts: Options, items: Callable[[LivepatchClient], AsyncIterator[T]],
            show: Callable[[T, int | None], int], *, count: int | None, seconds: float | None) -> None:
    """Print a stream's items until ``count`` were shown, ``seconds`` passed, or Ctrl-C. ``show(item, left)``
    writes one item (at most ``left`` lines of it, when a count is given) and says how many it showed."""
    async def each(client: LivepatchClient) -> int:
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
        run(opts, each, stream=True)
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


def call_verb(ctx: typer.Context, work: Callable[[LivepatchClient], Awaitable[T]], *,
              budget: float | None = None, reply_timeout: float | None = None,
              json_exit: Callable[[T], int] | None = None) -> T:
    """Run one typed SDK call (``lambda c: c.info()``: each verb's parameters are written once, in the SDK) and
    return its result. With --json, print the reply exactly as it arrived instead and exit: 1 for an error reply,
    else ``json_exit(result)`` (default 0); without, an error reply prints its code and message and exits 1.
    ``reply_timeout`` (default: what is left of --timeout) bounds the wait for the reply, ``budget`` the command."""
    opts: Options = ctx.obj

    async def typed(client: LivepatchClient) -> tuple[T | None, ReplyError | None, str | None]:
        # by default the reply's wait ends before the command's deadline: its timeout is the one reported
        client.timeout = reply_timeout if reply_timeout is not None else remaining(opts.timeout)
        with capture_replies() as replies:
            try:
                result: T | None = await work(client)
                error: ReplyError | None = None
            except ReplyError as exc:
                result, error = None, exc
        return result, error, replies[-1].payload if replies else None
    result, error, payload = run(opts, typed, budget=budget)
    if opts.json:
        if payload is not None:
            sys.stdout.write(payload + "\n")
        if error is not None:
            raise typer.Exit(EXIT_ERROR_REPLY)
        raise typer.Exit(json_exit(result) if json_exit is not None and result is not None else EXIT_OK)
    if error is not None:
        details = f" {json.dumps(error.details)}" if error.details else ""
        fail(EXIT_ERROR_REPLY, f"{error.code}: {error.message}{details}")
    assert result is not None
    return result


def parse_int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not an integer (decimal, 0x hex, 0o octal or 0b binary)") from None
