"""The ftrace verbs end to end (SDK -> Mosquitto -> daemon -> emulated kernel), and their desired state.

Every test leaves the session's daemon as it found it: no API ops, no hijacks, no trace running, nothing in
enabled_functions (the ``clean`` fixture checks it).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mqtt_fixtures import DaemonProcess, DaemonThread, Mosquitto, daemon_settings, run
from service_host import ServiceHost

from clients.sdk import LivepatchClient, ReplyError
from daemon.ftrace import tracefs
from daemon.ftrace.core import Ftrace
from daemon.ftrace.ops import FtraceOps
from daemon.guest import abi
from daemon.kernel.kernel import Kernel
from daemon.service.ftrace import FtraceSubsystem
from schemas import Reply
from schemas.ftrace import MAX_PAGE, TraceBatchDoc

MASK64 = (1 << 64) - 1
MUL = 0x2545F4914F6CDD1D
STEPS = ("work_step_c", "work_step_b", "work_step_a")  # enabled_functions order (by address)


def step_c(x: int) -> int:
    return ((x ^ (x >> 7)) * MUL) & MASK64


def work_chain(x: int, c: Any = step_c) -> int:
    b = (c((x * 3 + 3) & MASK64) + 5) & MASK64
    return ((b ^ 0x55) + c(x)) & MASK64


async def cleanup(c: LivepatchClient) -> None:
    """Undo whatever a test left: the trace, the hijacks, the API's ops."""
    try:
        await c.trace_stop()
    except ReplyError as exc:
        if exc.code != "trace_not_running":
            raise
    for h in (await c.hijack_list()).hijacks:
        await c.hijack_delete(h.name)
    for o in (await c.ops_list()).ops:
        await c.ops_unregister(o.name)


@pytest.fixture(scope="module")
def lpd(mosquitto: Mosquitto, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonThread]:
    """This file's own daemon: its enabled_functions checks need records no other test has touched (the M flag
    of a function once hijacked or patched stays set, as in Linux)."""
    d = DaemonThread(daemon_settings(tmp_path_factory.mktemp("lpd-ftrace"), mosquitto.url, metrics_port=0)).start()
    yield d
    d.stop()


@pytest.fixture(autouse=True)
def clean(lpd: DaemonThread) -> Iterator[None]:
    yield

    async def main() -> None:
        async with LivepatchClient(lpd.url, lpd.host) as c:
            await cleanup(c)
            assert (await c.enabled_functions()).text == ""
            assert (await c.info()).host == lpd.host  # still serving
    run(main())


def client(lpd: DaemonThread) -> LivepatchClient:
    return LivepatchClient(lpd.url, lpd.host, timeout=30)


async def expect_error(coro: Any, code: str) -> ReplyError:
    with pytest.raises(ReplyError) as exc:
        await coro
    assert exc.value.code == code, exc.value
    assert exc.value.message
    return exc.value


async def ops_line(c: LivepatchClient, name: str, count: int, ops_addr: int, callback: str = "ops_func_count") -> str:
    desc = (await c.symbol(callback)).description
    return f"{name} ({count})       O   \tops: {ops_addr:#x} ({desc})\n"


# -- ops ------------------------------------------------------------------------------------------------------


def test_ops_register_count_filter_unregister(lpd: DaemonThread) -> None:
    async def main() -> None:
        async with client(lpd) as c:
            reg = await c.ops_register("steps", filter="work_step_*")
            o = reg.ops
            assert (o.name, o.callback, o.filter, o.notrace, o.functions, o.filter_functions) == (
                "steps", "count", "work_step_*", None, 3, 3)
            assert o.flags == ["ENABLED"]
            assert o.address is not None
            assert reg.batch is not None
            assert reg.batch.sites == 3
            assert reg.batch.pause_us > 0
            expected = "".join([await ops_line(c, n, 1, o.address) for n in STEPS])
            assert await c.enabled_functions_text() == expected

            assert (await c.call("work_chain", 1)).value == work_chain(1)
            listed = await c.ops_list()
            assert [(x.name, x.hits, x.functions) for x in listed.ops] == [("steps", 4, 3)]

            changed = await c.ops_filter("steps", notrace="work_step_c")
            assert (changed.ops.functions, changed.ops.notrace) == (2, "work_step_c")
            assert await c.enabled_functions_text() == expected.split("\n", 1)[1]
            await c.call("work_chain", 1)
            assert (await c.ops_list()).ops[0].hits == 4 + 2

            changed = await c.ops_filter("steps", filter="work_step_b")
            assert changed.ops.filter == "work_step_b"
            assert changed.ops.functions == 1
            added = await c.ops_filter("steps", filter="work_step_c", notrace="", reset=False)
            assert (added.ops.filter, added.ops.notrace, added.ops.functions) == ("work_step_b work_step_c",
                                                                                  "work_step_c", 1)
            reset = await c.ops_filter("steps", notrace="")
            assert (reset.ops.notrace, reset.ops.functions) == (None, 2)
            await c.call("work_chain", 1)
            assert (await c.ops_list()).ops[0].hits == 6 + 3  # b once, c twice

            gone = await c.ops_unregister("steps")
            assert (gone.ops.hits, gone.ops.functions, gone.ops.address) == (9, 0, None)
            assert await c.enabled_functions_text() == ""
            touched = await c.enabled_functions_text(touched=True)
            for name in STEPS:
                assert f"{name} (0)" in touched
    run(main())


