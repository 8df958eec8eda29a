"""One host's execution, advanced one host call at a time: the state machine the engine drives.

==============  ================  ===============================================================================
phase           host call         then
==============  ================  ===============================================================================
load            patch.load        ``check`` (stall prediction asked for) or ``enable``; a refusal: REJECTED
check           patch.check       ``enable``; would stall: ask again later (``wait``) or unload and REMOVE (``skip``)
enable          patch.enable      ``transition`` (TRANSITIONING)
transition      patch.transition  SUCCEEDED (or ``supersede`` / ``verify``); blocked past ``wait_s``: STALLED; past
                                  ``wait_s + then_wait_s``: ``revert`` or patch.force; past ``transition_s``: revert,
                                  TIMED_OUT
supersede       patch.list,       an atomic replace is in: unload the patches it replaced (as Linux frees them at
                patch.unload      the transition's end, the host then holds only the new cumulative patch); then
                                  ``verify`` or done
verify          patch.effect      VERIFIED once the replacement ran and the old function did not; SUCCEEDED after
                                  ``VERIFY_TRIES`` polls without proof
revert          patch.disable     ``revert_wait`` -> ``revert_unload`` -> the failure the revert was for
rb_disable      patch.disable     ``rb_wait`` -> ``rb_unload`` -> REVERTED (a rollback)
skip_unload     patch.unload      REMOVED (the prediction said it would stall)
done            —                 terminal
==============  ================  ===============================================================================

Each call carries the request id ``<rollout>:<host>:<phase>:<attempt>``: re-sent after a crash or a lost reply,
the host answers it from its journal instead of acting twice. A failure retries (from ``load``, or ``enable``
when the bundle is already loaded) while the spec's retry rule for its type allows, after an exponential backoff
with a jitter drawn from ``(seed, host, attempt)`` — the same run gives the same delays.

An atomic replace reverted (its own transition reversed) leaves the patches it was replacing enabled, as in
Linux; one rolled back once in (disable + unload) leaves the host unpatched — what it replaced was unloaded at
``supersede``, and disabling a cumulative patch returns to the original code, not to the patch before it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from clients.rollout.driver import REJECT_CODES, TIMEOUT, HostDriver, Outcome, TransitionView
from clients.rollout.store import ExecRow
from schemas.rollout import ExecState, RolloutSpec

VERIFY_TRIES = 5
BUSY = "livepatch_transition_busy"      # another transition on that host: try again, it is not a failure
BAD_STATE = "livepatch_bad_state"       # "already loaded" / "already enabled" / "not enabled"
NOT_FOUND = "livepatch_not_found"


@dataclass(frozen=True)
class StepContext:
    spec: RolloutSpec
    bundles: dict[str, str]  # build id -> base64 bundle
    now: float
    poll_s: float = 1.0
    replace: frozenset[str] = frozenset()  # build ids whose bundle is an atomic replace


def request_id(e: ExecRow, phase: str) -> str:
    return f"{e.rollout}:{e.host}:{phase}:{e.attempts}"


def _done(e: ExecRow, state: ExecState, **details: Any) -> None:
    e.state, e.phase = state, "done"
    e.details.update(details)


def _goto(e: ExecRow, phase: str, ctx: StepContext, *, state: ExecState | None = None, delay: float = 0.0) -> None:
    e.phase, e.phase_at, e.next_at = phase, ctx.now, ctx.now + delay
    if state is not None:
        e.state = state


def _later(e: ExecRow, ctx: StepContext) -> None:
    e.next_at = ctx.now + ctx.poll_s


def backoff(spec: RolloutSpec, host: str, attempt: int, base_s: float, jitter: float) -> float:
    """``base_s`` × 2^(attempt-1), stretched by up to ``jitter`` (a seeded draw: replays give the same delay)."""
    u = random.Random(f"{spec.seed}/{host}/{attempt}").random()
    return float(base_s * 2 ** (attempt - 1) * (1 + jitter * u))


def fail(e: ExecRow, kind: ExecState, ctx: StepContext, code: str | None, message: str | None) -> None:
    """End the execution as ``kind`` — or queue it again when a retry rule for ``kind`` has attempts left."""
    e.details["error"] = {"code": code, "message": message, "phase": e.phase}
    for rule in ctx.spec.retries:
        if rule.failure_type in (kind.value, "ALL") and e.attempts < rule.retries:
            e.attempts += 1
            e.details.setdefault("failures", []).append({"state": kind.value, "code": code})
            restart = "enable" if e.details.get("loaded") else "load"
            _goto(e, restart, ctx, state=ExecState.QUEUED,
                  delay=backoff(ctx.spec, e.host, e.attempts, rule.backoff_s, rule.jitter))
            return
    _done(e, kind)


def _refused(e: ExecRow, out: Outcome, ctx: StepContext) -> None:
    """A failed load/enable reply: timed out, refused for good, or failed."""
    if out.code == TIMEOUT:
        fail(e, ExecState.TIMED_OUT, ctx, out.code, f"no reply to {e.phase} in time")
    elif out.code in REJECT_CODES:
        _done(e, ExecState.REJECTED, error={"code": out.code, "message": out.message, "phase": e.phase})
    else:
        fail(e, ExecState.FAILED, ctx, out.code, out.message)


async def advance(e: ExecRow, ctx: StepContext, driver: HostDriver) -> None:
    """One step of ``e`` (mutated in place; the caller saves it)."""
    t = ctx.spec.timeouts
    if (e.started_at is not None and e.phase in ("load", "check", "enable", "transition")
            and ctx.now - e.started_at > t.in_progress_s):
        e.details["timeout"] = "in_progress"
        if e.details.get("enabled"):
            e.details["revert_for"] = ExecState.TIMED_OUT.value
            _goto(e, "revert", ctx)
        else:
            fail(e, ExecState.TIMED_OUT, ctx, TIMEOUT, f"not done within in_progress_s={t.in_progress_s:g}")
            return
    await _PHASES[e.phase](e, ctx, driver)


async def _load(e: ExecRow, ctx: StepContext, driver: HostDriver) -> None:
    if e.started_at is None:
        e.started_at = ctx.now
    e.state = ExecState.IN_PROGRESS
    out = await driver.load(e.host, ctx.bundles[e.build_id or ""], request_id(e, "load"), ctx.spec.timeouts.load_s)
    if out.ok or (e.attempts and out.code == BAD_STATE and "already loaded" in (out.message or "")):
        e.details["loaded"] = True
        _goto(e, "enable" if ctx.spec.stall.predict == "proceed" else "check", ctx)
    else:
        _refused(e, out, ctx)


async def _check(e: ExecRow, ctx: StepContext, driver: HostDriver) -> None:
    out = await driver.check(e.host, ctx.spec.patch)
    if not out.ok:
        fail(e, ExecState.FAILED, ctx, out.code, out.message)
        return
    tasks = out.data.get("tasks") or []
    e.details["prediction"] = {"would_stall": bool(out.data.get("would_stall")), "tasks": tasks[:10]}
    if not out.data.get("would_stall"):
        _goto(e, "enable", ctx)
    elif ctx.spec.stall.predict == "skip":
        _goto(e, "skip_unload", ctx)
    else:
        _later(e, ctx)  # "wait": ask again until clear (the in-progress timeout bounds it)


async def _enable(e: ExecRow, ctx: StepContext, driver: HostDriver) -> None:
    e.state = ExecState.IN_PROGRESS
    out = await driver.enable(e.host, ctx.spec.patch, request_id(e, "enable"), ctx.spec.timeouts.enable_s)
    if out.ok or (e.attempts and out.code == BAD_STATE and "already enabled" in (out.message or "")):
        e.details["enabled"] = True
        _goto(e, "transition", ctx, state=ExecState.TRANSITIONING)
    elif out.code == BUSY:
        _later(e, ctx)
    else:
        _refused(e, out, ctx)


async def _transition(e: ExecRow, ctx: StepContext, driver: HostDriver) -> None:
    view = await driver.transition(e.host, ctx.spec.patch)
    waited = ctx.now - (e.phase_at or ctx.now)
    stall, t = ctx.spec.stall, ctx.spec.timeouts
    if isinstance(view, Outcome):
        if view.code != TIMEOUT:
            fail(e, ExecState.FAILED, ctx, view.code, view.message)
            return
    elif view.completed:
        if not view.enabled:  # the host's own stall policy reversed it
            e.details["revert_for"] = ExecState.REVERTED.value
            e.details["reverted_by"] = "host"
            _goto(e, "revert_unload", ctx)
        elif (e.build_id or "") in ctx.replace:
            _goto(e, "supersede", ctx, state=ExecState.SUCCEEDED)
        else:
            _succeeded(e, ctx)
        return
    else:
        e.details["signals_sent"] = view.signals_sent
        if waited >= stall.wait_s and e.state is not ExecState.STALLED:
            e.state = ExecState.STALLED
            e.details.update(stalled=True, blocked=view.blocked[:10], stalled_at=ctx.now)
    if waited >= t.transition_s:
        e.details["revert_for"] = ExecState.TIMED_OUT.value
        e.details["timeout"] = "transition"
        _goto(e, "revert", ctx)
    elif waited >= stall.wait_s + stall.then_wait_s and e.state is ExecState.STALLED:
        if stall.action == "force" and not e.details.get("forced"):
            out = await driver.force(e.host, ctx.spec.patch, request_id(e, "force"))
            e.details["forced"] = out.ok
            _later(e, ctx)
        else:
            e.details["revert_for"] = ExecState.REVERTED.value
            _goto(e, "revert", ctx)
    else:
        _later(e, ctx)


def _succeeded(e: ExecRow, ctx: StepContext) -> None:
    if ctx.spec.verify:
        _goto(e, "verify", ctx, state=ExecState.SUCCEEDED)
    else:
        _done(e, ExecState.SUCCEEDED)


async def _supersede(e: ExecRow, ctx: StepContext, driver: HostDriver) -> None:
    """Unload what the atomic replace took over (replaced: disabled, never to be enabled again). A module that
    cannot go (forced once: Linux keeps it for good) is noted, not a failure: the new patch is in."""
    out = await driver.patches(e.host)
    if not out.ok:
        _retry_cleanup(e, ctx, out)
        return
    gone: list[str] = e.details.setdefault("superseded", [])
    kept: dict[str, str] = e.details.setdefault("superseded_kept", {})
    for p in out.data.get("patches") or []:
        name = str(p.get("name"))
        if not p.get("replaced") or p.get("enabled") or name == ctx.spec.patch or name in gone or name in kept:
            continue
        r = await driver.unload(e.host, name, f"{e.rollout}:{e.host}:supersede:{name}:{e.attempts}")
        if r.ok or r.code == NOT_FOUND:
            gone.append(name)
        elif r.code in (TIMEOUT, BUSY):
            _retry_cleanup(e, ctx, r)
            return
        else:
            kept[name] = f"{r.code}: {r.message}"
    if not kept:
        e.details.pop("superseded_kept")
    _succeeded(e, ctx)


def _retry_cleanup(e: ExecRow, ctx: StepContext, out: Outcome) -> None:
    tries = int(e.details.get("supersede_tries", 0)) + 1
    e.details["supersede_tries"] = tries
    if tries < VERIFY_TRIES:
        _later(e, ctx)
    else:  # the patch is in; what it replaced stays loaded (disabled, replaced) and is said so
        e.details["supersede_error"] = {"code": out.code, "message": out.message}
        _succeeded(e, ctx)


async def _verify(e: ExecRow, ctx: StepContext, driver: HostDriver) -> None:
    out = await driver.effect(e.host, ctx.spec.patch)
    tries = int(e.details.get("verify_tries", 0)) + 1
    e.details["verify_tries"] = tries
    if out.ok and out.data.get("verified"):
        _done(e, ExecState.VERIFIED, effect=out.data)
    elif tries >= VERIFY_TRIES:
        _done(e, ExecState.SUCCEEDED, effect=out.data if out.ok else {"error": out.code})
    else:
        _later(e, ctx)


async def _disable(e: ExecRow, ctx: StepContext, driver: HostDriver, wait_phase: str, unload_phase: str) -> None:
    out = await driver.disable(e.host, ctx.spec.patch, request_id(e, e.phase))
    if out.ok:
        _goto(e, wait_phase, ctx)
    elif out.code == BAD_STATE:  # not enabled (any more): straight to the unload
        _goto(e, unload_phase, ctx)
    else:
        _retry_undo(e, ctx, out)


async def _wait_disabled(e: ExecRow, ctx: StepContext, driver: HostDriver, unload_phase: str) -> None:
    view = await driver.transition(e.host, ctx.spec.patch)
    gone = isinstance(view, Outcome) and view.code == NOT_FOUND
    if gone or (isinstance(view, TransitionView) and view.completed and not view.enabled):
        _goto(e, unload_phase, ctx)
    else:
        _later(e, ctx)


async def _unload(e: ExecRow, ctx: StepContext, driver: HostDriver) -> Outcome:
    out = await driver.unload(e.host, ctx.spec.patch, request_id(e, e.phase))
    if out.ok or out.code == NOT_FOUND:
        e.details["loaded"] = False
        e.details["enabled"] = False
        return Outcome(ok=True)
    return out


def _retry_undo(e: ExecRow, ctx: StepContext, out: Outcome) -> None:
    """An undo step (disable/unload) that failed: try again a few times, then give up as FAILED."""
    tries = int(e.details.get("undo_tries", 0)) + 1
    e.details["undo_tries"] = tries
    if out.code in (TIMEOUT, BUSY) and tries < VERIFY_TRIES:
        _later(e, ctx)
    else:
        _done(e, ExecState.FAILED, undo_error={"code": out.code, "message": out.message, "phase": e.phase})


async def _revert(e: ExecRow, ctx: StepContext, driver: HostDriver) -> None:
    await _disable(e, ctx, driver, "revert_wait", "revert_unload")


async def _revert_wait(e: ExecRow, ctx: StepContext, driver: HostDriver) -> None:
    await _wait_disabled(e, ctx, driver, "revert_unload")


async def _revert_unload(e: ExecRow, ctx: StepContext, driver: HostDriver) -> None:
    out = await _unload(e, ctx, driver)
    if not out.ok:
        _retry_undo(e, ctx, out)
        return
    kind = ExecState(e.details.pop("revert_for", ExecState.REVERTED.value))
    if kind is ExecState.REVERTED:
        _done(e, kind)
    else:
        fail(e, kind, ctx, TIMEOUT, "timed out; reverted")


async def _rb_disable(e: ExecRow, ctx: StepContext, driver: HostDriver) -> None:
    await _disable(e, ctx, driver, "rb_wait", "rb_unload")


async def _rb_wait(e: ExecRow, ctx: StepContext, driver: HostDriver) -> None:
    await _wait_disabled(e, ctx, driver, "rb_unload")


async def _rb_unload(e: ExecRow, ctx: StepContext, driver: HostDriver) -> None:
    out = await _unload(e, ctx, driver)
    if out.ok:
        _done(e, ExecState.REVERTED, rolled_back=True)
    else:
        _retry_undo(e, ctx, out)


async def _skip_unload(e: ExecRow, ctx: StepContext, driver: HostDriver) -> None:
    out = await _unload(e, ctx, driver)
    if out.ok:
        _done(e, ExecState.REMOVED, reason="patch.check predicted a stall (stall.predict=skip)", code="would_stall")
    else:
        _retry_undo(e, ctx, out)


async def _terminal(e: ExecRow, ctx: StepContext, driver: HostDriver) -> None:
    return None


_PHASES = {
    "load": _load, "check": _check, "enable": _enable, "transition": _transition, "supersede": _supersede,
    "verify": _verify,
    "revert": _revert, "revert_wait": _revert_wait, "revert_unload": _revert_unload,
    "rb_disable": _rb_disable, "rb_wait": _rb_wait, "rb_unload": _rb_unload, "skip_unload": _skip_unload,
    "done": _terminal,
}
UNDO_PHASES = frozenset({"rb_disable", "rb_wait", "rb_unload"})
