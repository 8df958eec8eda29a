"""The ``call`` verb end to end (real mosquitto, real kernel): 64-bit arguments, timeouts and their late results."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from mqtt_fixtures import DaemonProcess, DaemonThread, Mosquitto, daemon_settings, run
from test_service_mqtt import raw_request
from test_service_patch import Session

from clients.sdk import LivepatchClient, ReplyError

CALL_TIMEOUT_S = 0.5
LATE = 40_000_000  # getpid_loop iterations: longer than CALL_TIMEOUT_S (~1.5 s)
U64 = (1 << 64) - 1


@pytest.fixture(scope="module")
def quick(mosquitto: Mosquitto, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonThread]:
    """A daemon whose calls time out after CALL_TIMEOUT_S."""
    d = DaemonThread(daemon_settings(tmp_path_factory.mktemp("quick"), mosquitto.url,
                                     call_timeout_s=CALL_TIMEOUT_S)).start()
    yield d
    d.stop()


def expected(lpd: DaemonThread, fn: str, *args: int, cpu: int = 0) -> int:
    kernel = lpd.daemon.kernel
    assert kernel is not None
    return kernel.call(fn, *args, cpu=cpu)


def test_arguments_are_64_bit_twos_complement(quick: DaemonThread) -> None:
    """What the schema accepts (-2**63 .. 2**64-1) runs: -1 and 2**64-1 are the same register value."""
    async def main() -> None:
        async with LivepatchClient(quick.url, quick.host) as c:
            minus_one = await c.call("work_chain", -1)
            assert minus_one.value == expected(quick, "work_chain", U64)
            assert (await c.call("work_chain", U64)).value == minus_one.value
            assert (await c.call("work_chain", -(1 << 63))).value == expected(quick, "work_chain", 1 << 63)
            assert (await c.call("work_step_c", -2, cpu=1)).value == expected(quick, "work_step_c", U64 - 1)
        for bad in (-(1 << 63) - 1, 1 << 64):
            rid = uuid.uuid4().hex
            reply = await raw_request(quick, "call", f'{{"request_id": "{rid}", "function": "work_chain", '
                                                     f'"args": [{bad}]}}'.encode())
            error = reply["error"]
            assert isinstance(error, dict)
            assert error["code"] == "bad_request", error
            assert quick.daemon.service is not None
            assert quick.daemon.service.journal.get(rid) is None, "refused before the journal"
    run(main())


def test_a_call_that_times_out_is_answered_timeout_and_its_late_result_is_an_event(quick: DaemonThread) -> None:
    async def main() -> None:
        async with Session(quick.url, quick.host) as s:
            c = s.c
            address = (await c.symbol("getpid_loop")).address
            with pytest.raises(ReplyError) as err:
                await c.call("getpid_loop", LATE, cpu=1)
            assert err.value.code == "timeout"
            assert err.value.details["function"] == "getpid_loop"
            assert err.value.details["address"] == f"{address:#x}"
            assert err.value.details["cpu"] == 1
            assert "getpid_loop" in err.value.message
            assert f"{address:#x}" in err.value.message
            # its CPU still serves meanwhile: the loop yields to the CPU's other workers
            assert (await c.call("work_chain", 3, cpu=1)).value == expected(quick, "work_chain", 3)
            late = await s.event("call.finished_late", timeout=30)
            assert late["function"] == "getpid_loop"
            assert late["address"] == f"{address:#x}"
            assert late["ok"] is True
            assert late["value"] == LATE, "every getpid in the loop returned the worker's pid"
            assert late["elapsed_s"] > CALL_TIMEOUT_S
            assert late["request_id"] == err.value.request_id
            assert late["cpu"] == 1
    run(main())


def test_eight_arguments_reach_x0_to_x7(quick: DaemonThread) -> None:
    """As the schema, the README and the AsyncAPI document say: up to 8 (x0-x7), each in its own register."""
    args = [1, 10, 100, 1000, 10_000, 100_000, 1_000_000, 10_000_000]
    weighted = sum((i + 1) * a for i, a in enumerate(args))

    async def main() -> None:
        async with LivepatchClient(quick.url, quick.host) as c:
            assert (await c.call("args8_weighted", *args)).value == weighted
            assert (await c.call("args8_weighted", *args[:7])).value == weighted - 8 * args[7], "x7 is 0 when absent"
            assert (await c.call("args8_weighted", 0, 0, 0, 0, 0, 0, 0, -1)).signed == -8
        reply = await raw_request(quick, "call", b'{"request_id": "%s", "function": "args8_weighted", "args": '
                                  b'[1,2,3,4,5,6,7,8,9]}' % uuid.uuid4().hex.encode())
        assert reply["error"]["code"] == "bad_request"  # type: ignore[index]
    run(main())


def test_huge_loop_count_is_a_timeout_and_the_cpu_keeps_serving(quick: DaemonThread) -> None:
    """getpid_loop(-1) runs 2**64 iterations: answered ``timeout`` (not guest_error), and it yields its CPU, so the
    CPU's other workers and stop-machine still run."""
    kernel = quick.daemon.kernel
    assert kernel is not None

    async def main() -> None:
        async with LivepatchClient(quick.url, quick.host) as c:
            with pytest.raises(ReplyError) as err:
                await c.call("getpid_loop", -1, cpu=1)
            assert err.value.code == "timeout"
            assert err.value.details["function"] == "getpid_loop"
            assert (await c.call("work_chain", 5, cpu=1)).value == expected(quick, "work_chain", 5)
            assert await asyncio.to_thread(kernel.machine.stop_machine, lambda: True) is True
    run(main())