def test_ftrace_enabled_sysctl(lpd: DaemonThread) -> None:
    async def main() -> None:
        async with client(lpd) as c:
            assert (await c.ftrace_sysctl()).model_dump() == {"ftrace_enabled": True, "changed": False, "sites": 0}
            await c.ops_register("steps", filter="work_step_*")
            on = await c.enabled_functions_text()
            await c.call("work_chain", 1)
            off = await c.ftrace_sysctl(False)
            assert (off.ftrace_enabled, off.changed, off.sites) == (False, True, 3)
            assert await c.enabled_functions_text() == ""
            await c.call("work_chain", 1)
            assert (await c.ops_list()).ops[0].hits == 4  # not called while off
            state = await c.state()
            assert state is not None
            assert state.components["ftrace"]["ftrace_enabled"] is False
            again = await c.ftrace_sysctl(False)
            assert (again.changed, again.sites) == (False, 0)
            back = await c.ftrace_sysctl(True)
            assert (back.ftrace_enabled, back.changed, back.sites) == (True, True, 3)
            assert await c.enabled_functions_text() == on
            await c.call("work_chain", 1)
            assert (await c.ops_list()).ops[0].hits == 8
    run(main())


def test_nop_and_recursion_ops_and_foreign_ops(lpd: DaemonThread) -> None:
    async def main() -> None:
        async with client(lpd) as c:
            nop = await c.ops_register("quiet", filter="work_step_a", callback="nop")
            assert nop.ops.address is not None
            assert await c.enabled_functions_text() == await ops_line(c, "work_step_a", 1, nop.ops.address,
                                                                      "ops_func_nop")
            rec = await c.ops_register("guarded", filter="work_step_b", recursion=True)
            assert "RECURSION" in rec.ops.flags
            # a RECURSION ops goes through the list function: no per-callsite ops on its site
            assert "work_step_b (1)           \n" in await c.enabled_functions_text()
            await c.call("work_chain", 3)
            hits = {o.name: o.hits for o in (await c.ops_list()).ops}
            assert hits == {"quiet": 0, "guarded": 1}
            await c.hijack_create("work_step_c", "ftrace_stub")
            others = (await c.ops_list()).others
            assert [(o.name, o.flags, o.functions) for o in others] == [
                ("hijack:work_step_c", ["ENABLED", "IPMODIFY"], 1)]
    run(main())


# -- tracefs views --------------------------------------------------------------------------------------------


def test_available_filter_functions_pages(lpd: DaemonThread) -> None:
    ft = lpd.daemon.ftrace
    assert ft is not None
    everything = tracefs.available_filter_functions(ft).splitlines()
    assert len(everything) >= 10_000

    async def main() -> None:
        async with client(lpd) as c:
            first = await c.available_filter_functions()
            assert (first.total, first.offset, first.next_offset, len(first.functions)) == (len(everything), 0,
                                                                                            1000, 1000)
            assert await c.available_functions() == everything  # 6 pages of at most 2,000
            steps = await c.available_filter_functions("work_step_*")
            assert (sorted(steps.functions), steps.total, steps.next_offset) == (sorted(STEPS), 3, None)
            assert (await c.available_filter_functions("corpus_helper")).total == 16
            assert (await c.available_filter_functions("zzz_*")).total == 0
            last = await c.available_filter_functions(offset=len(everything) - 5, limit=100)
            assert (last.functions, last.next_offset) == (everything[-5:], None)
            raw = await c.request_raw("ftrace.available_filter_functions", {"limit": MAX_PAGE})
            assert len(raw.payload) < 256 << 10, "a full page stays far below the broker's 1 MiB packets"
            await expect_error(c.available_filter_functions(limit=MAX_PAGE + 1), "bad_request")
            await expect_error(c.enabled_functions(limit=0), "bad_request")
    run(main())


def test_enabled_functions_of_every_function_in_pages(lpd: DaemonThread) -> None:
    ft = lpd.daemon.ftrace
    assert ft is not None

    async def main() -> None:
        async with client(lpd) as c:
            every = await c.ops_register("every", notrace="corpus_*", callback="nop")
            assert every.ops.filter_functions is None
            assert every.ops.functions == len(ft.records) - len(ft.select("corpus_*"))
            page = await c.enabled_functions()
            assert page.total == every.ops.functions
            assert page.next_offset == MAX_PAGE
            text = await c.enabled_functions_text()
            assert text == tracefs.enabled_functions(ft)
            assert len(text.splitlines()) == every.ops.functions
            assert (await c.call("work_chain", 9)).value == work_chain(9)
    run(main())


# -- the function tracer ----------------------------------------------------------------------------------------


TRACE_LINE = re.compile(r"^ {0,16}(\S+)-(\d+) +\[(\d{3})\] \.\.\.\.\. +(\d+)\.(\d{6}): (\w+) <-(\w+)$")
ONE_CALL = [("work_step_a", "work_chain"), ("work_step_b", "work_step_a"), ("work_step_c", "work_step_b"),
            ("work_step_c", "work_chain")]


