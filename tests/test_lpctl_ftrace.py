"""lpctl's ftrace, trace and hijack commands against the session's daemon: text output as the kernel prints it,
--json equal to the reply, exit codes, and ``trace follow`` in a process of its own."""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time

from mqtt_fixtures import REPO, DaemonThread, run
from test_service_ftrace import ONE_CALL, STEPS, TRACE_LINE, clean, work_chain
from typer.testing import CliRunner

from clients.cli.main import app
from clients.sdk import LivepatchClient
from daemon.ftrace import tracefs

__all__ = ["clean"]  # the SDK tests' autouse fixture: every test leaves the daemon as it found it

runner = CliRunner()


def lpctl(lpd: DaemonThread, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["--broker", lpd.url, "--host", lpd.host, "--timeout", "30", *args],
                           env={"COLUMNS": "200"})  # rich tables: no truncated cells
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def ok(lpd: DaemonThread, *args: str) -> str:
    code, out, err = lpctl(lpd, *args)
    assert code == 0, err
    return out


def refused(lpd: DaemonThread, code: str, *args: str) -> None:
    """Exit 1 with the error code on stderr; with --json, the error reply itself on stdout."""
    exit_code, _, err = lpctl(lpd, *args)
    assert exit_code == 1
    assert f"{code}: " in err
    exit_code, out, _ = lpctl(lpd, "--json", *args)
    assert exit_code == 1
    assert json.loads(out)["error"]["code"] == code


def test_ops_commands(lpd: DaemonThread) -> None:
    out = ok(lpd, "ftrace", "ops", "register", "steps", "-f", "work_step_*")
    assert out.startswith("registered ops steps: 3 functions (struct ftrace_ops at 0x")
    assert "3 sites" in out
    ok(lpd, "call", "work_chain", "1")
    listed = ok(lpd, "ftrace", "ops", "list")
    assert re.search(r"steps\s.*count\s.*3\s.*4\s.*ENABLED\s.*work_step_\*", listed), listed
    out = ok(lpd, "ftrace", "ops", "filter", "steps", "--notrace", "work_step_c")
    assert out.startswith("ops steps: 2 functions (filter work_step_*, notrace work_step_c)")
    out = ok(lpd, "ftrace", "ops", "filter", "steps", "--filter", "work_step_c", "--add")
    assert out.startswith("ops steps: 2 functions (filter work_step_* work_step_c, notrace work_step_c)")
    code, out, _ = lpctl(lpd, "--json", "ftrace", "ops", "register", "quiet", "-f", "work_chain", "--callback", "nop")
    assert code == 0
    assert out.count("\n") == 1  # the reply exactly, on one line
    reply = json.loads(out)
    assert (reply["ok"], reply["data"]["ops"]["callback"], reply["data"]["ops"]["functions"]) == (True, "nop", 1)
    refused(lpd, "ftrace_ops_state", "ftrace", "ops", "register", "steps")
    refused(lpd, "ftrace_filter_no_match", "ftrace", "ops", "register", "x", "-f", "no_such_function")
    refused(lpd, "ftrace_ops_state", "ftrace", "ops", "unregister", "never")
    refused(lpd, "bad_request", "ftrace", "ops", "register", "x", "--callback", "evil")
    assert lpctl(lpd, "ftrace", "ops", "filter", "steps")[0] == 2  # nothing to change: usage
    assert ok(lpd, "ftrace", "ops", "unregister", "steps").startswith("unregistered ops steps after 4 hits")
    ok(lpd, "ftrace", "ops", "unregister", "quiet")
    assert ok(lpd, "ftrace", "ops", "list").strip() == "no ops registered through the API"


