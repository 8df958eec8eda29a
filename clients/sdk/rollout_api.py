"""SDK calls of the orchestrator's rollout verbs, and ``RolloutClient``: a client of the orchestrator.

Each function takes any ``LivepatchClient`` addressed to the orchestrator (host ``_orchestrator``); the
``RolloutClient`` methods are the same calls. Errors come back as ``ReplyError`` with the orchestrator's code
(``rollout_not_found``, ``rollout_bad_state``, ``unknown_host``, ``wave_spec_invalid``, ``bundle_unsigned`` ...).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

from clients.sdk.client import LivepatchClient
from schemas.fleet import Fault
from schemas.rollout import ExecState, Execution, RolloutDoc, RolloutSpec
from schemas.rollout_api import DryRunData, ListData, ReportData, RolloutData, StatusData
from schemas.topics import ORCHESTRATOR, ORCHESTRATOR_EVENTS, rollout_topic


def _spec(spec: RolloutSpec | dict[str, Any]) -> dict[str, Any]:
    return spec.model_dump(mode="json") if isinstance(spec, BaseModel) else dict(spec)


async def create(c: LivepatchClient, spec: RolloutSpec | dict[str, Any]) -> RolloutData:
    return RolloutData.model_validate(await c.request("rollout.create", {"spec": _spec(spec)}))


async def dry_run(c: LivepatchClient, spec: RolloutSpec | dict[str, Any]) -> DryRunData:
    return DryRunData.model_validate(await c.request("rollout.create", {"spec": _spec(spec), "dry_run": True}))


async def control(c: LivepatchClient, action: str, name: str, **params: Any) -> RolloutData:
    """``action``: start, pause, resume, approve (``wave=``), cancel or rollback."""
    body = {"name": name, **{k: v for k, v in params.items() if v is not None}}
    return RolloutData.model_validate(await c.request(f"rollout.{action}", body))


async def status(c: LivepatchClient, name: str, states: Sequence[ExecState | str] = ()) -> StatusData:
    return StatusData.model_validate(await c.request("rollout.status", {"name": name,
                                                                        "states": [str(s) for s in states]}))


async def list_rollouts(c: LivepatchClient) -> ListData:
    return ListData.model_validate(await c.request("rollout.list", {}))


async def report(c: LivepatchClient, name: str) -> ReportData:
    return ReportData.model_validate(await c.request("rollout.report", {"name": name}))


async def rehearse(c: LivepatchClient, spec: RolloutSpec | dict[str, Any],
                   faults: Sequence[Fault | dict[str, Any]] = (), seed: int = 0) -> ReportData:
    body = {"spec": _spec(spec), "seed": seed,
            "faults": [f.model_dump(mode="json") if isinstance(f, BaseModel) else dict(f) for f in faults]}
    return ReportData.model_validate(await c.request("rollout.rehearse", body))


async def watch(c: LivepatchClient, name: str) -> AsyncIterator[RolloutDoc]:
    """The rollout's retained document, then every new version (until the caller stops)."""
    async for doc in c._documents(rollout_topic(name), RolloutDoc, retained=True):
        yield doc


async def execution_changes(c: LivepatchClient, name: str) -> AsyncIterator[Execution]:
    """Every change of one of the rollout's host executions, as the orchestrator announces it on its events topic
    (not retained: ``status`` gives the executions as they are; a change carries a higher ``version``)."""
    async for _, payload in c._stream(ORCHESTRATOR_EVENTS):
        try:
            doc = json.loads(payload)
        except ValueError:
            continue
        if not isinstance(doc, dict) or doc.get("kind") != "execution" or doc.get("rollout") != name:
            continue
        try:
            yield Execution.model_validate(doc)
        except ValidationError:
            continue


class RolloutClient(LivepatchClient):
    """``async with RolloutClient("mqtt://broker:1883") as r: await r.create(spec); await r.start(name)``."""

    def __init__(self, broker: str | Sequence[str] = "mqtt://127.0.0.1:1883", **kwargs: Any) -> None:
        super().__init__(broker, ORCHESTRATOR, **kwargs)

    async def __aenter__(self) -> RolloutClient:
        await super().__aenter__()
        return self

    async def create(self, spec: RolloutSpec | dict[str, Any]) -> RolloutData:
        return await create(self, spec)

    async def dry_run(self, spec: RolloutSpec | dict[str, Any]) -> DryRunData:
        return await dry_run(self, spec)

    async def start(self, name: str) -> RolloutData:
        return await control(self, "start", name)

    async def pause(self, name: str) -> RolloutData:
        return await control(self, "pause", name)

    async def resume(self, name: str) -> RolloutData:
        return await control(self, "resume", name)

    async def approve(self, name: str, wave: int | None = None) -> RolloutData:
        return await control(self, "approve", name, wave=wave)

    async def cancel(self, name: str) -> RolloutData:
        return await control(self, "cancel", name)

    async def rollback(self, name: str) -> RolloutData:
        return await control(self, "rollback", name)

    async def rollout_status(self, name: str, states: Sequence[ExecState | str] = ()) -> StatusData:
        return await status(self, name, states)

    async def rollouts(self) -> list[RolloutDoc]:
        return (await list_rollouts(self)).rollouts

    async def report(self, name: str) -> ReportData:
        return await report(self, name)

    async def rehearse(self, spec: RolloutSpec | dict[str, Any], faults: Sequence[Fault | dict[str, Any]] = (),
                       seed: int = 0) -> ReportData:
        return await rehearse(self, spec, faults, seed)

    async def watch(self, name: str) -> AsyncIterator[RolloutDoc]:
        async for doc in watch(self, name):
            yield doc

    async def execution_changes(self, name: str) -> AsyncIterator[Execution]:
        async for e in execution_changes(self, name):
            yield e

    async def rollout_events(self) -> AsyncIterator[dict[str, Any]]:
        async for _, payload in self._stream(ORCHESTRATOR_EVENTS):
            try:
                doc = json.loads(payload)
            except ValueError:
                continue
            if isinstance(doc, dict):
                yield doc
