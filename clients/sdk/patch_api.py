"""SDK methods of the live-patch verbs (mixed into LivepatchClient)::

    async with LivepatchClient(broker, "web-01") as c:
        loaded = await c.patch_load(Path("livepatch_cmdline.lpb"))     # a signed bundle file (or its bytes)
        change = await c.patch_enable(loaded.name)                      # replies once the transition started
        if not change.completed:
            await c.wait_transition(loaded.name, timeout=60)           # TransitionTimeout if it does not finish
        print((await c.call_read("proc_cmdline_read")).text)
        await c.patch_disable(loaded.name, wait=True)
        await c.patch_unload(loaded.name)

The methods are named ``patch_*`` (``info`` and ``list`` would clash with the client's own ``info`` and with
the builtin); each returns the verb's typed reply data and raises ``ReplyError`` for an error reply.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

from clients.sdk.errors import SdkError
from schemas.livepatch import (
    CallReadData,
    PatchChangeData,
    PatchInfoData,
    PatchListData,
    PatchLoadData,
    PatchTransitionData,
    PatchUnloadData,
)
from schemas.patch_insight import PatchCheckData, PatchEffectData

WAIT_MARGIN_S = 5.0
"""Extra seconds a ``wait=True`` request waits for its reply beyond the transition's own timeout."""


class TransitionTimeout(SdkError):
    """``wait_transition``: the transition was still in progress at the deadline (``last``: its last progress)."""

    def __init__(self, message: str, last: PatchTransitionData) -> None:
        super().__init__(message)
        self.last = last


class _Requester(Protocol):
    """What the mixin needs from LivepatchClient."""

    timeout: float

    async def request(self, verb: str, params: dict[str, Any] | BaseModel | None = None, *,
                      request_id: str | None = None, timeout: float | None = None) -> dict[str, Any]: ...


class PatchApi:
    """Live patches: load, enable, disable, unload, list, info, force, transition progress."""

    async def patch_load(self: _Requester, bundle: bytes | str | Path, *,
                         request_id: str | None = None) -> PatchLoadData:
        """Load a signed bundle: its file's bytes, or a path (``str`` or ``Path``) to the file."""
        raw = bundle if isinstance(bundle, bytes) else Path(bundle).read_bytes()
        data = await self.request("patch.load", {"bundle": base64.b64encode(raw).decode()}, request_id=request_id)
        return PatchLoadData.model_validate(data)

    async def patch_enable(self: _Requester, name: str, *, wait: bool = False, timeout_s: float = 10.0,
                           request_id: str | None = None) -> PatchChangeData:
        """Start the patching transition; with ``wait``, the daemon replies when it ended (or after ``timeout_s``:
        check ``completed``)."""
        return await _change(self, "patch.enable", name, wait=wait, timeout_s=timeout_s, request_id=request_id)

    async def patch_disable(self: _Requester, name: str, *, wait: bool = False, timeout_s: float = 10.0,
                            request_id: str | None = None) -> PatchChangeData:
        """Start the unpatching transition (or reverse the patch's own transition in progress)."""
        return await _change(self, "patch.disable", name, wait=wait, timeout_s=timeout_s, request_id=request_id)

    async def patch_force(self: _Requester, name: str, *, request_id: str | None = None) -> PatchChangeData:
        """Force the patch's transition to complete without stack checks (its module can then never unload)."""
        return PatchChangeData.model_validate(await self.request("patch.force", {"name": name},
                                                                 request_id=request_id))

    async def patch_unload(self: _Requester, name: str, *, request_id: str | None = None) -> PatchUnloadData:
        return PatchUnloadData.model_validate(await self.request("patch.unload", {"name": name},
                                                                 request_id=request_id))

    async def patch_list(self: _Requester) -> PatchListData:
        return PatchListData.model_validate(await self.request("patch.list", {}))

    async def patch_info(self: _Requester, name: str) -> PatchInfoData:
        return PatchInfoData.model_validate(await self.request("patch.info", {"name": name}))

    async def patch_transition(self: _Requester, name: str | None = None) -> PatchTransitionData:
        """The transition in progress (of ``name`` only, when given), task by task."""
        params = {} if name is None else {"name": name}
        return PatchTransitionData.model_validate(await self.request("patch.transition", params))

    async def transition_progress(self: _Requester, name: str | None = None, *,
                                  poll_s: float = 0.1) -> AsyncIterator[PatchTransitionData]:
        """Poll ``patch.transition`` every ``poll_s`` seconds, yielding each answer, until no transition (of
        ``name``) is in progress (that last answer is yielded too)."""
        async for data in _progress(self, name, poll_s):
            yield data

    async def wait_transition(self: _Requester, name: str | None = None, timeout: float = 60.0, *,
                              poll_s: float = 0.1) -> PatchTransitionData:
        """Wait until the transition of ``name`` (or any) has ended; ``TransitionTimeout`` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        last: PatchTransitionData | None = None
        async for last in _progress(self, name, poll_s):
            if not last.in_progress:
                return last
            if time.monotonic() >= deadline:
                break
        assert last is not None
        progress = last.progress
        blocked = "; ".join(f"pid {b.pid} ({b.comm}): {b.why}" for b in progress.blocked) if progress else ""
        raise TransitionTimeout(f"the transition of {name or 'the patch'} is still in progress after {timeout} s"
                                + (f" — blocked: {blocked}" if blocked else ""), last)

    async def patch_check(self: _Requester, name: str) -> PatchCheckData:
        """Predict the stalls of a loaded, not yet enabled patch: which tasks would block its transition now, why,
        and whether a fake signal would clear them (read-only)."""
        return PatchCheckData.model_validate(await self.request("patch.check", {"name": name}))

    async def patch_check_functions(self: _Requester, functions: list[tuple[str, int]]) -> PatchCheckData:
        """The same prediction before anything is loaded: for a patch replacing ``functions`` ((name, sympos))."""
        body = {"functions": [{"name": n, "sympos": p} for n, p in functions]}
        return PatchCheckData.model_validate(await self.request("patch.check", body))

    async def patch_effect(self: _Requester, name: str) -> PatchEffectData:
        """An enabled patch's effect: calls each replacement function took (guest-side counters), whether the
        original functions ran since the transition completed, and ``verified``."""
        return PatchEffectData.model_validate(await self.request("patch.effect", {"name": name}))

    async def call_read(self: _Requester, function: str, *, size: int = 4096, cpu: int = 0,
                        sympos: int = 0) -> CallReadData:
        """Call a reader ``function(buf, size)`` (like ``proc_cmdline_read``) and return the text it wrote."""
        params: dict[str, Any] = {"function": function, "size": size, "cpu": cpu}
        if sympos:
            params["sympos"] = sympos
        return CallReadData.model_validate(await self.request("call.read", params))


async def _progress(client: _Requester, name: str | None, poll_s: float) -> AsyncIterator[PatchTransitionData]:
    while True:
        data = PatchTransitionData.model_validate(
            await client.request("patch.transition", {} if name is None else {"name": name}))
        yield data
        if not data.in_progress:
            return
        await asyncio.sleep(poll_s)


async def _change(client: _Requester, verb: str, name: str, *, wait: bool, timeout_s: float,
                  request_id: str | None) -> PatchChangeData:
    params: dict[str, Any] = {"name": name, "wait": wait, "timeout_s": timeout_s}
    timeout = max(client.timeout, timeout_s + WAIT_MARGIN_S) if wait else None
    return PatchChangeData.model_validate(await client.request(verb, params, request_id=request_id, timeout=timeout))


__all__ = ["PatchApi", "TransitionTimeout"]