def test_available_and_enabled(lpd: DaemonThread) -> None:
    ft = lpd.daemon.ftrace
    assert ft is not None
    assert sorted(ok(lpd, "ftrace", "available", "work_step_*").splitlines()) == sorted(STEPS)
    assert ok(lpd, "ftrace", "available") == tracefs.available_filter_functions(ft)  # every page
    code, out, err = lpctl(lpd, "ftrace", "available", "--limit", "5")
    assert (code, out) == (0, "".join(f"{r.name}\n" for r in ft.records[:5]))
    assert f"{len(ft.records)} in all; next page: --offset 5" in err
    reply = json.loads(ok(lpd, "--json", "ftrace", "available", "corpus_*", "--offset", "10", "--limit", "3"))
    assert (len(reply["data"]["functions"]), reply["data"]["offset"], reply["data"]["next_offset"]) == (3, 10, 13)
    assert lpctl(lpd, "ftrace", "available", "--limit", "5000")[0] == 2

    assert ok(lpd, "ftrace", "enabled") == ""
    ok(lpd, "ftrace", "ops", "register", "all-but-corpus", "--notrace", "corpus_*", "--callback", "nop")
    ok(lpd, "hijack", "create", "work_step_c", "ftrace_stub")
    text = ok(lpd, "ftrace", "enabled")  # ~50 lines: one page
    assert text == tracefs.enabled_functions(ft)
    assert "work_step_c (2)   I     M \n" in text
    reply = json.loads(ok(lpd, "--json", "ftrace", "enabled", "--limit", "2"))
    assert reply["data"]["text"] == "".join(text.splitlines(keepends=True)[:2])
    assert reply["data"]["total"] == len(text.splitlines())
    ok(lpd, "ftrace", "ops", "unregister", "all-but-corpus")
    ok(lpd, "hijack", "delete", "work_step_c")
    assert ok(lpd, "ftrace", "enabled") == ""
    assert ok(lpd, "ftrace", "enabled", "--touched") == tracefs.enabled_functions(ft, touched=True)


def test_sysctl(lpd: DaemonThread) -> None:
    assert ok(lpd, "ftrace", "sysctl") == "kernel.ftrace_enabled = 1\n"
    ok(lpd, "ftrace", "ops", "register", "steps", "-f", "work_step_*")
    assert ok(lpd, "ftrace", "sysctl", "0") == "kernel.ftrace_enabled = 0  (3 call sites rewritten)\n"
    assert json.loads(ok(lpd, "--json", "ftrace", "sysctl"))["data"]["ftrace_enabled"] is False
    assert ok(lpd, "ftrace", "sysctl", "1") == "kernel.ftrace_enabled = 1  (3 call sites rewritten)\n"
    assert lpctl(lpd, "ftrace", "sysctl", "2")[0] == 2
    ok(lpd, "ftrace", "ops", "unregister", "steps")


def test_profile_commands(lpd: DaemonThread) -> None:
    refused(lpd, "profile_not_running", "profile", "read")
    assert ok(lpd, "profile", "start", "work_step_*").startswith("profiling 3 functions; 3 sites")
    refused(lpd, "ftrace_error", "profile", "start")  # already running
    ok(lpd, "call", "work_chain", "7")
    code, out, err = lpctl(lpd, "profile", "read")
    assert code == 0
    assert [line.split() for line in out.splitlines()] == [["Function", "Hit"], ["--------", "---"],
                                                           ["work_step_c", "2"], ["work_step_a", "1"],
                                                           ["work_step_b", "1"]]
    assert "# 4 calls in 3 functions" in err
    reply = json.loads(ok(lpd, "--json", "profile", "stop", "--limit", "1"))
    assert (reply["data"]["total_hits"], [f["function"] for f in reply["data"]["functions"]]) == (4, ["work_step_c"])
    refused(lpd, "profile_not_running", "profile", "stop")


def test_trace_commands(lpd: DaemonThread) -> None:
    out = ok(lpd, "trace", "start", "work_step_*", "--entries", "256")
    assert out.startswith("function: tracing 3 functions, 256 entries per CPU")
    ok(lpd, "call", "work_chain", "7", "--cpu", "1")
    code, out, err = lpctl(lpd, "trace", "read")
    assert code == 0
    lines = out.splitlines()
    assert [(m.group(6), m.group(7)) for m in map(TRACE_LINE.match, lines) if m] == ONE_CALL
    assert "# 4 records; 4 written" in err
    assert ok(lpd, "trace", "read") == ""
    ok(lpd, "call", "work_chain", "8")
    code, out, _ = lpctl(lpd, "--json", "trace", "read")
    reply = json.loads(out)
    assert [(r["function"], r["parent"]) for r in reply["data"]["records"]] == ONE_CALL
    refused(lpd, "ftrace_error", "trace", "start", "work_step_a")  # already running
    ok(lpd, "call", "work_chain", "9")
    code, out, err = lpctl(lpd, "trace", "stop")
    assert code == 0
    assert len(out.splitlines()) == 4
    assert "# 4 records; 12 written" in err
    refused(lpd, "trace_not_running", "trace", "read")
    refused(lpd, "ftrace_filter_no_match", "trace", "start", "nope_*")


