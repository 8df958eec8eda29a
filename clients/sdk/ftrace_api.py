"""SDK methods of the ftrace, trace and hijack verbs (mixed into LivepatchClient)::

    async with LivepatchClient(broker, "web-01") as c:
        await c.ops_register("steps", filter="work_step_*")            # counts calls in the guest
        await c.call("work_chain", 1)
        print((await c.ops_list()).ops[0].hits)                        # 4
        print(await c.enabled_functions_text())                        # exactly as tracefs prints it
        await c.trace_start("work_step_*")
        async for batch in c.trace_batches():                          # the trace topic, as it is published
            print(*batch.lines, sep="\\n")
        await c.hijack_create("work_step_c", "ftrace_stub")            # work_step_c(x) now returns x
        await c.hijack_delete("work_step_c")

Each method returns the verb's typed reply data and raises ``ReplyError`` (with the daemon's stable ``code``)
for an error reply.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Literal, Protocol

from pydantic import BaseModel

from schemas import Topics
from schemas.ftrace import (
    MAX_PAGE,
    AvailableData,
    EnabledData,
    HijackData,
    HijackListData,
    OpsData,
    OpsListData,
    ProfileReadData,
    ProfileStartData,
    ProfileStopData,
    SysctlData,
    TraceBatchDoc,
    TraceReadData,
    TraceStartData,
    TraceStopData,
)


class _Client(Protocol):
    """What the mixin needs from LivepatchClient."""

    async def request(self, verb: str, params: dict[str, Any] | BaseModel | None = None, *,
                      request_id: str | None = None, timeout: float | None = None) -> dict[str, Any]: ...

    async def _subscribe(self, topic: str, *, again: bool = False) -> None: ...

    def _stream(self, topic: str, *, retained: bool = False) -> AsyncIterator[tuple[str, bytes]]: ...

    def _topics(self) -> Topics: ...


def _params(**values: Any) -> dict[str, Any]:
    """Request parameters without the ones left unset (None): the daemon applies its defaults."""
    return {k: v for k, v in values.items() if v is not None}


class FtraceApi:
    """ftrace ops, tracefs views, the function tracer and hijacks."""

    # -- ops -------------------------------------------------------------------------------------------------

    async def ops_register(self: _Client, name: str, *, filter: str | None = None, notrace: str | None = None,
                           callback: Literal["count", "nop"] = "count", recursion: bool = False,
                           request_id: str | None = None) -> OpsData:
        """Register ops ``name`` with a guest callback (``count`` or ``nop``) on the functions ``filter`` selects
        (set_ftrace_filter syntax; None: every function) minus ``notrace``."""
        params = _params(name=name, filter=filter, notrace=notrace, callback=callback, recursion=recursion or None)
        return OpsData.model_validate(await self.request("ftrace.ops.register", params, request_id=request_id))

    async def ops_unregister(self: _Client, name: str, *, request_id: str | None = None) -> OpsData:
        return OpsData.model_validate(await self.request("ftrace.ops.unregister", {"name": name},
                                                         request_id=request_id))

    async def ops_list(self: _Client) -> OpsListData:
        return OpsListData.model_validate(await self.request("ftrace.ops.list", {}))

    async def ops_filter(self: _Client, name: str, *, filter: str | None = None, notrace: str | None = None,
                         reset: bool = True, request_id: str | None = None) -> OpsData:
        """Change the filter and/or notrace set of a registered ops; ``reset=False`` adds to the current set."""
        params = _params(name=name, filter=filter, notrace=notrace, reset=reset)
        return OpsData.model_validate(await self.request("ftrace.ops.filter", params, request_id=request_id))

    # -- tracefs views ---------------------------------------------------------------------------------------

    async def available_filter_functions(self: _Client, pattern: str | None = None, *, offset: int = 0,
                                         limit: int = 1000) -> AvailableData:
        """One page of available_filter_functions (``pattern``: a glob on the name)."""
        params = _params(pattern=pattern, offset=offset, limit=limit)
        return AvailableData.model_validate(await self.request("ftrace.available_filter_functions", params))

    async def available_functions(self: _Client, pattern: str | None = None) -> list[str]:
        """Every line of available_filter_functions (matching ``pattern``), page after page."""
        names: list[str] = []
        offset: int | None = 0
        while offset is not None:
            page = AvailableData.model_validate(await self.request(
                "ftrace.available_filter_functions", _params(pattern=pattern, offset=offset, limit=MAX_PAGE)))
            names += page.functions
            offset = page.next_offset
        return names

    async def enabled_functions(self: _Client, *, touched: bool = False, offset: int = 0,
                                limit: int = MAX_PAGE) -> EnabledData:
        """One page of enabled_functions (``touched``: touched_functions), in the kernel's text format."""
        params = _params(touched=touched or None, offset=offset, limit=limit)
        return EnabledData.model_validate(await self.request("ftrace.enabled_functions", params))

    async def enabled_functions_text(self: _Client, *, touched: bool = False) -> str:
        """The whole enabled_functions (or touched_functions) file, page after page."""
        parts: list[str] = []
        offset: int | None = 0
        while offset is not None:
            page = EnabledData.model_validate(await self.request(
                "ftrace.enabled_functions", _params(touched=touched or None, offset=offset, limit=MAX_PAGE)))
            parts.append(page.text)
            offset = page.next_offset
        return "".join(parts)

    async def ftrace_sysctl(self: _Client, ftrace_enabled: bool | None = None, *,
                            request_id: str | None = None) -> SysctlData:
        """kernel.ftrace_enabled: read it (no argument) or set it (False: every traced call site off)."""
        return SysctlData.model_validate(await self.request(
            "ftrace.sysctl", _params(ftrace_enabled=ftrace_enabled), request_id=request_id))

    # -- the function tracer ---------------------------------------------------------------------------------

    async def trace_start(self: _Client, filter: str | None = None, *, notrace: str | None = None,
                          entries_per_cpu: int | None = None,
                          tracer: Literal["function", "function_graph"] = "function",
                          graph_function: str | None = None, graph_notrace: str | None = None,
                          request_id: str | None = None) -> TraceStartData:
        """Start the function tracer (or ``tracer="function_graph"``: entries and returns with durations) on the
        functions ``filter`` selects (None: every function). function_graph only: ``graph_function``
        (set_graph_function) records only what runs inside those functions, ``graph_notrace``
        (set_graph_notrace) leaves those functions and what they call out."""
        params = _params(filter=filter, notrace=notrace, entries_per_cpu=entries_per_cpu,
                         tracer=None if tracer == "function" else tracer, graph_function=graph_function,
                         graph_notrace=graph_notrace)
        return TraceStartData.model_validate(await self.request("trace.start", params, request_id=request_id))

    async def trace_read(self: _Client, *, limit: int | None = None) -> TraceReadData:
        """The records drained since the last read (up to ``limit``): trace lines and structured records."""
        return TraceReadData.model_validate(await self.request("trace.read", _params(limit=limit)))

    async def trace_stop(self: _Client, *, limit: int | None = None, request_id: str | None = None) -> TraceStopData:
        """Stop the function tracer; returns the records not read yet."""
        return TraceStopData.model_validate(await self.request("trace.stop", _params(limit=limit),
                                                               request_id=request_id))

    # -- the function profiler -------------------------------------------------------------------------------

    async def profile_start(self: _Client, filter: str | None = None, *,
                            request_id: str | None = None) -> ProfileStartData:
        """Count the calls of each function ``filter`` selects (None: every function), in the guest."""
        return ProfileStartData.model_validate(await self.request("profile.start", _params(filter=filter),
                                                                  request_id=request_id))

    async def profile_read(self: _Client, *, limit: int | None = None) -> ProfileReadData:
        """Calls per function so far (trace_stat/function), most called first."""
        return ProfileReadData.model_validate(await self.request("profile.read", _params(limit=limit)))

    async def profile_stop(self: _Client, *, limit: int | None = None,
                           request_id: str | None = None) -> ProfileStopData:
        """Stop the function profiler; returns the final counts."""
        return ProfileStopData.model_validate(await self.request("profile.stop", _params(limit=limit),
                                                                 request_id=request_id))

    async def trace_batches(self: _Client, *, subscribed: Callable[[], None] | None = None
                            ) -> AsyncIterator[TraceBatchDoc]:
        """The trace topic: each batch of records the daemon publishes while the function tracer runs.

        ``subscribed`` is called once the subscription is in place: batches published after that are received.
        """
        topic = self._topics().trace
        await self._subscribe(topic)
        if subscribed is not None:
            subscribed()
        async for _, payload in self._stream(topic):
            yield TraceBatchDoc.model_validate_json(payload)

    # -- hijacks ---------------------------------------------------------------------------------------------

    async def hijack_create(self: _Client, function: str, target: str, *,
                            mode: Literal["ipmodify", "direct"] = "ipmodify", name: str | None = None,
                            sympos: int = 0, target_sympos: int = 0, request_id: str | None = None) -> HijackData:
        """Redirect ``function`` to ``target`` (a function name or hex address), or, with ``mode="direct"``,
        send its calls through direct trampoline ``target``."""
        params = _params(function=function, target=target, mode=mode, name=name, sympos=sympos or None,
                         target_sympos=target_sympos or None)
        return HijackData.model_validate(await self.request("hijack.create", params, request_id=request_id))

    async def hijack_delete(self: _Client, name: str | None = None, *, function: str | None = None,
                            sympos: int = 0, request_id: str | None = None) -> HijackData:
        """Remove a hijack by ``name``, or by the hijacked ``function``."""
        params = _params(name=name, function=function, sympos=sympos or None)
        return HijackData.model_validate(await self.request("hijack.delete", params, request_id=request_id))

    async def hijack_list(self: _Client) -> HijackListData:
        return HijackListData.model_validate(await self.request("hijack.list", {}))
