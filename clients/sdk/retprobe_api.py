"""SDK methods of the kretprobe and fprobe verbs (mixed into LivepatchClient)::

    async with LivepatchClient(broker, "web-01") as c:
        await c.retprobe_add("r8:leafret kpt_leaf $retval")             # kprobe_events syntax: a kretprobe
        await c.retprobe_add("f:steps work_step_*%return")              # fprobe_events syntax, globs
        await c.call("kpt_leaf", 5)
        print((await c.kprobe_read()).text, end="")                      # kretprobe returns: kprobe.read
        print((await c.fprobe_read()).text, end="")                      # fprobe entries and exits
        await c.kretprobe_unregister("leafret")

Each method returns the verb's typed reply data and raises ``ReplyError`` (``kprobe_refused``, ``ftrace_error``
for ``save_regs``, ...) for an error reply.
"""

from __future__ import annotations

from typing import Any, Protocol

from pydantic import BaseModel

from schemas.retprobes import (
    FprobeListData,
    FprobeReadData,
    FprobeRegisterData,
    FprobeUnregisterData,
    KretprobeListData,
    KretprobeRegisterData,
    KretprobeUnregisterData,
    parse_retprobe_definition,
)


class _Client(Protocol):
    async def request(self, verb: str, params: dict[str, Any] | BaseModel | None = None, *,
                      request_id: str | None = None, timeout: float | None = None) -> dict[str, Any]: ...


class RetprobeApi:
    """kretprobes and fprobes: register, unregister, list (and read, for fprobes)."""

    async def kretprobe_register(self: _Client, name: str, target: str, *, maxactive: int = 10,
                                 trampoline: str = "brk", record: bool = True,
                                 request_id: str | None = None) -> KretprobeRegisterData:
        """A kretprobe on function ``target``; ``trampoline``: ``brk`` (genuine pt_regs) or ``rethook``."""
        params = {"name": name, "target": target, "maxactive": maxactive, "trampoline": trampoline,
                  "record": record}
        return KretprobeRegisterData.model_validate(await self.request("kretprobe.register", params,
                                                                       request_id=request_id))

    async def kretprobe_unregister(self: _Client, name: str, *,
                                   request_id: str | None = None) -> KretprobeUnregisterData:
        return KretprobeUnregisterData.model_validate(await self.request("kretprobe.unregister", {"name": name},
                                                                         request_id=request_id))

    async def kretprobe_list(self: _Client) -> KretprobeListData:
        return KretprobeListData.model_validate(await self.request("kretprobe.list", {}))

    async def fprobe_register(self: _Client, name: str, filter: str, *, exit: bool = True, record: bool = True,
                              flags: list[str] | None = None, request_id: str | None = None) -> FprobeRegisterData:
        """An fprobe on every function ``filter`` (globs) selects; ``flags``: ``save_regs`` is refused."""
        params = {"name": name, "filter": filter, "exit": exit, "record": record, "flags": flags or []}
        return FprobeRegisterData.model_validate(await self.request("fprobe.register", params,
                                                                    request_id=request_id))

    async def fprobe_unregister(self: _Client, name: str, *, request_id: str | None = None) -> FprobeUnregisterData:
        return FprobeUnregisterData.model_validate(await self.request("fprobe.unregister", {"name": name},
                                                                      request_id=request_id))

    async def fprobe_list(self: _Client) -> FprobeListData:
        return FprobeListData.model_validate(await self.request("fprobe.list", {}))

    async def fprobe_read(self: _Client) -> FprobeReadData:
        """The fprobe records since the last read (drained)."""
        return FprobeReadData.model_validate(await self.request("fprobe.read", {}))

    async def retprobe_add(self: _Client, definition: str, *, trampoline: str = "brk",
                           request_id: str | None = None) -> KretprobeRegisterData | FprobeRegisterData:
        """An ``r[N]:NAME SYM`` or ``f:NAME GLOB[%return]`` line (ValueError for one that does not parse)."""
        d = parse_retprobe_definition(definition)
        if d.kind == "r":
            params: dict[str, Any] = {"name": d.name, "target": d.target, "trampoline": trampoline}
            if d.maxactive is not None:
                params["maxactive"] = d.maxactive
            return KretprobeRegisterData.model_validate(await self.request("kretprobe.register", params,
                                                                           request_id=request_id))
        return FprobeRegisterData.model_validate(await self.request(
            "fprobe.register", {"name": d.name, "filter": d.target, "exit": d.exit}, request_id=request_id))