GRAPH_OF_ONE_CALL = [("entry", "work_chain", 0), ("entry", "work_step_a", 1), ("entry", "work_step_b", 2),
                     ("call", "work_step_c", 3), ("return", "work_step_b", 2), ("return", "work_step_a", 1),
                     ("call", "work_step_c", 1), ("return", "work_chain", 0)]


def test_function_graph_over_mqtt(lpd: DaemonThread) -> None:
    """trace.start with tracer function_graph: one record per output line (leaf calls merged), nested, with
    durations; braces opened in one drain close in a later one (the session keeps the printer)."""
    async def main() -> None:
        async with client(lpd) as c:
            started = await c.trace_start("work_*", tracer="function_graph")
            assert (started.tracer, started.functions) == ("function_graph", 4)
            assert [(o.name, o.functions) for o in (await c.ops_list()).others] == [("function_graph", 4)]
            assert (await c.call("work_chain", 5, cpu=1)).value == work_chain(5)
            first = await c.trace_read()
            assert (await c.call("work_chain", 6, cpu=1)).value == work_chain(6)
            stopped = await c.trace_stop()
            records = first.records + stopped.records
            lines = first.lines + stopped.lines
            assert [(r.kind, r.function, r.depth) for r in records] == GRAPH_OF_ONE_CALL * 2
            assert len(lines) == len(records)
            assert lines[0].endswith("|  work_chain() {")
            assert lines[3].endswith("|        work_step_c();")
            assert lines[4].endswith("|      }")
            assert re.match(r"^ 1\) [ +!#*@$] +\d+\.\d+ us +\|        work_step_c\(\);$", lines[3])
            assert all(r.cpu == 1 and r.comm for r in records)
            for r in records:
                assert (r.duration_ns is None) == (r.kind == "entry")
            durations = {r.function: r.duration_ns for r in records[:8] if r.kind == "return"}
            leaves = [r.duration_ns for r in records[:8] if r.kind == "call"]
            assert durations["work_chain"] >= durations["work_step_a"] + leaves[1]  # type: ignore[operator]
            assert durations["work_step_a"] >= durations["work_step_b"] >= leaves[0]  # type: ignore[operator]
            assert await c.enabled_functions_text() == ""
    run(main())


def test_graph_function_and_notrace_over_mqtt(lpd: DaemonThread) -> None:
    """trace.start with graph_function / graph_notrace: every function hooked, only work_step_a's subtree recorded
    (work_step_b's left out with graph_notrace); both refused for the function tracer, nothing started."""
    async def main() -> None:
        async with client(lpd) as c:
            started = await c.trace_start(tracer="function_graph", graph_function="work_step_a")
            assert (started.graph_function, started.graph_notrace) == ("work_step_a", None)
            assert started.functions > 1000, "set_graph_function does not choose what is hooked"
            assert (await c.call("work_chain", 5, cpu=1)).value == work_chain(5)
            stopped = await c.trace_stop()
            assert [(r.kind, r.function, r.depth) for r in stopped.records] == [
                ("entry", "work_step_a", 0), ("entry", "work_step_b", 1), ("call", "work_step_c", 2),
                ("return", "work_step_b", 1), ("return", "work_step_a", 0)]
            assert stopped.lines[0].endswith("|  work_step_a() {")
            started = await c.trace_start("work_*", tracer="function_graph", graph_function="work_chain",
                                          graph_notrace="work_step_b")
            assert (started.functions, started.graph_function, started.graph_notrace) == (
                4, "work_chain", "work_step_b")
            assert (await c.call("work_chain", 6, cpu=1)).value == work_chain(6)
            stopped = await c.trace_stop()
            assert [(r.kind, r.function, r.depth) for r in stopped.records] == [
                ("entry", "work_chain", 0), ("call", "work_step_a", 1), ("call", "work_step_c", 1),
                ("return", "work_chain", 0)]
            for params, code in (({"graph_function": "work_step_a"}, "bad_request"),
                                 ({"tracer": "function", "graph_notrace": "work_step_a"}, "bad_request"),
                                 ({"tracer": "function_graph", "graph_function": "nope_*"}, "ftrace_filter_no_match"),
                                 ({"tracer": "function_graph", "graph_notrace": "work_step_a !nope"},
                                  "ftrace_filter_no_match")):
                await expect_error(c.request("trace.start", params), code)
                assert (await c.ops_list()).others == []
            await expect_error(c.trace_read(), "trace_not_running")
            assert await c.enabled_functions_text() == ""
    run(main())


