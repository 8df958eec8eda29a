"""``livepatchd demo``: the whole story on a fresh machine, with nothing to configure.

It starts a daemon (its emulated kernel, an embedded MQTT broker on a free port, a state directory in a
temporary folder), then drives it the way an operator would, with ``lpctl`` commands it prints before
running: make a signing key, build and sign the example patch for /proc/cmdline, load and enable it, read
/proc/cmdline again, show ftrace's enabled_functions, disable and unload it. The daemon trusts only the key
made for the walk-through. The fleet dashboard follows the same broker and its URL is printed first: the page
shows the host change as the story runs (``--keep`` leaves both up afterwards, until Ctrl-C).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from clients.dashboard.background import BackgroundDashboard, DashboardError
from daemon.app import Daemon, configure_logging
from daemon.livepatch.artifact import PATCHES_DIR
from daemon.settings import Settings

PATCH = "livepatch_cmdline"


class _Runner:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.failed = False
        found = shutil.which("lpctl")
        self.lpctl = [found] if found else [sys.executable, "-m", "clients.cli"]

    def lpctl_(self, *args: str, note: str = "") -> str:
        shown = "lpctl " + " ".join(shlex.quote(a) for a in args)
        print(f"\n$ {shown}" + (f"    # {note}" if note else ""), flush=True)
        done = subprocess.run([*self.lpctl, *args], env=self.env, capture_output=True, text=True, timeout=120,
                              check=False)
        text = (done.stdout + done.stderr).rstrip()
        if text:
            print("  " + text.replace("\n", "\n  "), flush=True)
        if done.returncode:
            self.failed = True
            print(f"  (exit code {done.returncode})", flush=True)
        return done.stdout


def run_demo(nr_cpus: int = 2, *, dashboard: str | None = "127.0.0.1:0", keep: bool = False) -> int:
    """``dashboard``: address:port for the page (port 0: any free one), None for none."""
    configure_logging("warning")
    # lpctl tries MQTT 5 first; the embedded broker (3.1.1 only) warns about each such attempt before the fallback
    logging.getLogger("amqtt").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="livepatchd-demo-") as tmp:
        work = Path(tmp)
        keys = work / "keys"
        env = {**os.environ, "LPCTL_HOST": "demo", "LPCTL_TIMEOUT": "60"}
        runner = _Runner(env)
        print("livepatchd walk-through: a daemon with an emulated arm64 kernel, driven with lpctl\n", flush=True)
        runner.lpctl_("keys", "generate", "demo", "--out", str(keys), note="the key the daemon will trust")
        if runner.failed:
            return 1
        settings = Settings(host_id="demo", state_dir=work / "state", nr_cpus=nr_cpus,
                            trusted_keys=[keys / "demo.pub"], log_level="warning")
        ready = threading.Event()
        daemon = Daemon(settings, on_ready=lambda _d: ready.set())
        thread = threading.Thread(target=_run_daemon, args=(daemon,), name="livepatchd", daemon=True)
        thread.start()
        if not ready.wait(60):
            print("the daemon did not come online within 60 s", file=sys.stderr)
            return 1
        env["LPCTL_BROKER"] = daemon.broker_url or ""
        env["LPCTL_PROTOCOL"] = "3.1.1"  # the embedded broker speaks 3.1.1 only: no MQTT 5 attempt per command
        print(f"daemon 'demo' online: emulated kernel on {nr_cpus} vCPUs, embedded broker {daemon.broker_url}",
              flush=True)
        page = _dashboard(daemon.broker_url or "", dashboard) if dashboard else None
        try:
            _story(runner, work)
            if keep:
                print(f"\nkept running: the daemon on {daemon.broker_url}"
                      + (f", the dashboard on {page.url}" if page else "") + " (Ctrl-C stops)", flush=True)
                with contextlib.suppress(KeyboardInterrupt):
                    threading.Event().wait()
        finally:
            if page is not None:
                page.stop()
            daemon.stop()
            thread.join(30)
        print("\nresult: " + ("FAILED (see the exit codes above)" if runner.failed else
                              "OK — patched, observed and unpatched live, nothing rebooted"), flush=True)
        return 1 if runner.failed else 0


def _dashboard(broker_url: str, listen: str) -> BackgroundDashboard | None:
    try:
        page = BackgroundDashboard(broker_url, listen).start()
    except DashboardError as e:  # the walk-through does not need the page
        print(f"dashboard not started: {e}", flush=True)
        return None
    print(f"dashboard: {page.url} (the fleet page, live from the same broker)", flush=True)
    return page


def _run_daemon(daemon: Daemon) -> None:
    import asyncio  # noqa: PLC0415

    asyncio.run(daemon.run())


def _story(r: _Runner, work: Path) -> None:
    bundle = work / f"{PATCH}.lpb"
    r.lpctl_("hosts")
    r.lpctl_("info")
    r.lpctl_("read", "proc_cmdline_read", note="/proc/cmdline, rendered by cmdline_proc_show")
    r.lpctl_("patch", "build", str(PATCHES_DIR / f"{PATCH}.c"), "--manifest",
             str(PATCHES_DIR / f"{PATCH}.manifest.json"), "--out", str(bundle),
             note="compile the replacement with the kernel's own flags")
    r.lpctl_("patch", "sign", str(bundle), "--key", str(work / "keys" / "demo.key"))
    r.lpctl_("patch", "load", str(bundle), note="signature, build id and functions checked, then loaded")
    r.lpctl_("patch", "enable", PATCH, "--wait", note="per-task consistency model")
    r.lpctl_("read", "proc_cmdline_read", note="the same function, live patched")
    r.lpctl_("ftrace", "enabled", note="enabled_functions: one IPMODIFY ops with per-callsite ops")
    r.lpctl_("patch", "info", PATCH)
    r.lpctl_("patch", "disable", PATCH, "--wait")
    r.lpctl_("read", "proc_cmdline_read", note="back to the original")
    r.lpctl_("patch", "unload", PATCH)
