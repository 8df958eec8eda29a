"""The orchestrator's verbs: each validates its request (``schemas.rollout_api``) and answers a dict."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from clients.rollout import report
from clients.rollout.engine import Engine
from clients.rollout.plan import HostInfo, Plan, make_plan
from clients.rollout.rehearse import rehearse
from schemas.rollout_api import (
    ApproveRequest,
    CreateRequest,
    DryRunData,
    ListData,
    ListRequest,
    NameRequest,
    RehearseRequest,
    ReportData,
    RolloutData,
    StatusData,
    StatusRequest,
)

MAX_CHECK_FUNCTIONS = 256
"""patch.check takes at most this many functions (``PatchCheckRequest.functions``)."""

Handler = Callable[[Engine, dict[str, Any]], Awaitable[dict[str, Any]]]


def _dump(model: Any) -> dict[str, Any]:
    return dict(model.model_dump(mode="json"))


async def create(engine: Engine, body: dict[str, Any]) -> dict[str, Any]:
    req = CreateRequest.model_validate(body)
    if req.dry_run:
        return await dry_run(engine, req)
    doc = await engine.create(req.spec)
    row = engine.store.rollout(req.spec.name)
    return _dump(RolloutData(rollout=doc, plan=None if row is None else
                             {k: v for k, v in row.plan.items() if k not in ("events", "rate")}))


async def dry_run(engine: Engine, req: CreateRequest) -> dict[str, Any]:
    """Resolve targets and bundles (signature present, build ids), check state compatibility, predict stalls on
    the real hosts (``patch.check`` by function: read-only), and project the duration on a fault-free twin;
    nothing is stored and no host is sent anything that changes it."""
    fleet = await engine.driver.fleet()
    plan = make_plan(req.spec, fleet)
    removed = {h: str(d.get("reason")) for h, _w, _b, st, d in plan.rows if st.value == "REMOVED"}
    targets = [h for w in plan.waves for h in w]
    projected = await rehearse(req.spec, {h: fleet[h] for h in targets}, [], req.spec.seed)
    covered = [h for h in targets if h not in removed]
    stalls, unchecked = await _predict(engine, plan, fleet, covered)
    supersedes = {h: olds for h in covered if (olds := fleet[h].replaced_by(plan.bundles[fleet[h].build_id])[0])}
    return _dump(DryRunData(plan=plan.summary(), waves=plan.waves, removed=removed,
                            offline=[h for h in targets if not fleet[h].online],
                            in_transition=[h for h in targets if fleet[h].transition],
                            would_stall=stalls, unchecked=unchecked, supersedes=supersedes,
                            projected_s=projected["duration_s"]))


async def _predict(engine: Engine, plan: Plan, fleet: dict[str, HostInfo],
                   hosts: list[str]) -> tuple[dict[str, list[dict[str, Any]]], dict[str, str]]:
    """patch.check by function (read-only) on every covered online target, a few at a time. For an atomic
    replace, the functions of the patches it would take over are checked too (what its NOP funcs check, from the
    host's retained state: the NOP funcs themselves exist only once the patch is loaded)."""
    stalls: dict[str, list[dict[str, Any]]] = {}
    unchecked: dict[str, str] = {}
    gate = asyncio.Semaphore(32)

    async def one(h: str) -> None:
        info = fleet[h]
        if not info.online:
            unchecked[h] = "offline"
            return
        bundle = plan.bundles[info.build_id]
        funcs = [*bundle.functions, *info.replaced_by(bundle)[1]][:MAX_CHECK_FUNCTIONS]
        async with gate:
            out = await engine.driver.predict(h, funcs)
        if not out.ok:
            unchecked[h] = f"{out.code}: {out.message}"
        elif out.data.get("would_stall"):
            stalls[h] = list(out.data.get("tasks") or [])

    await asyncio.gather(*(one(h) for h in hosts))
    return dict(sorted(stalls.items())), dict(sorted(unchecked.items()))


def _control(action: str) -> Handler:
    async def handler(engine: Engine, body: dict[str, Any]) -> dict[str, Any]:
        req = NameRequest.model_validate(body)
        doc = getattr(engine, action)(req.name)
        return _dump(RolloutData(rollout=doc))

    handler.__name__ = action
    return handler


async def approve(engine: Engine, body: dict[str, Any]) -> dict[str, Any]:
    req = ApproveRequest.model_validate(body)
    return _dump(RolloutData(rollout=engine.approve(req.name, req.wave)))


async def status(engine: Engine, body: dict[str, Any]) -> dict[str, Any]:
    req = StatusRequest.model_validate(body)
    doc = engine.doc(req.name)
    execs = [e for e in engine.executions(req.name) if not req.states or e.state in req.states]
    return _dump(StatusData(rollout=doc, executions=execs))


async def list_(engine: Engine, body: dict[str, Any]) -> dict[str, Any]:
    ListRequest.model_validate(body)
    return _dump(ListData(rollouts=[engine.doc(n) for n in engine.store.names()]))


async def report_(engine: Engine, body: dict[str, Any]) -> dict[str, Any]:
    req = NameRequest.model_validate(body)
    engine.doc(req.name)  # rollout_not_found first
    doc = report.build(engine.store, req.name)
    return _dump(ReportData(report=doc, markdown=report.markdown(doc)))


async def rehearse_(engine: Engine, body: dict[str, Any]) -> dict[str, Any]:
    req = RehearseRequest.model_validate(body)
    doc = await rehearse(req.spec, await engine.driver.fleet(), req.faults, req.seed)
    return _dump(ReportData(report=doc, markdown=report.markdown(doc)))


VERBS: dict[str, Handler] = {
    "rollout.create": create,
    "rollout.start": _control("start"),
    "rollout.pause": _control("pause"),
    "rollout.resume": _control("resume"),
    "rollout.approve": approve,
    "rollout.cancel": _control("cancel"),
    "rollout.rollback": _control("rollback"),
    "rollout.status": status,
    "rollout.list": list_,
    "rollout.report": report_,
    "rollout.rehearse": rehearse_,
}
