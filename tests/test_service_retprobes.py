"""The kretprobe and fprobe verbs: through the service (desired state across a restart, refusals, trace lines),
and end to end (SDK -> Mosquitto -> daemon -> emulated kernel, and ``lpctl kretprobe`` / ``lpctl fprobe``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mqtt_fixtures import DaemonThread, Mosquitto, daemon_settings, run
from service_host import ServiceHost
from typer.testing import CliRunner

from clients.cli.main import app
from clients.sdk import LivepatchClient, ReplyError
from daemon.ftrace.core import Ftrace
from daemon.service.kprobes import KprobeSubsystem, RetprobeSubsystem
from schemas.retprobes import FprobesSection, KretprobesSection, parse_retprobe_definition


class Host(ServiceHost):
    """A kernel and a service with the kprobe, kretprobe and fprobe verbs over a state directory (no broker)."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        ftrace = Ftrace(self.kernel)
        self.kprobes = KprobeSubsystem(self.service, self.kernel, desired=self.desired)
        self.service.serve(self.kprobes.verbs())
        self.verbs = RetprobeSubsystem(self.service, self.kernel, self.kprobes.kprobes, ftrace, desired=self.desired)
        self.service.serve(self.verbs.verbs())


def test_definitions_parse_as_the_kernel_writes_them() -> None:
    r = parse_retprobe_definition("r8:kprobes/leafret kpt_leaf $retval")
    assert (r.kind, r.name, r.target, r.maxactive) == ("r", "leafret", "kpt_leaf", 8)
    assert parse_retprobe_definition("r kpt_calls").name == "r_kpt_calls_0"
    f = parse_retprobe_definition("f:steps work_step_*,kpt_leaf%return")
    assert (f.kind, f.name, f.target, f.exit) == ("f", "steps", "work_step_* kpt_leaf", True)
    assert parse_retprobe_definition("f kpt_leaf").name == "kpt_leaf__entry"
    for bad in ("r:x kpt_leaf+0x8", "r0:x kpt_leaf", "p:x kpt_leaf", "f8:x kpt_leaf", "r:x kpt_leaf %x1", "r",
                "f:x a;b", "r:9bad kpt_leaf"):
        with pytest.raises(ValueError):  # noqa: PT011  (each is a different message)
            parse_retprobe_definition(bad)


def test_register_read_list_refuse_and_restore(tmp_path: Path) -> None:
    first = Host(tmp_path)
    try:
        data = first.ok("kretprobe.register", name="leafret", target="kpt_leaf", maxactive=4)
        assert data["definition"] == "r4:kprobes/leafret kpt_leaf arg1=$retval"
        assert data["trampoline"] == "brk"
        first.ok("kretprobe.register", name="rh", target="kpt_recurse", trampoline="rethook")
        fp = first.ok("fprobe.register", name="calls", filter="kpt_calls kpt_leaf")
        assert fp["functions"] == 2
        assert fp["definition"] == "f:fprobes/calls kpt_calls,kpt_leaf%return"
        first.ok("fprobe.register", name="gone", filter="kpt_branches", exit=False)
        first.ok("fprobe.unregister", name="gone")
        assert first.kernel.call("kpt_calls", 4) == 29
        lines = first.ok("kprobe.read")["text"].splitlines()
        assert [ln.split(": ", 1)[1] for ln in lines] == [
            "leafret: (kpt_calls+0x1c/0x40 <- kpt_leaf) arg1=0xd", "leafret: (kpt_calls+0x30/0x40 <- kpt_leaf) "
            "arg1=0x10"]
        flines = first.ok("fprobe.read")["text"].splitlines()
        # kpt_leaf's kretprobe hijacked x30 at func+0 before the ftrace site at func+4 ran: the fprobe's
        # return address there is the trampoline, as on arm64 Linux (no KPROBES_ON_FTRACE)
        assert [ln.split(": ", 1)[1] for ln in flines] == [
            "calls: (kpt_calls+0x4/0x40) arg1=0x4 arg2=0x0 arg3=0x0 arg4=0x0",
            "calls: (kpt_leaf+0x4/0x14) arg1=0x4 arg2=0x0 arg3=0x0 arg4=0x0",
            "calls: (__kretprobe_trampoline+0x0/0x8 <- kpt_leaf) arg1=0xd",
            "calls: (kpt_leaf+0x4/0x14) arg1=0x5 arg2=0x0 arg3=0x0 arg4=0x0",
            "calls: (__kretprobe_trampoline+0x0/0x8 <- kpt_leaf) arg1=0x10",
            "calls: (worker_main+0x74/0xd0 <- kpt_calls) arg1=0x1d"]
        listing = first.ok("kretprobe.list")
        assert [(p["name"], p["hits"], p["nmissed"], p["in_use"]) for p in listing["probes"]] == [
            ("leafret", 2, 0, 0), ("rh", 0, 0, 0)]
        assert first.ok("kprobe.list")["probes"] == []  # a kretprobe's entry kprobe is not a plain kprobe
        assert first.code("kprobe.unregister", name="leafret") == "kprobe_refused"
        assert [(p["name"], p["hits"], p["exit_hits"]) for p in first.ok("fprobe.list")["probes"]] == [
            ("calls", 3, 3)]
        doc = first.service.state.document().components
        assert KretprobesSection.model_validate(doc["kretprobes"]).probes["leafret"].hits == 2
        assert FprobesSection.model_validate(doc["fprobes"]).probes["calls"].exit_hits == 3
        # bad input: stable codes, nothing changed
        assert first.code("kretprobe.register", name="x", target="kpt_leaf+0x8") == "kprobe_refused"
        assert first.code("kretprobe.register", name="x", target="schedule") == "kprobe_refused"
        assert first.code("kretprobe.register", name="leafret", target="kpt_calls") == "kprobe_exists"
        assert first.code("kretprobe.register", name="x", target="kpt_calls", maxactive=0) == "bad_request"
        assert first.code("kretprobe.register", name="x", target="kpt_calls", trampoline="kprobe") == "bad_request"
        assert first.code("kretprobe.unregister", name="nope") == "kprobe_not_found"
        assert first.code("fprobe.register", name="x", filter="kpt_leaf", flags=["save_regs"]) == "ftrace_error"
        assert first.code("fprobe.register", name="x", filter="nothing_like_this*") == "ftrace_filter_no_match"
        assert first.code("fprobe.register", name="x", filter="kpt_leaf", flags=["everything"]) == "bad_request"
        assert first.code("fprobe.unregister", name="nope") == "kprobe_not_found"
        assert [p["name"] for p in first.ok("fprobe.list")["probes"]] == ["calls"]
        assert first.ok("fprobe.register", name="sr", filter="kpt_leaf", exit=False,
                        flags=["save_regs_if_supported"])["flags"] == ["save_regs_if_supported"]
        first.ok("fprobe.unregister", name="sr")
    finally:
        first.close()

    second = Host(tmp_path)
    try:
        assert second.verbs.restore() == 3
        assert [p["trampoline"] for p in second.ok("kretprobe.list")["probes"]] == ["brk", "rethook"]
        assert second.kernel.call("kpt_recurse", 2) == 1 + 2 + 4
        assert second.kernel.call("kpt_leaf", 1) == 4
        assert [p["hits"] for p in second.ok("kretprobe.list")["probes"]] == [1, 3]
        assert second.ok("fprobe.list")["probes"][0]["hits"] == 1
    finally:
        second.close()


