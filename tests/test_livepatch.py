"""Livepatch on the real emulated kernel with real compiled patches: the scenarios of Linux's
tools/testing/selftests/livepatch (kernel-mechanics §7.10)."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.errors import (
    CallbackFailed,
    FtraceBusy,
    PatchFtraceFailed,
    PatchIncompatible,
    PatchInUse,
    PatchStateError,
    TransitionBusy,
)
from daemon.ftrace import tracefs
from daemon.ftrace.core import Ftrace
from daemon.ftrace.ops import FtraceOps, OpsFlag
from daemon.ftrace.tracer import FunctionTracer
from daemon.guest import abi
from daemon.guest.build import IMAGE_PATH
from daemon.kernel.kernel import Kernel, load_image
from daemon.livepatch import examples, sysfs
from daemon.livepatch.core import Livepatch
from daemon.livepatch.transition import GiveUp, StallPolicy
from patchformat.bundle import PatchBundle
from patchformat.manifest import Manifest

ORIGINAL_CMDLINE = "console=ttyAMA0 root=/dev/vda rw livepatchd.emulated=1\n"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PatchBundle]:
    build_id = load_image(IMAGE_PATH)[0].build_id
    out = examples.build_examples(tmp_path_factory.mktemp("patches"), build_id)
    # the atomic-replace example without its replace flag: a second patch stacked on the same function
    m = out["livepatch_atomic_replace"].manifest
    stacked = Manifest.from_dict({**m.to_dict(), "name": "livepatch_stacked", "replace": False})
    out["livepatch_stacked"] = PatchBundle(stacked, out["livepatch_atomic_replace"].object)
    return out


@pytest.fixture
def lp(kernel: Kernel) -> Livepatch:
    return Livepatch(kernel, Ftrace(kernel), policy=StallPolicy(retry_interval=0.02, signal_after=None))


def cmdline(k: Kernel) -> str:
    return k.read_string("proc_cmdline_read")


def klp_log(lp: Livepatch, patch: str) -> list[str]:
    mod = lp.patch(patch).module
    addr = mod.addr("klp_log")
    n = lp.kernel.memory.read_u64(addr)
    return lp.kernel.memory.read(addr + 8, n).decode().splitlines()


def transcript(lp: Livepatch, since: int = 0) -> list[str]:
    return lp.log[since:]


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.005)


# -- test-livepatch.sh ------------------------------------------------------------------------------------------


def test_basic_function_patching(lp: Livepatch, bundles: dict[str, PatchBundle]) -> None:
    k = lp.kernel
    assert cmdline(k) == ORIGINAL_CMDLINE
    lp.load(bundles["livepatch_cmdline"])
    lp.enable("livepatch_cmdline")
    assert cmdline(k) == "livepatch_cmdline: this has been live patched\n"
    assert transcript(lp) == [
        "livepatch: enabling patch 'livepatch_cmdline'",
        "livepatch: 'livepatch_cmdline': initializing patching transition",
        "livepatch: 'livepatch_cmdline': starting patching transition",
        "livepatch: 'livepatch_cmdline': completing patching transition",
        "livepatch: 'livepatch_cmdline': patching complete",
    ]
    line = tracefs.enabled_functions(lp.ftrace)
    assert line.startswith("cmdline_proc_show (1)   I   O M \tops: 0x")
    assert line.endswith(f"({k.kallsyms.describe(k.kallsyms.addr('klp_ftrace_handler'))})\n")
    view = sysfs.patch_view(lp, "livepatch_cmdline")
    assert (view["enabled"], view["transition"], view["objects"]["vmlinux"]) == (
        1, 0, {"patched": 1, "funcs": ["cmdline_proc_show,1"]})
    assert all(t.patch_state == "idle" and not t.pending for t in lp.task_states())
    lp.disable("livepatch_cmdline")
    assert cmdline(k) == ORIGINAL_CMDLINE
    assert transcript(lp)[5:] == [
        "livepatch: 'livepatch_cmdline': initializing unpatching transition",
        "livepatch: 'livepatch_cmdline': starting unpatching transition",
        "livepatch: 'livepatch_cmdline': completing unpatching transition",
        "livepatch: 'livepatch_cmdline': unpatching complete",
    ]
    assert tracefs.enabled_functions(lp.ftrace) == ""
    lp.unload("livepatch_cmdline")
    assert lp.patches == []
    assert "livepatch_cmdline_proc_show" not in lp.ftrace.by_name


def test_multiple_livepatches_removed_lifo(lp: Livepatch, bundles: dict[str, PatchBundle]) -> None:
    k = lp.kernel
    lp.load(bundles["livepatch_cmdline"])
    lp.enable("livepatch_cmdline")
    lp.load(bundles["livepatch_stacked"])
    lp.enable("livepatch_stacked")
    stacked_text = cmdline(k)
    assert stacked_text not in (ORIGINAL_CMDLINE, "livepatch_cmdline: this has been live patched\n")
    assert [sysfs.patch_view(lp, n)["stack_order"] for n in ("livepatch_cmdline", "livepatch_stacked")] == [1, 2]
    assert "cmdline_proc_show (1)" in tracefs.enabled_functions(lp.ftrace), "one klp ops for both patches"
    with pytest.raises(PatchInUse):
        lp.unload("livepatch_stacked")
    lp.disable("livepatch_stacked")
    assert cmdline(k) == "livepatch_cmdline: this has been live patched\n", "the patch below runs again"
    lp.unload("livepatch_stacked")
    lp.disable("livepatch_cmdline")
    assert cmdline(k) == ORIGINAL_CMDLINE
    lp.unload("livepatch_cmdline")


def test_atomic_replace(lp: Livepatch, bundles: dict[str, PatchBundle]) -> None:
    k = lp.kernel
    lp.load(bundles["livepatch_cmdline"])
    lp.enable("livepatch_cmdline")
    lp.load(bundles["livepatch_demo_target"])
    lp.enable("livepatch_demo_target")
    assert k.call("klp_demo_target", 7) == 37
    lp.load(bundles["livepatch_atomic_replace"])
    lp.enable("livepatch_atomic_replace")
    replaced_text = cmdline(k)
    assert replaced_text not in (ORIGINAL_CMDLINE, "livepatch_cmdline: this has been live patched\n")
    assert k.call("klp_demo_target", 7) == 22, "a function the replace patch does not carry reverts (NOP func)"
    for old in ("livepatch_cmdline", "livepatch_demo_target"):
        view = sysfs.patch_view(lp, old)
        assert (view["enabled"], view["replaced"]) == (0, True)
    assert "klp_demo_target" not in tracefs.enabled_functions(lp.ftrace), "the NOP func's ops is gone"
    lp.unload("livepatch_cmdline")  # replaced patches unload without being disabled
    lp.unload("livepatch_demo_target")
    with pytest.raises(PatchStateError):
        lp.enable("livepatch_atomic_replace")
    with pytest.raises(PatchStateError):  # what a restart restores applies to disabled patches only
        lp.mark_replaced("livepatch_atomic_replace")
    lp.disable("livepatch_atomic_replace")
    assert cmdline(k) == ORIGINAL_CMDLINE
    assert k.call("klp_demo_target", 7) == 22
    lp.unload("livepatch_atomic_replace")
    assert tracefs.enabled_functions(lp.ftrace) == ""


# -- test-callbacks.sh ------------------------------------------------------------------------------------------


def test_callbacks_run_in_order(lp: Livepatch, bundles: dict[str, PatchBundle]) -> None:
    lp.load(bundles["livepatch_callbacks_demo"])
    lp.enable("livepatch_callbacks_demo")
    assert klp_log(lp, "livepatch_callbacks_demo") == ["pre_patch_callback: vmlinux", "post_patch_callback: vmlinux"]
    lp.disable("livepatch_callbacks_demo")
    assert klp_log(lp, "livepatch_callbacks_demo")[2:] == ["pre_unpatch_callback: vmlinux",
                                                            "post_unpatch_callback: vmlinux"]


def test_failing_pre_patch_cancels_the_enable(lp: Livepatch, bundles: dict[str, PatchBundle]) -> None:
    k = lp.kernel
    patch = lp.load(bundles["livepatch_callbacks_demo"])
    k.memory.write_u32(patch.module.addr("pre_patch_ret"), (-19) & 0xFFFF_FFFF)
    with pytest.raises(CallbackFailed) as err:
        lp.enable("livepatch_callbacks_demo")
    assert err.value.errno == -19
    assert transcript(lp) == [
        "livepatch: enabling patch 'livepatch_callbacks_demo'",
        "livepatch: 'livepatch_callbacks_demo': initializing patching transition",
        "livepatch: pre-patch callback failed for object 'vmlinux'",
        "livepatch: failed to enable patch 'livepatch_callbacks_demo'",
        "livepatch: canceling patching transition, going to unpatch",
    ]
    assert klp_log(lp, "livepatch_callbacks_demo") == ["pre_patch_callback: vmlinux"]
    assert not patch.enabled
    assert lp.transition is None
    assert tracefs.enabled_functions(lp.ftrace) == ""
    assert all(t.patch_state == "idle" for t in lp.task_states())
    lp.unload("livepatch_callbacks_demo")


def sleep_in_sleeper(k: Kernel) -> tuple[int, object]:
    flag = k.host_buffer.alloc(8)
    k.memory.write_u64(flag, 0)
    fut = k.submit("sleeper_outer", flag, cpu=1)
    wait_until(lambda: any(t.waiting and t.kind == "worker" and t.cpu == 1 for t in k.tasks()))
    return flag, fut


def wake(k: Kernel, flag: int, value: int = 5) -> None:
    k.memory.write_u64(flag, value)
    k.machine.kick(1)


def test_busy_task_stalls_the_transition_until_it_leaves(lp: Livepatch, bundles: dict[str, PatchBundle]) -> None:
    k = lp.kernel
    flag, fut = sleep_in_sleeper(k)
    lp.load(bundles["livepatch_sleeper"])
    lp.enable("livepatch_sleeper", wait=False)
    assert not lp.wait(0.3), "a task sleeps in sleeper_middle: the transition must wait"
    view = sysfs.patch_view(lp, "livepatch_sleeper")
    assert view["transition"] == 1
    assert list(view["progress"]["blocked"].values()) == ["sleeping on function sleeper_middle"]
    states = {t.pid: t for t in lp.task_states()}
    sleeper = int(next(iter(view["progress"]["blocked"])))
    assert states[sleeper].patch_state == "unpatched"
    assert states[sleeper].pending
    assert all(t.patch_state == "patched" for pid, t in states.items() if pid != sleeper)
    lp.load(bundles["livepatch_cmdline"])
    with pytest.raises(TransitionBusy):
        lp.enable("livepatch_cmdline")  # one transition at a time
    wake(k, flag)
    assert fut.result(5) == 5 + 1 + 10 + 100, "the sleeper finished in the original function"  # type: ignore[attr-defined]
    assert lp.wait(5)
    assert klp_log(lp, "livepatch_sleeper") == ["pre_patch_callback: vmlinux", "post_patch_callback: vmlinux"]
    flag2 = k.host_buffer.alloc(8)
    k.memory.write_u64(flag2, 7)
    assert k.call("sleeper_outer", flag2) == 7 + 1 + 20 + 100, "new calls run the patched sleeper_middle"


def test_disabling_a_stalled_patch_reverses_the_transition(lp: Livepatch, bundles: dict[str, PatchBundle]) -> None:
    k = lp.kernel
    flag, fut = sleep_in_sleeper(k)
    lp.load(bundles["livepatch_sleeper"])
    lp.enable("livepatch_sleeper", wait=False)
    assert not lp.wait(0.2)
    mark = len(lp.log)
    lp.disable("livepatch_sleeper")
    assert transcript(lp, mark)[0] == \
        "livepatch: 'livepatch_sleeper': reversing transition from patching to unpatching"
    assert transcript(lp, mark)[-1] == "livepatch: 'livepatch_sleeper': unpatching complete"
    assert klp_log(lp, "livepatch_sleeper") == ["pre_patch_callback: vmlinux", "post_unpatch_callback: vmlinux"], \
        "a reversed patching transition runs post_unpatch only (test_klp_callbacks_busy)"
    assert not lp.patch("livepatch_sleeper").enabled
    assert tracefs.enabled_functions(lp.ftrace) == ""
    wake(k, flag)
    assert fut.result(5) == 116  # type: ignore[attr-defined]


def test_fake_signals_move_stragglers(kernel: Kernel, bundles: dict[str, PatchBundle]) -> None:
    lp = Livepatch(kernel, Ftrace(kernel), policy=StallPolicy(retry_interval=0.02, signal_after=0.1))
    flag, fut = sleep_in_sleeper(kernel)
    lp.load(bundles["livepatch_sleeper"])
    lp.enable("livepatch_sleeper", timeout=5)
    assert lp.transition is None
    assert "livepatch: signaling remaining tasks" in lp.log
    # the interrupted job restarted after its kernel exit, now in the patched function
    wake(kernel, flag)
    assert fut.result(5) == 5 + 1 + 20 + 100  # type: ignore[attr-defined]


def test_give_up_reverts_a_stalled_patch(kernel: Kernel, bundles: dict[str, PatchBundle]) -> None:
    policy = StallPolicy(retry_interval=0.02, signal_after=None, give_up_after=0.2, give_up=GiveUp.REVERT)
    lp = Livepatch(kernel, Ftrace(kernel), policy=policy)
    flag, fut = sleep_in_sleeper(kernel)
    lp.load(bundles["livepatch_sleeper"])
    lp.enable("livepatch_sleeper", timeout=5)
    assert not lp.patch("livepatch_sleeper").enabled
    assert "livepatch: 'livepatch_sleeper': reversing transition from patching to unpatching" in lp.log
    wake(kernel, flag)
    assert fut.result(5) == 116  # type: ignore[attr-defined]


def test_force_completes_and_pins_the_module(lp: Livepatch, bundles: dict[str, PatchBundle]) -> None:
    k = lp.kernel
    lp.load(bundles["livepatch_sleeper"])
    lp.enable("livepatch_sleeper")
    flag, fut = sleep_in_sleeper(k)  # now asleep in the new function
    lp.disable("livepatch_sleeper", wait=False)
    assert not lp.wait(0.2)
    assert "sleeping on function livepatch_sleeper_middle" in sysfs.patch_view(lp, "livepatch_sleeper")[
        "progress"]["blocked"].values()
    lp.force("livepatch_sleeper")
    assert lp.transition is None
    assert "livepatch: forcing remaining tasks to the patched state" in lp.log
    assert lp.patch("livepatch_sleeper").forced
    with pytest.raises(PatchInUse):
        lp.unload("livepatch_sleeper")
    wake(k, flag)
    assert fut.result(5) == 5 + 1 + 20 + 100  # type: ignore[attr-defined]


# -- test-state.sh ----------------------------------------------------------------------------------------------


def test_system_states(lp: Livepatch, bundles: dict[str, PatchBundle]) -> None:
    lp.load(bundles["livepatch_state"])
    lp.enable("livepatch_state")
    lp.load(bundles["livepatch_state2"])
    lp.enable("livepatch_state2")  # cumulative, takes state 1 over at version 2
    assert lp.patch("livepatch_state").replaced
    lp.unload("livepatch_state")
    lp.load(bundles["livepatch_state3"])
    lp.enable("livepatch_state3")  # compatible: also version 2
    lp.unload("livepatch_state2")
    mark = len(lp.log)
    lp.load(bundles["livepatch_state"])
    with pytest.raises(PatchIncompatible) as err:
        lp.enable("livepatch_state")  # version 1 cannot replace version 2
    assert err.value.details == {"patch": "livepatch_state", "state": 1, "installed": 2, "offered": 1}
    assert transcript(lp, mark)[-1] == ("livepatch: Livepatch patch (livepatch_state) is not compatible with the "
                                        "already installed livepatches.")
    assert lp.patch("livepatch_state3").enabled
    assert lp.transition is None


# -- test-syscall.sh --------------------------------------------------------------------------------------------


def test_every_task_calling_the_syscall_transitions(lp: Livepatch, bundles: dict[str, PatchBundle]) -> None:
    k = lp.kernel
    patch = lp.load(bundles["livepatch_syscall"])
    loadgens = [t.pid for t in k.tasks() if t.kind == "loadgen"]
    pids = patch.module.addr("klp_pids")
    k.memory.write(pids, struct.pack(f"<{len(loadgens)}Q", *loadgens))
    k.set_load(abi.LOADGEN_MIX)
    try:
        lp.enable("livepatch_syscall", timeout=10)

        def npids() -> int:
            return sum(1 for p in struct.unpack(f"<{abi.MAX_TASKS}Q", k.memory.read(pids, 8 * abi.MAX_TASKS)) if p)
        wait_until(lambda: npids() == 0)
    finally:
        k.set_load(abi.LOADGEN_OFF)
    assert k.load_stats()["errors"] == 0
    lp.disable("livepatch_syscall")
    lp.unload("livepatch_syscall")


# -- test-ftrace.sh / test-kprobe.sh ----------------------------------------------------------------------------


def enable_refused_by_ftrace(lp: Livepatch) -> None:
    """Enabling livepatch_cmdline fails to register its ftrace handler (-EBUSY) and is cancelled."""
    with pytest.raises(PatchFtraceFailed) as err:
        lp.enable("livepatch_cmdline")
    assert err.value.errno == -16
    assert "livepatch: failed to register ftrace handler for function 'cmdline_proc_show' (-16)" in lp.log
    assert lp.log[-1] == "livepatch: canceling patching transition, going to unpatch"
    assert not lp.patch("livepatch_cmdline").enabled


def test_ipmodify_conflict_refuses_the_patch(lp: Livepatch, bundles: dict[str, PatchBundle]) -> None:
    k = lp.kernel
    hijack = FtraceOps("probe", "ftrace_redirect_call", flags=OpsFlag.IPMODIFY, private=k.kallsyms.addr("ftrace_stub"))
    lp.ftrace.set_filter(hijack, "cmdline_proc_show")
    lp.ftrace.register(hijack)
    lp.load(bundles["livepatch_cmdline"])
    enable_refused_by_ftrace(lp)
    lp.ftrace.unregister(hijack)
    lp.enable("livepatch_cmdline")
    assert cmdline(k) == "livepatch_cmdline: this has been live patched\n"


def test_ftrace_enabled_sysctl_and_livepatch(lp: Livepatch, bundles: dict[str, PatchBundle]) -> None:
    """test-ftrace.sh, part 1: with kernel.ftrace_enabled=0 a patch cannot be enabled (-16), with 1 it can,
    and while it is enabled the sysctl cannot be cleared."""
    k = lp.kernel
    original = cmdline(k)
    lp.ftrace.set_enabled(False)
    lp.load(bundles["livepatch_cmdline"])
    enable_refused_by_ftrace(lp)
    assert cmdline(k) == original
    lp.ftrace.set_enabled(True)
    lp.enable("livepatch_cmdline")
    assert cmdline(k) == "livepatch_cmdline: this has been live patched\n"
    with pytest.raises(FtraceBusy):
        lp.ftrace.set_enabled(False)
    assert cmdline(k) == "livepatch_cmdline: this has been live patched\n"
    lp.disable("livepatch_cmdline")
    lp.ftrace.set_enabled(False)
    assert cmdline(k) == original


def test_tracing_the_livepatched_function(lp: Livepatch, bundles: dict[str, PatchBundle]) -> None:
    k = lp.kernel
    lp.load(bundles["livepatch_cmdline"])
    lp.enable("livepatch_cmdline")
    assert "livepatch_cmdline_proc_show [livepatch_cmdline]" in tracefs.available_filter_functions(lp.ftrace)
    tracer = FunctionTracer(lp.ftrace, filter="livepatch_cmdline_proc_show")
    tracer.start()
    assert cmdline(k) == "livepatch_cmdline: this has been live patched\n"
    records = tracer.stop()
    assert len(records) == 1
    line = tracefs.trace(lp.ftrace, records).splitlines()[-1]
    assert line.endswith(": livepatch_cmdline_proc_show <-proc_cmdline_read")
    with pytest.raises(PatchInUse):
        lp.unload("livepatch_cmdline")


# -- sysfs ------------------------------------------------------------------------------------------------------


def test_sysfs_files(lp: Livepatch, bundles: dict[str, PatchBundle]) -> None:
    lp.load(bundles["livepatch_cmdline"])
    assert sysfs.files(lp) == [
        ("livepatch_cmdline/enabled", "-rw-r--r--", "0\n"),
        ("livepatch_cmdline/transition", "-r--r--r--", "0\n"),
        ("livepatch_cmdline/replace", "-r--r--r--", "0\n"),
        ("livepatch_cmdline/stack_order", "-r--r--r--", "1\n"),
        ("livepatch_cmdline/force", "--w-------", ""),
        ("livepatch_cmdline/vmlinux/patched", "-r--r--r--", "0\n"),
    ]
    lp.enable("livepatch_cmdline")
    assert [c for _, _, c in sysfs.files(lp)] == ["1\n", "0\n", "0\n", "1\n", "", "1\n"]
    with pytest.raises(PatchStateError):
        lp.enable("livepatch_cmdline")
    with pytest.raises(PatchStateError):
        lp.force("livepatch_cmdline")


# -- under load -------------------------------------------------------------------------------------------------


@pytest.fixture
def checkers(kernel: Kernel) -> Iterator[Callable[[], list[int]]]:
    """Workers on every vCPU calling klp_demo_target in a loop, counting old / new / wrong results."""
    counts = [kernel.host_buffer.alloc(24) for _ in range(kernel.config.nr_cpus)]
    for c in counts:
        kernel.memory.write(c, bytes(24))
    stop = False
    futures: list[object] = []

    def run(cpu: int) -> None:
        if not stop:
            f = kernel.submit("klp_check_loop", 20_000, counts[cpu], cpu=cpu)
            f.add_done_callback(lambda _f: run(cpu))
            futures.append(f)

    for cpu in range(kernel.config.nr_cpus):
        run(cpu)

    def totals() -> list[int]:
        out = [0, 0, 0]
        for c in counts:
            for i, v in enumerate(struct.unpack("<3Q", kernel.memory.read(c, 24))):
                out[i] += v
        return out

    yield totals
    stop = True
    for f in list(futures):
        f.result(30)  # type: ignore[attr-defined]


def test_enable_disable_1000_times_under_load(lp: Livepatch, bundles: dict[str, PatchBundle],
                                              checkers: Callable[[], list[int]], tmp_path: Path) -> None:
    lp.load(bundles["livepatch_demo_target"])
    for _ in range(1000):
        lp.enable("livepatch_demo_target", timeout=10)
        lp.disable("livepatch_demo_target", timeout=10)
    old, new, wrong = checkers()
    assert wrong == 0
    assert old > 0
    assert new > 0
    lp.kernel.machine.check()
    # once a transition is complete only one version runs
    lp.enable("livepatch_demo_target")
    assert lp.kernel.call("klp_demo_target", 10) == 52
    lp.disable("livepatch_demo_target")
    assert lp.kernel.call("klp_demo_target", 10) == 31


# -- test-shadow-vars.sh (through the livepatch core) -----------------------------------------------------------


def test_shadow_variables_of_a_loaded_patch(lp: Livepatch, bundles: dict[str, PatchBundle]) -> None:
    patch = lp.load(bundles["livepatch_shadow_vars"])
    assert lp.kernel.call(patch.module.addr("shadow_selftest")) == 0
    log = klp_log(lp, "livepatch_shadow_vars")
    assert any("klp_shadow_get" in line for line in log)
    assert lp.shadow.count == 0, "the selftest frees everything it allocated"
    lp.shadow.synchronize()
    assert lp.shadow.quarantined == 0


def test_enabling_during_its_unpatching_transition_reverses_it(lp: Livepatch, bundles: dict[str, PatchBundle]) -> None:
    events: list[tuple[str, dict[str, object]]] = []
    lp.subscribe(lambda kind, data: events.append((kind, data)))
    k = lp.kernel
    lp.load(bundles["livepatch_sleeper"])
    lp.enable("livepatch_sleeper")
    flag, fut = sleep_in_sleeper(k)  # asleep in the new function: unpatching must wait for it
    lp.disable("livepatch_sleeper", wait=False)
    assert not lp.wait(0.2)
    lp.enable("livepatch_sleeper", timeout=5)
    assert lp.transition is None
    assert lp.patch("livepatch_sleeper").enabled
    assert "livepatch: 'livepatch_sleeper': reversing transition from unpatching to patching" in lp.log
    kinds = [kind for kind, _ in events]
    assert kinds == ["loaded", "transition_started", "transition_complete", "transition_started",
                     "transition_reversed", "transition_started", "transition_complete"]
    assert events[-1][1]["target"] == "patched"
    wake(k, flag)
    assert fut.result(5) == 5 + 1 + 20 + 100  # type: ignore[attr-defined]


def test_the_driver_reports_a_stall_once_then_the_policy_reversal(kernel: Kernel,
                                                                  bundles: dict[str, PatchBundle]) -> None:
    policy = StallPolicy(retry_interval=0.02, signal_after=None, give_up_after=0.4, give_up=GiveUp.REVERT)
    lp = Livepatch(kernel, Ftrace(kernel), policy=policy, stall_after_s=0.1)
    events: list[tuple[str, dict[str, object]]] = []
    lp.subscribe(lambda kind, data: events.append((kind, data)))
    flag, fut = sleep_in_sleeper(kernel)
    lp.load(bundles["livepatch_sleeper"])
    lp.enable("livepatch_sleeper", timeout=5)
    kinds = [kind for kind, _ in events]
    assert kinds == ["loaded", "transition_started", "transition_stalled", "transition_reversed",
                     "transition_started", "transition_complete"]
    data = dict(events)
    blocked = data["transition_stalled"]["blocked"]
    assert isinstance(blocked, dict)
    assert list(blocked.values()) == ["sleeping on function sleeper_middle"]
    assert {t.pid: t.cpu for t in kernel.tasks()}[next(iter(blocked))] == 1
    assert data["transition_stalled"]["target"] == "patched"
    assert 0.1 <= float(data["transition_stalled"]["waited_s"]) < 0.4  # type: ignore[arg-type]
    assert (data["transition_reversed"]["by"], data["transition_reversed"]["target"]) == ("policy", "unpatched")
    assert data["transition_started"]["reversal"] is True
    assert data["loaded"]["funcs"] == ["sleeper_middle,1"]
    wait_until(lambda: kernel.worker.jobs == [])  # the driver's job ends with the transition, at its next round
    wake(kernel, flag)
    assert fut.result(5) == 116  # type: ignore[attr-defined]
