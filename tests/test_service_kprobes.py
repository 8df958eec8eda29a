"""The kprobe verbs: through the service (desired state across a restart, refusals, trace lines), and end to end
(SDK -> Mosquitto -> daemon -> emulated kernel, and ``lpctl probe``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mqtt_fixtures import DaemonThread, Mosquitto, daemon_settings, run
from service_host import ServiceHost
from typer.testing import CliRunner

from clients.cli.main import app
from clients.sdk import LivepatchClient, ReplyError
from daemon.service.kprobes import KprobeSubsystem
from schemas.kprobes import KprobesSection, parse_probe_definition


class Host(ServiceHost):
    """A kernel and a service with the kprobe verbs over a state directory (no broker)."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.verbs = KprobeSubsystem(self.service, self.kernel, desired=self.desired)
        self.service.serve(self.verbs.verbs())


def test_register_read_list_and_restore(tmp_path: Path) -> None:
    first = Host(tmp_path)
    try:
        d = parse_probe_definition("p:leaf kpt_leaf+0x8 x0 y=%x1:u64 $arg1")
        data = first.ok("kprobe.register", name=d.name, target=d.target, args=[a.model_dump() for a in d.args],
                        post=True)
        assert data["mode"] == "step"
        assert data["definition"] == "p:kprobes/leaf kpt_leaf+8 arg1=%x0 y=%x1:u64 arg3=%x0"
        first.ok("kprobe.register", name="ret", target="kpt_leaf+0x10")
        first.ok("kprobe.register", name="gone", target="kpt_branches")
        first.ok("kprobe.unregister", name="gone")
        assert first.kernel.call("kpt_leaf", 7) == 22
        read = first.ok("kprobe.read")
        lines = read["text"].splitlines()
        assert len(lines) == 2
        assert lines[0].endswith(": leaf: (kpt_leaf+0x8/0x14) arg1=0x7 y=0 arg3=0x7")
        assert lines[1].endswith(" post")
        assert "[000]" in lines[0]
        listing = first.ok("kprobe.list")
        assert listing["kprobe_events"] == ("p:kprobes/leaf kpt_leaf+8 arg1=%x0 y=%x1:u64 arg3=%x0\n"
                                            "p:kprobes/ret kpt_leaf+16\n")
        assert [(p["name"], p["hits"], p["nmissed"], p["mode"]) for p in listing["probes"]] == [
            ("leaf", 1, 0, "step"), ("ret", 1, 0, "simulate:br")]
        section = KprobesSection.model_validate(first.service.state.document().components["kprobes"])
        assert section.probes["ret"].hits == 1
        refused = first.request("kprobe.register", name="bad", target="kpt_leaf+0x4").error
        assert refused is not None
        assert refused.code == "kprobe_refused"
        assert "rec->ip" in refused.details["reason"]
        dup = first.request("kprobe.register", name="leaf", target="kpt_calls").error
        assert dup is not None
        assert dup.code == "kprobe_exists"
        missing = first.request("kprobe.unregister", name="nope").error
        assert missing is not None
        assert missing.code == "kprobe_not_found"
        bad_reg = first.request("kprobe.register", name="r", target="kpt_leaf", args=[{"name": "a", "reg": "x31"}])
        assert bad_reg.error is not None
    finally:
        first.close()

    second = Host(tmp_path)
    try:
        assert second.verbs.restore() == 2
        listing = second.ok("kprobe.list")
        assert [(p["name"], p["hits"]) for p in listing["probes"]] == [("leaf", 0), ("ret", 0)]
        assert second.kernel.call("kpt_leaf", 1) == 4
        assert second.ok("kprobe.read")["text"].count("leaf:") == 2  # pre and post
        assert [p["hits"] for p in second.ok("kprobe.list")["probes"]] == [1, 1]
    finally:
        second.close()


def test_sdk_and_lpctl_end_to_end(mosquitto: Mosquitto, tmp_path: Path) -> None:
    d = DaemonThread(daemon_settings(tmp_path, mosquitto.url, allow_any_call=True)).start()
    try:
        async def main() -> None:
            async with LivepatchClient(d.url, d.host, timeout=30) as c:
                added = await c.probe_add("p:mp kpt_calls x0")
                assert added.mode == "step"
                await c.call("kpt_calls", 4, cpu=1)
                listing = await c.kprobe_list()
                assert listing.probes[0].hits == 1
                read = await c.kprobe_read()
                assert read.text.rstrip().endswith("mp: (kpt_calls+0x0/0x40) arg1=0x4")
                assert read.hits[0].cpu == 1
                with pytest.raises(ReplyError) as err:
                    await c.kprobe_register("x", "schedule")
                assert err.value.code == "kprobe_refused"
                state = await c.state()
                assert "mp" in state.components["kprobes"]["probes"]
        run(main())

        def lpctl(*args: str) -> tuple[int, str]:
            r = CliRunner().invoke(app, ["--broker", d.url, "--host", d.host, "--timeout", "30", *args],
                                   env={"COLUMNS": "200"})
            return r.exit_code, r.stdout

        code, out = lpctl("probe", "add", "p:cli kpt_leaf+0x10 x0 %lr")
        assert code == 0, out
        assert "simulate:br" in out
        assert lpctl("probe", "list")[1].startswith("p:kprobes/cli kpt_leaf+16 arg1=%x0 arg2=%x30\n")
        code, out = lpctl("probe", "add", "r:bad kpt_leaf")
        assert code == 2
        code, out = lpctl("probe", "add", "p:bad2 kpt_leaf+0x4")
        assert code == 1
        assert lpctl("probe", "del", "cli") == (0, "removed cli: 0 hits, 0 missed\n")
        assert lpctl("probe", "del", "mp")[0] == 0
    finally:
        d.stop()