def test_functions_not_marked_callable_are_refused(quick: DaemonThread) -> None:
    """memset (or any function the image does not mark callable) is refused before it runs, with a hint."""
    kernel = quick.daemon.kernel
    assert kernel is not None
    cmdline = kernel.read_string("proc_cmdline_read")

    async def main() -> None:
        async with LivepatchClient(quick.url, quick.host) as c:
            target = (await c.symbol("saved_command_line")).address
            for verb, params in [("call", {"function": "memset", "args": [target, 0, 64]}),
                                 ("call", {"function": "ftrace_ops_list_func"}),
                                 ("call.read", {"function": "cmdline_proc_show"})]:
                raw = await c.request_raw(verb, params)
                assert raw.reply.error is not None, raw.payload
                assert raw.reply.error.code == "call_not_allowed"
                assert "allow_any_call" in raw.reply.error.message
                assert "LIVEPATCHD_ALLOW_ANY_CALL" in raw.reply.error.details["hint"]
                assert raw.reply.error.details["function"] == params["function"]
            assert (await c.call_read("proc_cmdline_read")).text == cmdline, "memory untouched"
            info = await c.info()
            assert info.calls is not None
            assert info.calls.allow_any is False
            assert {"proc_cmdline_read", "work_chain", "getpid_loop", "__arm64_sys_getpid"} <= set(info.calls.callable)
            assert "memset" not in info.calls.callable
    run(main())