def test_function_profiler(lpd: DaemonThread) -> None:
    """profile.start / read / stop: calls per function counted in the guest, trace_stat/function's format, beside
    a running trace session; refusals change nothing."""
    ft = lpd.daemon.ftrace
    assert ft is not None

    async def main() -> None:
        async with client(lpd) as c:
            with pytest.raises(ReplyError) as err:
                await c.profile_read()
            assert err.value.code == "profile_not_running"
            with pytest.raises(ReplyError) as err:
                await c.profile_start("no_such_function_*")
            assert err.value.code == "ftrace_filter_no_match"
            assert await c.enabled_functions_text() == ""
            started = await c.profile_start("work_*")
            assert (started.filter, started.functions) == ("work_*", 4)
            assert started.batch is not None
            assert started.batch.sites == 4
            with pytest.raises(ReplyError):
                await c.profile_start()  # one profiler at a time
            await c.trace_start("work_step_a")  # a trace session beside it: the profiler uses no ring
            for x in (1, 2, 3):
                await c.call("work_chain", x)
            read = await c.profile_read()
            assert [(f.function, f.hits) for f in read.functions] == [
                ("work_step_c", 6), ("work_chain", 3), ("work_step_a", 3), ("work_step_b", 3)]
            assert (read.total_functions, read.total_hits, read.running) == (4, 15, True)
            assert read.functions[0].address == ft.record("work_step_c").ip
            assert read.text.splitlines()[0].split() == ["Function", "Hit"]
            assert read.text.splitlines()[2].split() == ["work_step_c", "6"]
            state = await c.state()
            assert state is not None
            assert state.components["ftrace"]["profile"] == {"filter": "work_*", "functions": 4}
            assert len((await c.trace_stop()).records) == 3
            await c.call("work_chain", 4)
            stopped = await c.profile_stop(limit=2)
            assert (stopped.total_hits, stopped.running, len(stopped.functions)) == (20, False, 2)
            assert stopped.batch is not None
            assert await c.enabled_functions_text() == ""
            with pytest.raises(ReplyError) as err:
                await c.profile_stop()
            assert err.value.code == "profile_not_running"
    run(main())


def test_trace_records_exactly_the_calls(lpd: DaemonThread) -> None:
    kernel = lpd.daemon.kernel
    assert kernel is not None
    workers = {t.pid: t.comm for t in kernel.tasks() if t.kind == "worker" and t.cpu == 1}

    async def main() -> None:
        async with client(lpd) as c:
            started = await c.trace_start("work_step_*", entries_per_cpu=1024)
            assert (started.functions, started.entries_per_cpu, started.period_ms) == (3, 1024, 100)
            assert started.topic == f"livepatch/v1/{lpd.host}/trace"
            tracer = [(o.name, o.functions) for o in (await c.ops_list()).others]
            assert tracer == [("function", 3)]
            text = await c.enabled_functions_text()
            assert [line.split(" ")[0] for line in text.splitlines()] == list(STEPS)
            assert "(function_trace_call+0x0/" in text
            for x in (1, 2, 3):
                assert (await c.call("work_chain", x, cpu=1)).value == work_chain(x)
            await asyncio.sleep(0.25)  # the drainer has taken them from the rings: trace.read still has them
            read = await c.trace_read()
            assert (read.written, read.dropped, read.overrun, read.remaining, read.running) == (12, 0, 0, 0, True)
            assert [(r.function, r.parent) for r in read.records] == ONE_CALL * 3
            assert [r.ts for r in read.records] == sorted(r.ts for r in read.records)
            assert {r.cpu for r in read.records} == {1}
            assert {r.pid for r in read.records} <= set(workers)
            for line, r in zip(read.lines, read.records, strict=True):
                m = TRACE_LINE.match(line)
                assert m is not None, line
                comm, pid, cpu, secs, usecs, func, parent = m.groups()
                assert (comm, int(pid), int(cpu), func, parent) == (workers[r.pid], r.pid, 1, r.function, r.parent)
                assert int(secs) + int(usecs) / 1e6 == pytest.approx(r.time)
                assert r.ip == kernel.kallsyms.addr(r.function) + 4
            assert (await c.trace_read()).lines == []  # read once
            await c.call("work_chain", 4, cpu=0)
            stopped = await c.trace_stop()
            assert [(r.function, r.parent, r.cpu) for r in stopped.records] == [(f, p, 0) for f, p in ONE_CALL]
            assert (stopped.written, stopped.running, stopped.discarded) == (16, False, 0)
            assert stopped.batch is not None
            assert await c.enabled_functions_text() == ""
            await expect_error(c.trace_read(), "trace_not_running")
            await expect_error(c.trace_stop(), "trace_not_running")
    run(main())


def test_trace_buffer_overrun_and_ring_drops(lpd: DaemonThread) -> None:
    async def main() -> None:
        async with client(lpd) as c:
            await c.trace_start("__arm64_sys_getpid", entries_per_cpu=4096)
            await c.call("getpid_loop", 2500, cpu=1)  # more than the daemon buffers between two reads
            await asyncio.sleep(0.25)
            read = await c.trace_read(limit=100)
            assert (read.written, read.dropped) == (2500, 0)
            assert read.overrun == 2500 - MAX_PAGE
            assert (len(read.lines), read.remaining) == (100, MAX_PAGE - 100)
            stopped = await c.trace_stop(limit=10)
            assert (len(stopped.lines), stopped.discarded) == (10, MAX_PAGE - 110)
            await c.trace_start("__arm64_sys_getpid", entries_per_cpu=2)
            await c.call("getpid_loop", 5, cpu=0)  # faster than any drain: a 2-entry ring fills
            stopped = await c.trace_stop()
            assert stopped.dropped + stopped.written == 5
            assert stopped.dropped >= 1
            assert len(stopped.lines) == stopped.written
    run(main())


