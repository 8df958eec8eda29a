"""patch.check end to end (real mosquitto, real daemons and emulators, real compiled example patches): the stalls it
predicts for a loaded patch are exactly the ones its transition then meets — on a daemon with a task asleep in a
patched function, and on fleet hosts carrying each stall fault — and it refuses what it cannot predict."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from mqtt_fixtures import DaemonThread, Mosquitto, run, wait_for
from test_fleet import overrides, running
from test_service_patch import Session, Sleeper, kernel_of, quiet_policy, signed, signer, trusting_settings

from clients.sdk import LivepatchClient, ReplyError
from daemon.fleet.runner import FleetRunner
from daemon.livepatch.artifact import build_patch
from patchformat import signing
from patchformat.manifest import Manifest
from schemas.fleet import FleetSpec


@pytest.fixture(scope="module")
def checkd(mosquitto: Mosquitto, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonThread]:
    """A daemon trusting the test key, with no fake signals (a sleeper holds a transition up until woken)."""
    d = DaemonThread(trusting_settings(tmp_path_factory.mktemp("checkd"), mosquitto.url)).start()
    quiet_policy(d)
    yield d
    d.stop()


def test_no_blocker_predicted_and_none_met_then_refused_once_enabled(checkd: DaemonThread) -> None:
    async def main() -> None:
        async with Session(checkd.url, checkd.host) as s:
            c = s.c
            err = await s.error("patch.check", {"name": "nonexistent"})
            assert err["code"] == "livepatch_not_found"
            err = await s.error("patch.check", {"name": "bad name!"})
            assert err["code"] == "bad_request"
            await c.patch_load(signed("livepatch_cmdline").to_bytes())
            check = await c.patch_check("livepatch_cmdline")
            assert (check.would_block, check.will_stall, check.blockers, check.busy_with) == (False, False, [], None)
            assert check.functions == ["cmdline_proc_show"]
            assert check.tasks_scanned == 12
            assert check.signals is False  # the quiet policy
            change = await c.patch_enable("livepatch_cmdline")
            assert change.completed, "no blocker predicted: the first attempt switched every task"
            err = await s.error("patch.check", {"name": "livepatch_cmdline"})
            assert err["code"] == "livepatch_bad_state"
            assert "already enabled" in err["message"]
            await s.cleanup()
    run(main())


def test_a_sleeper_is_predicted_then_blocks_exactly_as_predicted(checkd: DaemonThread) -> None:
    kernel = kernel_of(checkd)
    sleeper = Sleeper(kernel)

    async def main() -> None:
        async with Session(checkd.url, checkd.host) as s:
            c = s.c
            await c.patch_load(signed("livepatch_sleeper").to_bytes())
            check = await c.patch_check("livepatch_sleeper")
            (b,) = check.blockers
            assert (b.cpu, b.kind, b.reason, b.outcome, b.function) == (
                1, "worker", "interruptible", "stalls", "sleeper_middle"), "no signals: it stalls"
            assert b.why == "sleeping on function sleeper_middle"
            names = [frame.split("+", 1)[0] for frame in b.stack]
            assert names[names.index("sleeper_inner"):names.index("sleeper_outer") + 1] == [
                "sleeper_inner", "sleeper_middle", "sleeper_outer"]
            assert (check.would_block, check.will_stall) == (True, True)
            again = await c.patch_check("livepatch_sleeper")
            assert again == check, "read-only: the same answer twice"
            assert [(p.name, p.enabled) for p in (await c.patch_list()).patches] == [("livepatch_sleeper", False)]

            change = await c.patch_enable("livepatch_sleeper", wait=True, timeout_s=0.5)
            assert not change.completed
            tr = await c.patch_transition("livepatch_sleeper")
            assert {t.pid: t.blocked for t in tr.tasks if t.blocked} == {b.pid: b.why}, "exactly the prediction"
            err = await s.error("patch.check", {"name": "livepatch_sleeper"})
            assert err["code"] == "livepatch_bad_state"

            # another patch while this one is in transition: predicted, and told that enabling must wait
            await c.patch_load(signed("livepatch_cmdline").to_bytes())
            busy = await c.patch_check("livepatch_cmdline")
            assert (busy.busy_with, busy.blockers) == ("livepatch_sleeper", [])
            await c.patch_disable("livepatch_sleeper", wait=True)  # reverses: nothing of it is on a stack
            await c.patch_unload("livepatch_cmdline")
            await c.patch_unload("livepatch_sleeper")
    run(main())
    assert sleeper.wake(5) == 5 + 1 + 10 + 100, "the original ran"


def test_atomic_replace_predicts_the_nop_of_a_function_a_task_sleeps_in(checkd: DaemonThread) -> None:
    """An atomic replace drops (NOPs) what the patches it replaces change: a task asleep in one of their new
    functions blocks it, and the prediction says so."""
    kernel = kernel_of(checkd)

    async def main() -> Sleeper:
        async with Session(checkd.url, checkd.host) as s:
            c = s.c
            await c.patch_load(signed("livepatch_sleeper").to_bytes())
            assert (await c.patch_enable("livepatch_sleeper", wait=True)).completed
            return Sleeper(kernel)  # asleep in livepatch_sleeper_middle now

    sleeper = run(main())

    async def replace() -> None:
        async with Session(checkd.url, checkd.host) as s:
            c = s.c
            await c.patch_load(signed("livepatch_atomic_replace").to_bytes())
            check = await c.patch_check("livepatch_atomic_replace")
            assert check.functions == ["cmdline_proc_show", "livepatch_sleeper_middle"]
            (b,) = check.blockers
            assert (b.function, b.why, b.reason) == ("livepatch_sleeper_middle",
                                                    "sleeping on function livepatch_sleeper_middle", "interruptible")
            assert any("[livepatch_sleeper]" in frame for frame in b.stack), "module frames are named"
            change = await c.patch_enable("livepatch_atomic_replace", wait=True, timeout_s=0.5)
            assert not change.completed
            tr = await c.patch_transition()
            assert {t.pid: t.blocked for t in tr.tasks if t.blocked} == {b.pid: b.why}
            await c.patch_disable("livepatch_atomic_replace", wait=True)
    run(replace())
    assert sleeper.wake(5) == 5 + 1 + 20 + 100, "the replacement ran"

    async def cleanup() -> None:
        async with Session(checkd.url, checkd.host) as s:
            await s.cleanup()
    run(cleanup())


def test_fleet_hosts_with_each_stall_fault(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """Per host: what patch.check predicts, then what the transition does (the daemon's default stall policy:
    fake signals after 1 s, never gives up)."""
    p = f"c{uuid.uuid4().hex[:6]}"
    h = [f"{p}-{i:04d}" for i in range(3)]
    spec = FleetSpec.model_validate({"hosts": 3, "prefix": p, "faults": [
        {"kind": "stall", "hosts": [h[0]], "mode": "interruptible"},
        {"kind": "stall", "hosts": [h[1]], "mode": "uninterruptible"},
    ]})
    runner = FleetRunner(spec, overrides(tmp_path, mosquitto.url, trusted_keys=[str(signer().public_path)],
                                         transition_stall_s=0.3), workers=0)
    sleeper = signed("livepatch_sleeper").to_bytes()

    async def scenario() -> None:
        async with running(runner, mosquitto.url):
            await wait_for(lambda: len(runner.online) == 3, 60)
            for host, reason, outcome in ((h[0], "interruptible", "signal_clears"),
                                          (h[1], "uninterruptible", "stalls"), (h[2], None, None)):
                async with LivepatchClient(mosquitto.url, host, protocol="3.1.1") as c:
                    await c.patch_load(sleeper)
                    check = await c.patch_check("livepatch_sleeper")
                    assert check.signals is True
                    predicted = {b.pid: b.why for b in check.blockers}
                    if reason is None:
                        assert check.blockers == []
                        assert (await c.patch_enable("livepatch_sleeper")).completed, "first attempt"
                        continue
                    (b,) = check.blockers
                    assert (b.reason, b.outcome, b.function, b.kind) == (reason, outcome, "sleeper_middle", "worker")
                    assert check.will_stall is (outcome == "stalls")
                    change = await c.patch_enable("livepatch_sleeper", wait=True, timeout_s=0.5)
                    assert not change.completed
                    assert change.transition is not None
                    assert {t.pid: t.why for t in change.transition.blocked} == predicted, "exactly the prediction"
                    if outcome == "signal_clears":
                        done = await c.wait_transition("livepatch_sleeper", 8)
                        assert not done.in_progress
                        assert (await c.patch_info("livepatch_sleeper")).enabled, "the signal cleared it"
                    else:
                        deadline = time.monotonic() + 8
                        while True:  # past the first fake signals: still blocked by the same task
                            tr = await c.patch_transition("livepatch_sleeper")
                            assert tr.progress is not None
                            if tr.progress.signals_sent >= 2:
                                break
                            assert time.monotonic() < deadline
                            await asyncio.sleep(0.05)
                        assert {t.pid: t.blocked for t in tr.tasks if t.blocked} == predicted, "it stalls"
                        assert tr.progress.stalled
                        with pytest.raises(ReplyError):  # still in transition: nothing to predict
                            await c.patch_check("livepatch_sleeper")
                        await c.patch_disable("livepatch_sleeper", wait=True)
    run(scenario())


LOOP_PATCH = """#include "livepatch.h"