@pytest.mark.parametrize("how", ["setting", "env", "serve flag"])
def test_allow_any_call_is_a_setting(how: str, mosquitto: Mosquitto, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """For labs: allow_any_call (LIVEPATCHD_ALLOW_ANY_CALL, serve --allow-any-call) lets any function run."""
    if how == "serve flag":
        proc = DaemonProcess(tmp_path, mosquitto.url, serve_args=["--allow-any-call"]).start()
        try:
            proc.wait_online()
            run(_any_call_allowed(mosquitto.url, proc.host))
        finally:
            proc.kill()
        return
    overrides = {"allow_any_call": True} if how == "setting" else {}
    if how == "env":
        monkeypatch.setenv("LIVEPATCHD_ALLOW_ANY_CALL", "1")
    lpd = DaemonThread(daemon_settings(tmp_path, mosquitto.url, **overrides)).start()
    try:
        run(_any_call_allowed(lpd.url, lpd.host))
    finally:
        lpd.stop()


async def _any_call_allowed(url: str, host: str) -> None:
    async with LivepatchClient(url, host) as c:
        info = await c.info()
        assert info.calls is not None
        assert info.calls.allow_any is True
        buf = (await c.symbol("host_buffer")).address
        assert (await c.call("memset", buf, 0x41, 8)).value == buf  # memset returns its destination
        assert (await c.call("strlen", buf)).value >= 8


def test_a_fault_in_a_call_ends_only_that_call(quick: DaemonThread) -> None:
    """A call that dereferences a bad pointer is answered ``guest_fault`` (the address it touched, pc, the
    function and backtrace); its worker goes back to its mailbox, so every CPU keeps serving, faults again and
    serves again, and info still shows every CPU online."""
    kernel = quick.daemon.kernel
    assert kernel is not None
    fn = kernel.kallsyms.lookup("lkdtm_READ_UNMAPPED")

    async def main() -> None:
        async with LivepatchClient(quick.url, quick.host) as c:
            for round_ in range(3):
                for cpu in (0, 1):
                    bad = 0x1000 + 8 * (round_ * 2 + cpu)
                    with pytest.raises(ReplyError) as err:
                        await c.call("lkdtm_READ_UNMAPPED", bad, cpu=cpu)
                    d = err.value.details
                    assert err.value.code == "guest_fault"
                    if "address" in d:  # the CPU TLB names the access; the virtual TLB's fill only its 1 KiB page
                        assert d["address"] == bad
                    else:
                        assert d["page"] == bad & ~0x3FF
                    assert d["cpu"] == cpu
                    assert fn.addr <= d["pc"] < fn.addr + fn.size
                    assert d["symbol"].startswith("lkdtm_READ_UNMAPPED+")
                    assert d["backtrace"][0] == d["symbol"]
                    assert "lkdtm_READ_UNMAPPED" in err.value.message
                    assert (await c.call("work_chain", cpu, cpu=cpu)).value == expected(quick, "work_chain", cpu,
                                                                                         cpu=cpu)
            # more jobs than workers, faulting and not, on both CPUs at once: the queue drains past the faults
            results = await asyncio.gather(*(c.call("lkdtm_READ_UNMAPPED" if i % 3 == 0 else "work_chain",
                                                    0x2000 if i % 3 == 0 else i, cpu=i % 2) for i in range(24)),
                                           return_exceptions=True)
            for i, r in enumerate(results):
                if i % 3 == 0:
                    assert isinstance(r, ReplyError)
                    assert r.code == "guest_fault"
                else:
                    assert not isinstance(r, BaseException)
                    assert r.value == expected(quick, "work_chain", i)
            info = await c.info()
            assert info.cpus_online == [0, 1]
    run(main())
    assert kernel.faults_recovered >= 6 + 8
    assert all(v.alive and v.error is None for v in kernel.machine.vcpus)
    assert kernel.machine.stop_machine(lambda: True) is True


def test_a_vcpu_that_cannot_recover_leaves_the_host_degraded(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """A fault the kernel cannot end as a job's (injected here: no fault handler) stops that vCPU for good: the
    host serves on with the others and says which one died in status, state and info."""
    lpd = DaemonThread(daemon_settings(tmp_path, mosquitto.url, heartbeat_s=0.2)).start()
    try:
        kernel = lpd.daemon.kernel
        assert kernel is not None
        kernel.machine.on_fault = None  # as for a fault outside any job (a load generator, the idle loop)

        async def main() -> None:
            async with LivepatchClient(lpd.url, lpd.host) as c:
                assert (await c.status()).dead_cpus == []  # type: ignore[union-attr]
                with pytest.raises(ReplyError) as err:
                    await c.call("lkdtm_READ_UNMAPPED", 0x1000, cpu=1)
                assert err.value.code == "guest_fault"
                assert (await c.call("work_chain", 2, cpu=0)).value == expected(lpd, "work_chain", 2)
                with pytest.raises(ReplyError):
                    await c.call("work_chain", 2, cpu=1)
                info = await c.info()
                assert info.cpus_online == [0]
                async with asyncio.timeout(10):
                    async for status in c.statuses():
                        if status.degraded:
                            break
                assert status.state == "online"
                assert status.dead_cpus == [1]
                async with asyncio.timeout(10):
                    async for state in c.states():
                        if state.kernel.dead_cpus:
                            break
                assert state.kernel.dead_cpus == [1]
        run(main())
    finally:
        lpd.stop()