def test_trace_stream_publishes_every_record(lpd: DaemonThread) -> None:
    async def main() -> None:
        async with client(lpd) as c, client(lpd) as follower:
            subscribed = asyncio.Event()
            batches: list[TraceBatchDoc] = []

            async def follow() -> None:
                async for batch in follower.trace_batches(subscribed=subscribed.set):
                    batches.append(batch)
                    if sum(len(b.lines) for b in batches) >= 8:
                        return
            task = asyncio.create_task(follow())
            await subscribed.wait()
            started = await c.trace_start("work_step_*")
            assert started.streaming
            await c.call("work_chain", 5, cpu=1)
            await c.call("work_chain", 6, cpu=0)
            async with asyncio.timeout(10):
                await task
            stopped = await c.trace_stop()
            lines = [line for b in batches for line in b.lines]
            assert lines == stopped.lines  # the stream and the reader both saw every record, in order
            assert [(r.function, r.parent) for b in batches for r in b.records] == ONE_CALL * 2
            assert {b.host for b in batches} == {lpd.host}
            assert [b.seq for b in batches] == list(range(1, len(batches) + 1))
            assert batches[-1].written == 8
    run(main())


# -- hijacks ----------------------------------------------------------------------------------------------------


def direct_hits(kernel: Kernel) -> int:
    base = kernel.kallsyms.addr("direct_hits")
    return sum(kernel.memory.read_u64(base + 8 * cpu) for cpu in range(abi.MAX_CPUS))


def test_hijack_ipmodify_direct_and_their_conflicts(lpd: DaemonThread) -> None:
    kernel = lpd.daemon.kernel
    assert kernel is not None

    async def main() -> None:
        async with client(lpd) as c:
            made = await c.hijack_create("work_step_c", "ftrace_stub")
            h = made.hijack
            assert (h.name, h.mode, h.function, h.ops) == ("work_step_c", "ipmodify", "work_step_c",
                                                           "hijack:work_step_c")
            assert h.target_address == kernel.kallsyms.addr("ftrace_stub")
            assert (await c.call("work_chain", 11)).value == work_chain(11, c=lambda x: x)
            redirect = (await c.symbol("ftrace_redirect_call")).description
            assert h.ops_address is not None
            line_c = f"work_step_c (1)   I   O M \tops: {h.ops_address:#x} ({redirect})\n"
            assert await c.enabled_functions_text() == line_c

            before = await c.enabled_functions_text()
            err = await expect_error(c.hijack_create("work_step_c", "work_step_a", name="second"), "ftrace_busy")
            assert err.details["owner"] == "hijack:work_step_c"
            await expect_error(c.hijack_create("work_step_c", "work_step_a"), "ftrace_ops_state")  # same name
            await expect_error(c.hijack_create("work_step_a", "work_step_a"), "invalid_argument")  # to itself
            await c.hijack_create("work_step_b", "work_step_c")  # b -> c -> ftrace_stub: b(x) = x too
            assert (await c.call("work_chain", 11)).value == ((3 * 11) ^ 0x55) + 11
            await c.hijack_delete("work_step_c")
            loop = await expect_error(c.hijack_create("work_step_c", "work_step_b"), "invalid_argument")
            assert "loop" in loop.message
            await c.hijack_delete(function="work_step_b")
            assert await c.enabled_functions_text() == ""
            assert "work_step_c (0)" in await c.enabled_functions_text(touched=True)
            assert before == line_c

            hits = direct_hits(kernel)
            direct = await c.hijack_create("work_step_a", "my_tramp", mode="direct", name="through-tramp")
            assert direct.hijack.mode == "direct"
            tramp = (await c.symbol("my_tramp")).description
            funcs = (await c.symbol("call_direct_funcs")).description
            assert direct.hijack.ops_address is not None
            assert await c.enabled_functions_text() == (
                f"work_step_a (1)     D O M \tops: {direct.hijack.ops_address:#x} ({funcs})\n\tdirect-->{tramp}\n")
            assert (await c.call("work_chain", 12)).value == work_chain(12)
            assert direct_hits(kernel) == hits + 1
            await expect_error(c.hijack_create("work_step_a", "ftrace_stub"), "ftrace_busy")  # direct owns it
            listed = await c.hijack_list()
            assert [x.name for x in listed.hijacks] == ["through-tramp"]
            await expect_error(c.hijack_delete("work_step_a"), "ftrace_ops_state")  # named otherwise
            await c.hijack_delete("through-tramp")
            assert (await c.call("work_chain", 12)).value == work_chain(12)
            assert direct_hits(kernel) == hits + 1
    run(main())