def test_trace_start_graph_function_and_notrace(lpd: DaemonThread) -> None:
    out = ok(lpd, "trace", "start", "work_*", "--graph", "--graph-function", "work_step_a", "--graph-notrace",
             "work_step_c")
    assert out.startswith("function_graph: tracing 4 functions, inside 'work_step_a', not under 'work_step_c', ")
    ok(lpd, "call", "work_chain", "7", "--cpu", "1")
    code, out, _ = lpctl(lpd, "--json", "trace", "stop")
    assert code == 0
    records = json.loads(out)["data"]["records"]
    assert [(r["kind"], r["function"], r["depth"]) for r in records] == [
        ("entry", "work_step_a", 0), ("call", "work_step_b", 1), ("return", "work_step_a", 0)]
    code, _, err = lpctl(lpd, "trace", "start", "--graph-function", "work_step_a")
    assert code == 2
    assert "need --graph" in err
    refused(lpd, "ftrace_filter_no_match", "trace", "start", "--graph", "--graph-notrace", "nope_*")
    refused(lpd, "trace_not_running", "trace", "read")


def test_trace_follow_prints_published_lines(lpd: DaemonThread) -> None:
    cmd = [sys.executable, "-m", "clients.cli", "--broker", lpd.url, "--host",
           lpd.host, "trace", "follow", "--count", "8", "--seconds", "60"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        seen = ""
        while "following" not in seen:  # subscribed: what is published from now on reaches it
            assert time.monotonic() < deadline, seen
            assert proc.poll() is None, proc.communicate()
            if select.select([proc.stderr], [], [], 0.2)[0]:
                seen += proc.stderr.readline()

        async def traced_calls() -> None:
            async with LivepatchClient(lpd.url, lpd.host) as c:
                await c.trace_start("work_step_*")
                assert (await c.call("work_chain", 5, cpu=1)).value == work_chain(5)
                assert (await c.call("work_chain", 6, cpu=0)).value == work_chain(6)
        run(traced_calls())
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert [(m.group(3), m.group(6), m.group(7)) for m in map(TRACE_LINE.match, lines) if m] == [
        ("001", f, p) for f, p in ONE_CALL] + [("000", f, p) for f, p in ONE_CALL]


def test_hijack_commands(lpd: DaemonThread) -> None:
    kernel = lpd.daemon.kernel
    assert kernel is not None
    stub = kernel.kallsyms.addr("ftrace_stub")
    out = ok(lpd, "hijack", "create", "work_step_c", "ftrace_stub")
    assert out.strip() == f"hijack work_step_c: work_step_c now runs ftrace_stub+0x0/0x4 ({stub:#x})"
    assert f"= {work_chain(11, c=lambda x: x)} " in ok(lpd, "call", "work_chain", "11")
    listed = ok(lpd, "hijack", "list")
    assert re.search(r"work_step_c\s.*ipmodify\s.*work_step_c\s.*ftrace_stub\+0x0/0x4\s.*hijack:work_step_c", listed)
    refused(lpd, "ftrace_busy", "hijack", "create", "work_step_c", "work_step_a", "--name", "other")
    refused(lpd, "invalid_argument", "hijack", "create", "work_step_b", "direct_hits")
    refused(lpd, "unknown_symbol", "hijack", "create", "no_such_fn", "ftrace_stub")
    refused(lpd, "ftrace_bad_direct_call", "hijack", "create", "work_step_b", "work_step_a", "--direct")
    out = ok(lpd, "hijack", "create", "work_step_a", "my_tramp", "--direct", "--name", "tramp")
    assert out.startswith("hijack tramp: work_step_a calls go through my_tramp+0x0/0x24")
    reply = json.loads(ok(lpd, "--json", "hijack", "list"))
    assert [h["name"] for h in reply["data"]["hijacks"]] == ["work_step_c", "tramp"]
    assert lpctl(lpd, "hijack", "delete")[0] == 2  # NAME or --function
    assert ok(lpd, "hijack", "delete", "--function", "work_step_a").startswith("hijack tramp removed")
    assert ok(lpd, "hijack", "delete", "work_step_c").startswith("hijack work_step_c removed: work_step_c runs its "
                                                                 "own code again")
    refused(lpd, "ftrace_ops_state", "hijack", "delete", "work_step_c")
    assert f"= {work_chain(11)} " in ok(lpd, "call", "work_chain", "11")
    assert ok(lpd, "hijack", "list").strip() == "no hijacks"
