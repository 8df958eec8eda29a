"""lpctl against the session's daemon: every command, --json equal to the reply, exit codes."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from mqtt_fixtures import REPO, DaemonThread, free_port
from typer.testing import CliRunner

from clients.cli.main import app

runner = CliRunner()


def lpctl(lpd: DaemonThread | None, *args: str, broker: str | None = None) -> tuple[int, str, str]:
    base = ["--broker", broker or (lpd.url if lpd else "")]
    if lpd is not None:
        base += ["--host", lpd.host]
    result = runner.invoke(app, [*base, *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_info(lpd: DaemonThread) -> None:
    code, out, _ = lpctl(lpd, "info")
    assert code == 0
    assert lpd.host in out
    assert "kernel build id" in out
    assert "arm64" in out
    code, out, _ = lpctl(lpd, "--json", "info")
    assert code == 0
    reply = json.loads(out)
    assert reply["ok"] is True
    assert reply["data"]["host"] == lpd.host
    assert out.count("\n") == 1  # exactly the reply, on one line


def test_call(lpd: DaemonThread) -> None:
    kernel = lpd.daemon.kernel
    assert kernel is not None
    expected = kernel.call("work_chain", 0x10)
    code, out, _ = lpctl(lpd, "call", "work_chain", "0x10")
    assert code == 0
    assert out.strip().startswith(f"work_chain(16) on cpu 0 = {expected} ({expected:#x}")
    code, out, _ = lpctl(lpd, "--json", "call", "getpid_loop", "5", "--cpu", "1")
    assert code == 0
    reply = json.loads(out)
    assert reply["data"]["value"] == 5
    assert reply["data"]["cpu"] == 1


def test_symbols_by_name_and_address(lpd: DaemonThread) -> None:
    code, out, _ = lpctl(lpd, "--json", "symbols", "work_chain")
    assert code == 0
    data = json.loads(out)["data"]
    address = int(data["address"], 16)
    code, out, _ = lpctl(lpd, "symbols", hex(address + 4))
    assert code == 0
    assert out.startswith(f"work_chain+0x4/{data['size']:#x}  {address + 4:#x}")


def test_tasks(lpd: DaemonThread) -> None:
    code, out, _ = lpctl(lpd, "tasks", "--cpu", "0")
    assert code == 0
    assert "swapper/0" in out
    assert "swapper/1" not in out
    code, out, _ = lpctl(lpd, "--json", "tasks")
    assert len(json.loads(out)["data"]["tasks"]) == 12


def test_status_and_hosts(lpd: DaemonThread) -> None:
    code, out, _ = lpctl(lpd, "status")
    assert code == 0
    assert out.startswith(f"{lpd.host}: online (boot 1, started")
    code, out, _ = lpctl(lpd, "--json", "status")
    assert json.loads(out)["state"] == "online"
    code, out, _ = lpctl(None, "--json", "hosts", broker=lpd.url)
    assert code == 0
    assert json.loads(out)[lpd.host]["state"] == "online"
    code, out, _ = lpctl(None, "hosts", broker=lpd.url)
    assert lpd.host in out


def test_state(lpd: DaemonThread) -> None:
    code, out, _ = lpctl(lpd, "--json", "state")
    assert code == 0
    doc = json.loads(out)
    assert (doc["host"], doc["boot_seq"]) == (lpd.host, 1)
    assert {"ftrace", "livepatch"} <= set(doc["components"])
    code, out, _ = lpctl(lpd, "state")
    assert code == 0
    assert re.search(rf"^{lpd.host}  state version \d+, boot 1", out)  # the version may have moved on since
    assert "livepatch" in out
    code, _, err = lpctl(None, "--host", "nobody-here", "--timeout", "0.5", "state", broker=lpd.url)
    assert code == 4
    assert "no state" in err


def test_events_follow(lpd: DaemonThread) -> None:
    """``lpctl events`` prints events as they happen: here the refusal of a mutating request, which the test
    keeps causing until the follower has seen one."""
    follower = subprocess.Popen([sys.executable, "-m", "clients.cli", "--broker", lpd.url, "--host", lpd.host,
                                 "--json", "events", "--type", "request.*", "--count", "1", "--seconds", "60"],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert follower.stderr is not None
        assert "following the events" in follower.stderr.readline()
        while follower.poll() is None:
            code, _, _ = lpctl(lpd, "ftrace", "ops", "unregister", "no-such-ops")
            assert code == 1
            time.sleep(0.2)
        out, _ = follower.communicate(timeout=10)
    finally:
        follower.kill()
    assert follower.returncode == 0
    event = json.loads(out.splitlines()[0])
    assert event["type"] == "request.failed"
    assert event["data"]["verb"] == "ftrace.ops.unregister"


def test_exit_codes(lpd: DaemonThread) -> None:
    # 1: an error reply (printed with its code; with --json the reply itself)
    code, _, err = lpctl(lpd, "symbols", "no_such_symbol_here")
    assert code == 1
    assert "unknown_symbol" in err
    code, out, _ = lpctl(lpd, "--json", "call", "work_chain", "--cpu", "7")
    assert code == 1
    assert json.loads(out)["error"]["code"] == "invalid_argument"
    # 2: usage
    assert lpctl(lpd, "call", "work_chain", "zebra")[0] == 2
    assert lpctl(lpd, "no-such-command")[0] == 2
    assert runner.invoke(app, ["--broker", lpd.url, "info"]).exit_code == 2  # no --host
    assert lpctl(lpd, "info", broker="http://x")[0] == 2
    # 3: nobody listens there / nobody answers
    assert lpctl(lpd, "info", broker=f"mqtt://127.0.0.1:{free_port()}")[0] == 3
    result = runner.invoke(app, ["--broker", lpd.url, "--host", "nobody-here", "--timeout", "0.3", "info"])
    assert result.exit_code == 3
    assert "no reply to info" in result.stderr
    # 4: a host that never announced itself
    result = runner.invoke(app, ["--broker", lpd.url, "--host", "nobody-here", "status"])
    assert result.exit_code == 4
    # and the daemon still serves
    assert lpctl(lpd, "info")[0] == 0


def test_keys_generate(tmp_path: Path) -> None:
    result = runner.invoke(app, ["--json", "keys", "generate", "signer", "--out", str(tmp_path)])
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    private_pem = Path(doc["private_key"]).read_bytes()
    public_pem = Path(doc["public_key"]).read_bytes()
    assert private_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    assert public_pem.startswith(b"-----BEGIN PUBLIC KEY-----")  # SubjectPublicKeyInfo
    assert stat.S_IMODE(os.stat(doc["private_key"]).st_mode) == 0o600
    private = serialization.load_pem_private_key(private_pem, password=None)
    public = serialization.load_pem_public_key(public_pem)
    assert isinstance(private, Ed25519PrivateKey)
    assert isinstance(public, Ed25519PublicKey)
    public.verify(private.sign(b"patch"), b"patch")  # the two files are one pair
    assert len(doc["key_id"]) == 64, "the key id a bundle's signature and the daemon name (lpctl shows 16 digits)"
    again = runner.invoke(app, ["keys", "generate", "signer", "--out", str(tmp_path)])
    assert again.exit_code == 2
    assert "--force" in again.stderr
    assert Path(doc["private_key"]).read_bytes() == private_pem
    assert runner.invoke(app, ["keys", "generate", "signer", "--out", str(tmp_path), "--force"]).exit_code == 0
    assert Path(doc["private_key"]).read_bytes() != private_pem


def test_console_script_in_a_subprocess(lpd: DaemonThread) -> None:
    proc = subprocess.run([sys.executable, "-m", "clients.cli", "--broker", lpd.url, "--host", lpd.host,
                           "--json", "call", "work_chain", "1"], cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    reply = json.loads(proc.stdout)
    assert reply["ok"] is True
    assert reply["data"]["function"] == "work_chain"