def test_bad_requests_change_nothing(lpd: DaemonThread) -> None:
    work_chain_addr = lpd.daemon.kernel.kallsyms.addr("work_chain") if lpd.daemon.kernel else 0

    async def main() -> None:
        async with client(lpd) as c:
            await c.ops_register("keep", filter="work_step_a")
            await c.hijack_create("work_step_c", "ftrace_stub")
            before = await c.enabled_functions_text()
            touched = await c.enabled_functions_text(touched=True)
            refusals = [
                (lambda: c.ops_register("x", filter="no_such_function"), "ftrace_filter_no_match"),
                (lambda: c.ops_register("x", filter="zzz_*"), "ftrace_filter_no_match"),
                (lambda: c.ops_register("x", filter="work_step_b", notrace="nope_*"), "ftrace_filter_no_match"),
                (lambda: c.ops_register("keep", filter="work_step_b"), "ftrace_ops_state"),
                (lambda: c.ops_unregister("never"), "ftrace_ops_state"),
                (lambda: c.ops_filter("never", filter="work_step_b"), "ftrace_ops_state"),
                (lambda: c.ops_filter("keep", filter="work_step_b", notrace="nope"), "ftrace_filter_no_match"),
                (lambda: c.request("ftrace.ops.register", {"name": "x", "callback": "evil"}), "bad_request"),
                (lambda: c.request("ftrace.ops.register", {"name": "x", "callback": "0xffff80008000"}), "bad_request"),
                (lambda: c.request("ftrace.ops.register", {"name": "Bad Name"}), "bad_request"),
                (lambda: c.request("ftrace.ops.register", {"name": "x", "func": "ops_func_count"}), "bad_request"),
                (lambda: c.request("ftrace.ops.filter", {"name": "keep"}), "bad_request"),
                (lambda: c.request("trace.start", {"entries_per_cpu": 3}), "bad_request"),
                (lambda: c.request("trace.read", {"limit": MAX_PAGE + 1}), "bad_request"),
                (lambda: c.trace_start("work_step_b nope"), "ftrace_filter_no_match"),
                (c.trace_read, "trace_not_running"),
                (lambda: c.hijack_create("no_such_fn", "ftrace_stub"), "unknown_symbol"),
                (lambda: c.hijack_create("ftrace_caller", "ftrace_stub"), "ftrace_filter_no_match"),  # not traceable
                (lambda: c.hijack_create("corpus_helper", "ftrace_stub"), "ambiguous_symbol"),
                (lambda: c.hijack_create("work_step_b", "no_such_fn"), "unknown_symbol"),
                (lambda: c.hijack_create("work_step_b", "direct_hits"), "invalid_argument"),  # data, not a function
                (lambda: c.hijack_create("work_step_b", hex(work_chain_addr + 4)), "invalid_argument"),  # mid-function
                (lambda: c.hijack_create("work_step_b", "0x10"), "invalid_argument"),  # not text
                (lambda: c.hijack_create("work_step_b", "cmdline_proc_show", mode="direct"), "ftrace_bad_direct_call"),
                (lambda: c.hijack_create("work_step_c", "work_step_a", name="again"), "ftrace_busy"),
                (lambda: c.hijack_create("work_step_c", "my_tramp", mode="direct", name="d2"), "ftrace_busy"),
                (lambda: c.hijack_delete("never"), "ftrace_ops_state"),
                (lambda: c.hijack_delete(function="work_step_b"), "ftrace_ops_state"),
                (lambda: c.request("hijack.delete", {"name": "a", "function": "b"}), "bad_request"),
                (lambda: c.request("hijack.create", {"function": "work_step_b", "target": "x", "mode": "jump"}),
                 "bad_request"),
            ]
            for make, code in refusals:
                await expect_error(make(), code)
                assert await c.enabled_functions_text() == before, code
            assert await c.enabled_functions_text(touched=True) == touched
            assert [o.name for o in (await c.ops_list()).ops] == ["keep"]
            assert [h.name for h in (await c.hijack_list()).hijacks] == ["work_step_c"]
            assert (await c.call("work_chain", 3)).value == work_chain(3, c=lambda x: x)
    run(main())


# -- state, events, metrics -------------------------------------------------------------------------------------


def test_state_events_and_metrics(lpd: DaemonThread) -> None:
    port = lpd.daemon.metrics_port

    def pauses() -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("lpd_batch_pause_seconds_count"))

    async def main() -> None:
        async with client(lpd) as c, client(lpd) as watcher:
            seen: list[str] = []

            async def watch() -> None:
                async for event in watcher.events():
                    seen.append(event.type)
                    if event.type == "hijack.deleted":
                        return
            task = asyncio.create_task(watch())
            await watcher._subscribe(watcher._topics().events)  # the task's listener is in place by now
            before = pauses()
            await c.ops_register("seen", filter="work_step_b")
            state = await c.state()
            assert state is not None
            section = state.components["ftrace"]
            assert section["ops"] == [{"name": "seen", "callback": "count", "filter": "work_step_b", "notrace": None,
                                       "functions": 1}]
            assert section["enabled_functions"] == 1
            await c.ops_filter("seen", filter="work_step_c")
            await c.trace_start("work_step_a")
            state = await c.state()
            assert state is not None
            assert state.components["ftrace"]["trace"]["filter"] == "work_step_a"
            await c.trace_stop()
            await c.ops_unregister("seen")
            await c.hijack_create("work_step_c", "ftrace_stub")
            await c.hijack_delete("work_step_c")
            async with asyncio.timeout(10):
                await task
            assert seen == ["ftrace.ops.registered", "ftrace.ops.filtered", "trace.started", "trace.stopped",
                            "ftrace.ops.unregistered", "hijack.created", "hijack.deleted"]
            state = await c.state()
            assert state is not None
            assert state.components["ftrace"]["ops"] == []
            assert state.components["ftrace"]["enabled_functions"] == 0
            assert pauses() >= before + 7
    run(main())