u64 livepatch_getpid_loop(u64 n)
{
	return n + 1;
}
"""


def test_a_task_running_in_the_function_is_predicted_then_blocks(checkd: DaemonThread, tmp_path: Path) -> None:
    """A worker busy in getpid_loop (it parks in cond_resched, inside the function): reason running, it stalls."""
    kernel = kernel_of(checkd)
    manifest = Manifest.from_dict({"name": "livepatch_getpid_loop", "build_id": kernel.image.build_id,
                                   "objects": [{"name": "vmlinux", "funcs": [
                                       {"old_name": "getpid_loop", "new_name": "livepatch_getpid_loop"}]}]})
    bundle = signing.sign(build_patch(LOOP_PATCH, manifest, tmp_path), signer().key).to_bytes()
    n = 200_000_000  # ~20 ns a call: seconds of work, yielding every 4096 calls
    busy = kernel.submit("getpid_loop", n, cpu=1)

    async def main() -> None:
        async with Session(checkd.url, checkd.host) as s:
            c = s.c
            await c.patch_load(bundle)
            check = await c.patch_check("livepatch_getpid_loop")
            (b,) = check.blockers
            assert (b.cpu, b.kind, b.reason, b.outcome, b.function) == (1, "worker", "running", "stalls",
                                                                        "getpid_loop")
            assert any(frame.startswith("getpid_loop+") for frame in b.stack)
            change = await c.patch_enable("livepatch_getpid_loop", wait=True, timeout_s=0.5)
            assert not change.completed
            assert change.transition is not None
            assert {t.pid: t.why for t in change.transition.blocked} == {b.pid: b.why}, "exactly the prediction"
            await c.patch_disable("livepatch_getpid_loop", wait=True)
            await c.patch_unload("livepatch_getpid_loop")
            assert not busy.done(), "it was running all along"
    run(main())
    assert busy.result(120) == n, "the original ran to its end"
