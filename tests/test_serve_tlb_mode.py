"""``livepatchd serve --tlb-mode``: the vCPUs' TLB chosen on the command line (over LIVEPATCHD_TLB_MODE), refused
with the choices named when unknown, and reported by the info verb."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mqtt_fixtures import REPO, DaemonProcess, DaemonThread, Mosquitto, run

from clients.sdk import LivepatchClient


def test_an_unknown_tlb_mode_exits_2_naming_the_choices(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "daemon.cli", "serve", "--tlb-mode", "physical", "--state-dir",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "--tlb-mode" in proc.stderr
    assert "'virtual', 'cpu'" in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []  # no host state was created


def test_tlb_mode_cpu_is_what_info_reports(mosquitto: Mosquitto, tmp_path: Path) -> None:
    # the flag wins over the environment, as every serve option does
    d = DaemonProcess(tmp_path, mosquitto.url, serve_args=["--tlb-mode", "cpu"], LIVEPATCHD_TLB_MODE="virtual",
                      LIVEPATCHD_LOG_FORMAT="json").start()
    try:
        d.wait_online(60)

        async def main() -> None:
            async with LivepatchClient(mosquitto.url, d.host) as c:
                info = await c.info()
                assert (info.host, info.tlb_mode) == (d.host, "cpu")
                assert (await c.call("work_chain", 5)).function == "work_chain"  # the guest runs on it
        run(main())
    finally:
        assert d.terminate() == 0


def test_the_default_tlb_mode_is_reported_virtual(lpd: DaemonThread, mosquitto: Mosquitto) -> None:
    async def main() -> None:
        async with LivepatchClient(mosquitto.url, lpd.host) as c:
            assert (await c.info()).tlb_mode == "virtual"
    run(main())