# -- desired state: ops and hijacks survive a restart -----------------------------------------------------------


class Host(ServiceHost):
    """A kernel, its ftrace and a service with the ftrace verbs over a state directory (no broker)."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.ftrace = Ftrace(self.kernel)
        self.verbs = FtraceSubsystem(self.service, self.kernel, self.ftrace, desired=self.desired)
        self.service.serve(self.verbs.verbs())

    def close(self) -> None:
        self.verbs.close()
        super().close()


def normalized(text: str) -> str:
    """enabled_functions without the guest addresses of ops structs (a fresh heap may place them elsewhere)."""
    return re.sub(r"ops: 0x[0-9a-f]+", "ops: <addr>", text)


def test_ops_and_hijacks_are_restored_after_a_restart(tmp_path: Path) -> None:
    first = Host(tmp_path)
    try:
        first.ok("ftrace.ops.register", name="steps", filter="work_step_*", notrace="work_step_a")
        first.ok("ftrace.ops.filter", name="steps", filter="work_step_c !work_step_b", reset=False)
        first.ok("ftrace.ops.register", name="nop-all-but-corpus", callback="nop", notrace="corpus_* work_*",
                 recursion=True)
        first.ok("ftrace.ops.register", name="gone", filter="work_chain")
        first.ok("ftrace.ops.unregister", name="gone")
        first.ok("hijack.create", function="work_step_b", target="work_step_c")
        first.ok("hijack.create", function="work_step_a", target="my_tramp", mode="direct", name="d")
        first.ok("hijack.create", function="corpus_helper", sympos=2, target="ftrace_stub", name="tmp")
        first.ok("hijack.delete", name="tmp")
        first.ok("trace.start", filter="work_chain")  # not desired state: a restart ends it
        first.ok("ftrace.sysctl", ftrace_enabled=False)
        assert tracefs.enabled_functions(first.ftrace) == ""
        first.ok("ftrace.sysctl", ftrace_enabled=True)
        want = tracefs.enabled_functions(first.ftrace)
        want_ops = {o["name"]: (o["filter"], o["notrace"], o["functions"]) for o in first.ok("ftrace.ops.list")["ops"]}
        want_hijacks = first.ok("hijack.list")["hijacks"]
    finally:
        first.close()

    second = Host(tmp_path)
    try:
        report = second.verbs.restore()
        assert (report.ops, report.hijacks, report.failed) == (["steps", "nop-all-but-corpus"], ["work_step_b", "d"],
                                                               [])
        got = tracefs.enabled_functions(second.ftrace)
        assert normalized(got) == normalized("".join(line for line in want.splitlines(keepends=True)
                                                     if not line.startswith("work_chain ")))
        ops = {o["name"]: (o["filter"], o["notrace"], o["functions"]) for o in second.ok("ftrace.ops.list")["ops"]}
        assert ops == want_ops
        # an appended '!term' removes from the filter it is appended to, as in Linux (only c covered): replayed exactly
        assert ops["steps"] == ("work_step_* work_step_c !work_step_b", "work_step_a", 1)
        assert [{k: v for k, v in h.items() if k != "ops_address"} for h in second.ok("hijack.list")["hijacks"]] == [
            {k: v for k, v in h.items() if k != "ops_address"} for h in want_hijacks]
        error = second.request("trace.read").error
        assert error is not None
        assert error.code == "trace_not_running"
        assert "corpus_helper" not in got  # "tmp" was deleted: not restored
        doc = second.service.state.document().components["ftrace"]
        assert ([o["name"] for o in doc["ops"]], [h["name"] for h in doc["hijacks"]]) == (
            ["steps", "nop-all-but-corpus"], ["work_step_b", "d"])
    finally:
        second.close()


def test_a_cleared_ftrace_enabled_is_restored_before_the_ops(tmp_path: Path) -> None:
    first = Host(tmp_path)
    try:
        first.ok("ftrace.sysctl", ftrace_enabled=False)
        first.ok("ftrace.ops.register", name="steps", filter="work_step_*")
    finally:
        first.close()
    second = Host(tmp_path)
    try:
        report = second.verbs.restore()
        assert (report.ops, report.failed) == (["steps"], [])
        assert second.ok("ftrace.sysctl") == {"ftrace_enabled": False, "changed": False, "sites": 0}
        assert tracefs.enabled_functions(second.ftrace) == ""  # registered, waiting for the sysctl
        assert second.ok("ftrace.sysctl", ftrace_enabled=True)["sites"] == 3
    finally:
        second.close()


def test_a_replayed_change_already_restored_is_answered_from_the_state(tmp_path: Path) -> None:
    """A crash after the change reached the desired state but before the reply: the replay must not redo it."""
    first = Host(tmp_path)
    try:
        registered = first.ok("ftrace.ops.register", name="once", filter="work_step_b")
        first.ok("hijack.create", function="work_step_c", target="ftrace_stub")
        first.ok("hijack.create", function="work_step_a", target="ftrace_stub")
        deleted = first.ok("hijack.delete", name="work_step_a")
        # three requests whose effects are in the store, as if the daemon died before answering them
        for rid, verb, params in (("r-reg", "ftrace.ops.register", {"name": "once", "filter": "work_step_b"}),
                                  ("r-hij", "hijack.create", {"function": "work_step_c", "target": "ftrace_stub"}),
                                  ("r-del", "hijack.delete", {"function": "work_step_a"})):
            first.journal.accept(rid, verb, json.dumps({"request_id": rid, **params}), fp="x", reply_topic="t/r",
                                 correlation=None, boot_seq=1)
        with first.desired.batch():
            for rid, kind, key in (("r-reg", "ftrace.ops", "once"), ("r-hij", "ftrace.hijack", "work_step_c"),
                                   ("r-del", "ftrace.hijack", "work_step_a")):
                first.desired._note(rid, kind, key)
    finally:
        first.close()

    second = Host(tmp_path)
    try:
        second.verbs.restore()
        assert asyncio.run(second.service.replay()) == 3
        replies = {rid: Reply.model_validate_json(second.journal.get(rid).reply)  # type: ignore[union-attr,arg-type]
                   for rid in ("r-reg", "r-hij", "r-del")}
        assert all(r.ok for r in replies.values()), replies
        assert replies["r-reg"].data["ops"]["filter"] == registered["ops"]["filter"]  # type: ignore[index]
        assert replies["r-hij"].data["hijack"]["name"] == "work_step_c"  # type: ignore[index]
        assert replies["r-del"].data["hijack"] == deleted["hijack"]  # type: ignore[index]
        assert [o["name"] for o in second.ok("ftrace.ops.list")["ops"]] == ["once"]
        assert [h["name"] for h in second.ok("hijack.list")["hijacks"]] == ["work_step_c"]
    finally:
        second.close()


# -- through the daemon itself: kill -9 and restart ---------------------------------------------------------------


def test_ops_and_hijacks_survive_kill_9(mosquitto: Mosquitto, tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path, mosquitto.url).start()
    try:
        d.wait_online()

        async def before() -> str:
            async with LivepatchClient(mosquitto.url, d.host, timeout=30) as c:
                await c.ops_register("steps", filter="work_step_*")
                await c.hijack_create("work_step_c", "ftrace_stub")
                return normalized(await c.enabled_functions_text())
        want = run(before())
        d.kill()
        d.start()
        d.wait_online()

        async def after() -> None:
            async with LivepatchClient(mosquitto.url, d.host, timeout=30) as c:
                assert [o.name for o in (await c.ops_list()).ops] == ["steps"]
                assert [h.name for h in (await c.hijack_list()).hijacks] == ["work_step_c"]
                assert normalized(await c.enabled_functions_text()) == want
                assert (await c.call("work_chain", 11)).value == work_chain(11, c=lambda x: x)
        run(after())
    finally:
        d.kill()


def test_ops_list_answers_while_a_change_holds_the_lock_and_stays_current(tmp_path: Path) -> None:
    """``ftrace.ops.list`` answers from the listing taken after the last change (hits read live), so it does not
    wait behind a change holding the subsystem's lock; after a change it lists what the change did, and an ops
    registered behind the subsystem's back (as fprobe does) makes it take the listing anew."""
    host = Host(tmp_path)
    try:
        host.ok("ftrace.ops.register", name="listed", filter="work_chain")
        assert [o["name"] for o in host.ok("ftrace.ops.list")["ops"]] == ["listed"]
        host.kernel.call("work_chain", 3)
        with host.verbs.lock:  # a change in progress, from another thread's point of view
            t0 = time.monotonic()
            listed = host.ok("ftrace.ops.list")
            assert time.monotonic() - t0 < 1.0
        assert listed["ops"][0]["hits"] >= 1, "hits are read live, not from the listing"
        host.ok("ftrace.ops.register", name="second", filter="work_step_a")
        assert sorted(o["name"] for o in host.ok("ftrace.ops.list")["ops"]) == ["listed", "second"]
        host.ok("ftrace.ops.filter", name="second", filter="work_step_b", reset=False)
        second = next(o for o in host.ok("ftrace.ops.list")["ops"] if o["name"] == "second")
        assert second["functions"] == 2
        host.ok("ftrace.ops.unregister", name="listed")
        assert [o["name"] for o in host.ok("ftrace.ops.list")["ops"]] == ["second"]
        foreign = FtraceOps("behind-its-back", "ops_func_count")
        host.ftrace.set_filter(foreign, "work_step_c", reset=True)
        host.ftrace.register(foreign)
        try:
            others = [o["name"] for o in host.ok("ftrace.ops.list")["others"]]
            assert "behind-its-back" in others
        finally:
            host.ftrace.unregister(foreign)
        assert "behind-its-back" not in [o["name"] for o in host.ok("ftrace.ops.list")["others"]]
        host.ok("ftrace.ops.unregister", name="second")
    finally:
        host.close()
