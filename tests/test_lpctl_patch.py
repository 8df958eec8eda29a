"""``lpctl patch …`` and ``lpctl read`` against a real daemon: build and sign through livepatchd, load, enable
with a progress bar, inspect, disable, unload; --json prints replies exactly; exit codes."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from mqtt_fixtures import DaemonThread, Mosquitto
from test_service_patch import (
    ORIGINAL_CMDLINE,
    PATCHED_CMDLINE,
    Sleeper,
    kernel_of,
    quiet_policy,
    signed,
    signer,
    trusting_settings,
    unsigned_examples,
)
from typer.testing import CliRunner

from clients.cli.main import app
from daemon.livepatch.artifact import PATCHES_DIR

runner = CliRunner()


@pytest.fixture(scope="module")
def patchd(mosquitto: Mosquitto, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonThread]:
    d = DaemonThread(trusting_settings(tmp_path_factory.mktemp("lpctl-patchd"), mosquitto.url)).start()
    quiet_policy(d)
    yield d
    d.stop()


def lpctl(d: DaemonThread | None, *args: str) -> tuple[int, str, str]:
    base = ["--broker", d.url, "--host", d.host] if d is not None else []
    result = runner.invoke(app, [*base, *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_build_sign_load_enable_read_disable_unload(patchd: DaemonThread, tmp_path: Path) -> None:
    bundle = tmp_path / "cmdline.lpb"
    code, out, err = lpctl(None, "patch", "build", str(PATCHES_DIR / "livepatch_cmdline.c"), "--manifest",
                           str(PATCHES_DIR / "livepatch_cmdline.manifest.json"), "--out", str(bundle))
    assert code == 0, err
    assert "livepatch_cmdline" in out
    assert "(unsigned)" in out
    code, out, err = lpctl(patchd, "patch", "load", str(bundle))
    assert code == 1
    assert "patch_signature_missing" in err
    code, out, err = lpctl(None, "--json", "patch", "sign", str(bundle), "--key", str(signer().private_path))
    assert code == 0, err
    signed_doc = json.loads(out)
    assert (signed_doc["ok"], signed_doc["name"]) == (True, "livepatch_cmdline")
    assert bundle.read_bytes() == signed("livepatch_cmdline").to_bytes(), "reproducible build, same signature"
    code, out, err = lpctl(patchd, "patch", "load", str(bundle))
    assert code == 0, err
    assert out.startswith(f"loaded livepatch_cmdline (signed by {signed_doc['key_id'][:16]}; stack order 1")
    code, out, _ = lpctl(patchd, "read", "proc_cmdline_read")
    assert (code, out) == (0, ORIGINAL_CMDLINE)
    code, out, err = lpctl(patchd, "patch", "enable", "livepatch_cmdline", "--wait")
    assert code == 0, err
    assert "livepatch_cmdline: enabled (transition complete)" in out
    assert lpctl(patchd, "read", "proc_cmdline_read")[1] == PATCHED_CMDLINE
    code, out, _ = lpctl(patchd, "--json", "read", "proc_cmdline_read")
    reply = json.loads(out)
    assert reply["data"]["text"] == PATCHED_CMDLINE
    assert out.count("\n") == 1
    code, out, _ = lpctl(patchd, "patch", "list")
    assert code == 0
    assert "livepatch_cmdline" in out
    assert "cmdline_proc_show,1" in out
    code, out, _ = lpctl(patchd, "--json", "patch", "list")
    assert [p["name"] for p in json.loads(out)["data"]["patches"]] == ["livepatch_cmdline"]
    code, out, _ = lpctl(patchd, "patch", "info", "livepatch_cmdline")
    assert code == 0
    for text in ("enabled", "True", "cmdline_proc_show,1", "livepatch_cmdline_proc_show", signed_doc["key_id"][:16]):
        assert text in out
    code, out, _ = lpctl(patchd, "--json", "patch", "info", "livepatch_cmdline")
    assert json.loads(out)["data"]["desired_enabled"] is True
    code, out, _ = lpctl(patchd, "patch", "transition")
    assert (code, out.strip()) == (0, "no transition in progress")
    code, out, _ = lpctl(patchd, "--json", "patch", "disable", "livepatch_cmdline", "--wait")
    assert code == 0
    reply = json.loads(out)
    assert (reply["ok"], reply["data"]["enabled"], reply["data"]["completed"]) == (True, False, True)
    assert out.count("\n") == 1, "one reply, exactly"
    assert lpctl(patchd, "read", "proc_cmdline_read")[1] == ORIGINAL_CMDLINE
    code, out, _ = lpctl(patchd, "patch", "unload", "livepatch_cmdline")
    assert (code, out.strip()) == (0, "livepatch_cmdline: unloaded")
    assert lpctl(patchd, "patch", "list")[1].strip() == "no live patches loaded"


def test_enable_wait_shows_progress_and_reports_a_stall(patchd: DaemonThread, tmp_path: Path) -> None:
    kernel = kernel_of(patchd)
    path = tmp_path / "sleeper.lpb"
    signed("livepatch_sleeper").save(path)
    assert lpctl(patchd, "patch", "load", str(path))[0] == 0
    sleeper = Sleeper(kernel)
    code, out, err = lpctl(patchd, "patch", "enable", "livepatch_sleeper", "--wait", "--wait-timeout", "0.6")
    assert code == 1
    assert "livepatch_sleeper patched" in err, "the progress bar"
    assert "11/12" in err
    assert "sleeping on function sleeper_middle" in err
    assert "still in progress after 0.6 s" in err
    assert "lpctl patch force livepatch_sleeper --yes" in err
    code, out, _ = lpctl(patchd, "patch", "transition", "livepatch_sleeper")
    assert code == 0
    assert "livepatch_sleeper: stalled patched transition, 11/12 tasks switched" in out
    assert "sleeping on function sleeper_middle" in out
    code, out, _ = lpctl(patchd, "--json", "patch", "transition")
    data = json.loads(out)["data"]
    assert data["in_progress"] is True
    assert data["progress"]["blocked"][0]["why"] == "sleeping on function sleeper_middle"
    code, _, err = lpctl(patchd, "patch", "force", "livepatch_sleeper")
    assert code == 2
    assert "pass --yes" in err
    code, _, err = lpctl(patchd, "patch", "enable", "livepatch_sleeper")
    assert code == 1
    assert "livepatch_bad_state" in err
    # wake the sleeper while lpctl waits: the bar completes and the command succeeds
    timer = threading.Timer(0.5, sleeper.wake)
    timer.start()
    try:
        code, out, err = lpctl(patchd, "patch", "disable", "livepatch_sleeper", "--wait", "--wait-timeout", "10")
    finally:
        timer.join()
    assert code == 0, err
    assert "transition reversed" in out
    assert "livepatch_sleeper: disabled (transition complete)" in out
    assert lpctl(patchd, "patch", "unload", "livepatch_sleeper")[0] == 0


def test_errors_and_exit_codes(patchd: DaemonThread, tmp_path: Path) -> None:
    code, _, err = lpctl(patchd, "patch", "enable", "no_such_patch")
    assert code == 1
    assert "livepatch_not_found" in err
    code, out, _ = lpctl(patchd, "--json", "patch", "info", "no_such_patch")
    assert code == 1
    assert json.loads(out)["error"]["code"] == "livepatch_not_found"
    code, _, err = lpctl(patchd, "patch", "load", str(tmp_path / "missing.lpb"))
    assert code == 2
    assert "cannot read" in err
    garbage = tmp_path / "garbage.lpb"
    garbage.write_text("{}")
    code, _, err = lpctl(patchd, "patch", "load", str(garbage))
    assert code == 1
    assert "patch_bundle_malformed" in err
    code, _, err = lpctl(None, "patch", "build", str(tmp_path / "nope.c"), "--manifest",
                         str(PATCHES_DIR / "livepatch_cmdline.manifest.json"), "--out", str(tmp_path / "x.lpb"))
    assert code == 1
    assert "cannot read source" in err
    broken = tmp_path / "broken.c"
    broken.write_text("int livepatch_cmdline_proc_show(void) { return nope; }\n")
    code, _, err = lpctl(None, "patch", "build", str(broken), "--manifest",
                         str(PATCHES_DIR / "livepatch_cmdline.manifest.json"), "--out", str(tmp_path / "x.lpb"))
    assert code == 1
    assert "patch_build_failed" in err
    code, _, err = lpctl(None, "patch", "sign", str(garbage), "--key", str(tmp_path / "no.key"))
    assert code == 1
    code, _, _ = lpctl(None, "patch", "build")
    assert code == 2
    unsigned = tmp_path / "unsigned.lpb"
    unsigned_examples()["livepatch_cmdline"].save(unsigned)
    code, out, _ = lpctl(patchd, "--json", "patch", "load", str(unsigned))
    assert code == 1
    assert json.loads(out)["error"]["code"] == "patch_signature_missing"
    assert lpctl(patchd, "info")[0] == 0, "still serving"


def test_livepatchd_patch_verify_and_examples(tmp_path: Path) -> None:
    from daemon.cli import main  # noqa: PLC0415

    assert main(["patch", "examples", "--out", str(tmp_path), "--key", str(signer().private_path),
                 "livepatch_cmdline", "livepatch_sleeper"]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.lpb")) == ["livepatch_cmdline.lpb", "livepatch_sleeper.lpb"]
    assert main(["patch", "verify", str(tmp_path / "livepatch_cmdline.lpb"), "--trusted",
                 str(signer().public_path)]) == 0
    other = tmp_path / "other"
    assert main(["patch", "examples", "--out", str(other), "livepatch_cmdline"]) == 0
    assert main(["patch", "verify", str(other / "livepatch_cmdline.lpb"), "--trusted", str(signer().public_path)]) == 1
    assert main(["patch", "examples", "--out", str(other), "no_such_example"]) == 1

