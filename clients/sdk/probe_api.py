"""SDK methods of the kprobe verbs (mixed into LivepatchClient)::

    async with LivepatchClient(broker, "web-01") as c:
        await c.probe_add("p:myprobe kpt_leaf+0x8 x0 len=%x1:u64")   # kprobe_events syntax
        await c.call("kpt_leaf", 5)
        print((await c.kprobe_list()).probes[0].hits)                  # 1
        print((await c.kprobe_read()).text, end="")                    # trace lines, the kernel's format
        await c.kprobe_unregister("myprobe")

Each method returns the verb's typed reply data and raises ``ReplyError`` (with the daemon's stable ``code``,
e.g. ``kprobe_refused`` with the reason in ``details``) for an error reply.
"""

from __future__ import annotations

from typing import Any, Protocol

from pydantic import BaseModel

from schemas.kprobes import (
    KprobeListData,
    KprobeReadData,
    KprobeRegisterData,
    KprobeStreamData,
    KprobeUnregisterData,
    parse_probe_definition,
)


class _Client(Protocol):
    async def request(self, verb: str, params: dict[str, Any] | BaseModel | None = None, *,
                      request_id: str | None = None, timeout: float | None = None) -> dict[str, Any]: ...


class ProbeApi:
    """kprobes: register, unregister, list, read."""

    async def kprobe_register(self: _Client, name: str, target: str, *, args: list[dict[str, str]] | None = None,
                              record: bool = False, post: bool = False, set_reg: int | None = None,
                              set_val: int = 0, request_id: str | None = None) -> KprobeRegisterData:
        """Arm a BRK kprobe on ``target`` (``SYMBOL[+OFFSET]`` or ``0x…``); ``args``: ``{"name", "reg", "type"}``
        fetch arguments printed per hit; ``set_reg``/``set_val``: fault injection by the pre handler."""
        params: dict[str, Any] = {"name": name, "target": target, "args": args or [], "record": record,
                                  "post": post, "set_val": set_val}
        if set_reg is not None:
            params["set_reg"] = set_reg
        return KprobeRegisterData.model_validate(await self.request("kprobe.register", params,
                                                                    request_id=request_id))

    async def probe_add(self: _Client, definition: str, *, post: bool = False,
                        request_id: str | None = None) -> KprobeRegisterData:
        """``echo 'p:NAME SYM+OFF [FETCHARGS]' >> kprobe_events`` (ValueError for a line that does not parse)."""
        d = parse_probe_definition(definition)
        params: dict[str, Any] = {"name": d.name, "target": d.target, "post": post,
                                  "args": [a.model_dump() for a in d.args]}
        return KprobeRegisterData.model_validate(await self.request("kprobe.register", params,
                                                                    request_id=request_id))

    async def kprobe_unregister(self: _Client, name: str, *, request_id: str | None = None) -> KprobeUnregisterData:
        return KprobeUnregisterData.model_validate(await self.request("kprobe.unregister", {"name": name},
                                                                      request_id=request_id))

    async def kprobe_list(self: _Client) -> KprobeListData:
        return KprobeListData.model_validate(await self.request("kprobe.list", {}))

    async def kprobe_stream(self: _Client, enable: bool = True) -> KprobeStreamData:
        """Publish probe hits on the trace topic (``trace_batches()`` yields them, ``source == "kprobes"``)."""
        return KprobeStreamData.model_validate(await self.request("kprobe.stream", {"enable": enable}))

    async def kprobe_read(self: _Client) -> KprobeReadData:
        """The recorded hits since the last read (they are drained: a second reader sees only newer ones)."""
        return KprobeReadData.model_validate(await self.request("kprobe.read", {}))
