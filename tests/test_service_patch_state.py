"""The retained state's ftrace counts follow a live patch (its klp ops are ftrace ops): issue 10 §2."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from mqtt_fixtures import DaemonThread, Mosquitto, run
from test_service_patch import Session, quiet_policy, signed, trusting_settings


async def ftrace_section(s: Session, want: dict[str, int], timeout: float = 20.0) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        state = await s.c.state()
        section = state.components.get("ftrace", {}) if state is not None else {}
        if all(section.get(k) == v for k, v in want.items()):
            return section
        assert asyncio.get_running_loop().time() < deadline, f"ftrace section {section} never reached {want}"
        await asyncio.sleep(0.1)


def test_patch_enable_updates_the_ftrace_counts_in_the_retained_state(mosquitto: Mosquitto, tmp_path: Path) -> None:
    d = DaemonThread(trusting_settings(tmp_path, mosquitto.url)).start()
    quiet_policy(d)
    try:
        async def main() -> None:
            async with Session(d.url, d.host) as s:
                await ftrace_section(s, {"ops_registered": 0, "enabled_functions": 0})
                await s.c.patch_load(signed("livepatch_cmdline").to_bytes())
                change = await s.c.patch_enable("livepatch_cmdline")
                if not change.completed:
                    await s.c.wait_transition("livepatch_cmdline", 10)
                # no ftrace verb in between: the patch change itself republishes the section
                await ftrace_section(s, {"ops_registered": 1, "enabled_functions": 1})
                await s.c.patch_disable("livepatch_cmdline", wait=True)
                await ftrace_section(s, {"ops_registered": 0, "enabled_functions": 0})
        run(main())
    finally:
        d.stop()
