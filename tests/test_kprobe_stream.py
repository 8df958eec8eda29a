"""kprobe.stream: probe hits (kprobes and kretprobe returns) on the trace topic as they are drained, while
kprobe.read still returns each of them once (SDK -> Mosquitto -> daemon -> emulated kernel, and lpctl)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from mqtt_fixtures import DaemonThread, Mosquitto, daemon_settings, run
from test_ftrace import step_c as step_c_of
from typer.testing import CliRunner

from clients.cli.main import app
from clients.sdk import LivepatchClient
from schemas.ftrace import TraceBatchDoc


def test_hits_stream_on_the_trace_topic_and_stay_readable(mosquitto: Mosquitto, tmp_path: Path) -> None:
    step_c = step_c_of(2)
    d = DaemonThread(daemon_settings(tmp_path, mosquitto.url, allow_any_call=True)).start()
    try:
        async def main() -> None:
            async with (LivepatchClient(d.url, d.host, timeout=30) as c,
                        LivepatchClient(d.url, d.host, timeout=30) as follower):
                subscribed = asyncio.Event()
                batches: list[TraceBatchDoc] = []

                async def follow() -> None:
                    async for batch in follower.trace_batches(subscribed=subscribed.set):
                        batches.append(batch)
                        if sum(len(b.lines) for b in batches) >= 6:
                            return
                task = asyncio.create_task(follow())
                await subscribed.wait()
                await c.probe_add("p:lf kpt_leaf x0")
                await c.kretprobe_register("cr", "kpt_calls")
                started = await c.kprobe_stream(True)
                assert started.streaming
                assert started.topic.endswith("/trace")
                await c.call("kpt_calls", 4, cpu=1)  # lf twice, cr's return once
                await c.call("kpt_leaf", 9)
                await c.retprobe_add("f:st work_step_c%return")
                await c.call("work_step_c", 2)
                async with asyncio.timeout(10):
                    await task
                lines = [line for b in batches for line in b.lines]
                assert [ln.split(": ", 1)[1] for ln in lines] == [
                    "lf: (kpt_leaf+0x0/0x14) arg1=0x4", "lf: (kpt_leaf+0x0/0x14) arg1=0x5",
                    "cr: (worker_main+0x74/0xd0 <- kpt_calls) arg1=0x1d", "lf: (kpt_leaf+0x0/0x14) arg1=0x9",
                    "st: (work_step_c+0x4/0x24) arg1=0x2 arg2=0x0 arg3=0x0 arg4=0x0",
                    f"st: (worker_main+0x74/0xd0 <- work_step_c) arg1={step_c:#x}"]
                assert {(b.source, b.session) for b in batches} == {("kprobes", 0)}
                assert [b.seq for b in batches] == list(range(1, len(batches) + 1))
                read = await c.kprobe_read()  # the pollers see the same hits once
                assert read.text.splitlines() == lines[:4]
                fread = await c.fprobe_read()
                assert fread.text.splitlines() == lines[4:]
                assert (await c.fprobe_read()).text == ""
                assert (await c.kprobe_read()).text == ""
                assert not (await c.kprobe_stream(False)).streaming
        run(main())
        r = CliRunner().invoke(app, ["--broker", d.url, "--host", d.host, "--timeout", "30", "probe", "stream", "on"])
        assert r.exit_code == 0, r.stdout
        assert "stream to livepatch/v1/" in r.stdout
        bad = CliRunner().invoke(app, ["--broker", d.url, "--host", d.host, "probe", "stream", "maybe"])
        assert bad.exit_code == 2
    finally:
        d.stop()