def test_sdk_and_lpctl_end_to_end(mosquitto: Mosquitto, tmp_path: Path) -> None:
    d = DaemonThread(daemon_settings(tmp_path, mosquitto.url, allow_any_call=True)).start()
    try:
        async def main() -> None:
            async with LivepatchClient(d.url, d.host, timeout=30) as c:
                added = await c.retprobe_add("r2:lr kpt_leaf $retval", trampoline="rethook")
                assert (added.name, added.maxactive) == ("lr", 2)
                fp = await c.retprobe_add("f:st work_step_*%return")
                assert fp.functions == 3
                await c.call("kpt_leaf", 4, cpu=1)
                read = await c.kprobe_read()
                assert read.hits[0].kind == "ret"
                assert read.hits[0].regs["x0"] == 13
                assert (await c.kretprobe_list()).probes[0].hits == 1
                await c.call("work_step_c", 1)
                fread = await c.fprobe_read()
                assert [h.exit for h in fread.hits] == [False, True]
                with pytest.raises(ReplyError) as err:
                    await c.fprobe_register("sr", "kpt_leaf", flags=["save_regs"])
                assert err.value.code == "ftrace_error"
                state = await c.state()
                assert "lr" in state.components["kretprobes"]["probes"]
                assert "st" in state.components["fprobes"]["probes"]
                assert (await c.kretprobe_unregister("lr")).hits == 1
                assert (await c.fprobe_unregister("st")).exit_hits == 1
        run(main())

        def lpctl(*args: str) -> tuple[int, str]:
            r = CliRunner().invoke(app, ["--broker", d.url, "--host", d.host, "--timeout", "30", *args],
                                   env={"COLUMNS": "200"})
            return r.exit_code, r.stdout

        code, out = lpctl("kretprobe", "add", "r:cr kpt_calls")
        assert code == 0, out
        assert "brk trampoline" in out
        assert lpctl("kretprobe", "list")[1].startswith("r10:kprobes/cr kpt_calls arg1=$retval\n")
        assert lpctl("kretprobe", "add", "p:bad kpt_leaf")[0] == 2
        assert lpctl("kretprobe", "add", "r:bad kpt_leaf+0x8")[0] == 2
        assert lpctl("kretprobe", "add", "r:bad2 schedule")[0] == 1
        code, out = lpctl("fprobe", "add", "f:fl kpt_leaf%return", "--flag", "save_regs_if_supported")
        assert code == 0, out
        assert lpctl("fprobe", "add", "f:bad kpt_leaf", "--flag", "save_regs")[0] == 1
        assert lpctl("fprobe", "list")[1].startswith("f:fprobes/fl kpt_leaf%return\n")
        assert lpctl("fprobe", "read")[0] == 0
        assert lpctl("kretprobe", "del", "cr") == (0, "removed cr: 0 returns, 0 missed, 0 in flight\n")
        assert lpctl("fprobe", "del", "fl") == (0, "removed fl: 0 entries, 0 exits\n")
    finally:
        d.stop()
