"""``lpctl fleet up|status|scale|down`` over a real Mosquitto: the runner in the background with its pid file,
its hosts online from their retained statuses, grown, then stopped with SIGTERM; a bad spec starts nothing."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

from mqtt_fixtures import Mosquitto
from typer.testing import CliRunner

from clients.cli.main import app

cli = CliRunner()


def lpctl(*args: str | Path) -> tuple[int, str, str]:
    result = cli.invoke(app, [str(a) for a in args], env={"COLUMNS": "250"})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_fleet_up_status_scale_down(mosquitto: Mosquitto, tmp_path: Path) -> None:
    prefix = f"u{uuid.uuid4().hex[:6]}"
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"hosts": 3, "prefix": prefix, "labels": {"zone": {"eu": 1.0}}}))
    state_dir = tmp_path / "fleet"
    ids = [f"{prefix}-{i:04d}" for i in range(4)]
    broker = ["--broker", mosquitto.url]

    code, out, err = lpctl(*broker, "--json", "fleet", "up", "--state-dir", state_dir, "--spec", spec, "--broker",
                           mosquitto.url, "--workers", "1", "--ready-timeout", "120")
    assert code == 0, err
    up = json.loads(out)
    pid = up["pid"]
    assert (up["target"], up["online"], up["broker_url"]) == (3, 3, mosquitto.url)
    assert json.loads((state_dir / ".fleet" / "runner.pid").read_text())["pid"] == pid
    try:
        assert _alive(pid)
        code, _, err = lpctl(*broker, "fleet", "up", "--state-dir", state_dir, "--hosts", "2")
        assert code == 2
        assert f"a fleet already runs on {state_dir} (pid {pid})" in err

        code, out, err = lpctl(*broker, "--json", "fleet", "status", "--state-dir", state_dir)
        assert code == 0, err
        status = json.loads(out)
        assert (status["running"], status["pid"], status["target"], status["online"]) == (True, pid, 3, 3)
        assert status["retained"]["online"] == 3
        assert [w["hosts"] for w in status["workers"]] == [3]
        code, out, _ = lpctl(*broker, "fleet", "status", "--state-dir", state_dir)
        assert code == 0
        assert f"running, pid {pid}" in out
        assert "3 online" in out

        code, out, err = lpctl(*broker, "fleet", "scale", "4", "--state-dir", state_dir, "--ready-timeout", "60")
        assert code == 0, err
        assert "4 hosts, all online" in out
        code, out, _ = lpctl(*broker, "--json", "hosts", "--label", "zone=eu", "--state", "online")
        assert sorted(h for h in json.loads(out) if h.startswith(prefix)) == ids

        started = time.monotonic()
        code, out, err = lpctl(*broker, "fleet", "down", "--state-dir", state_dir)
        assert code == 0, err
        assert f"stopped (pid {pid}, SIGTERM)" in out
        assert time.monotonic() - started < 30
        # lpctl saw it gone once its cmdline emptied (the exit releases its memory first); the process itself
        # may take a moment more to become a zombie
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid)
    finally:
        if _alive(pid):
            os.kill(pid, 9)
    assert not (state_dir / ".fleet" / "runner.pid").exists()
    assert json.loads((state_dir / ".fleet" / "status.json").read_text())["stopped"] is True, "it stopped cleanly"

    code, out, err = lpctl(*broker, "--json", "hosts", "--state", "offline")
    offline = {h: d for h, d in json.loads(out).items() if h.startswith(prefix)}
    assert sorted(offline) == ids
    assert {d["reason"] for d in offline.values()} == {"shutdown"}, "each host published offline on its way out"
    code, _, err = lpctl(*broker, "fleet", "status", "--state-dir", state_dir)
    assert code == 4
    assert "no fleet runs on" in err
    code, out, _ = lpctl(*broker, "fleet", "down", "--state-dir", state_dir)
    assert (code, out.strip()) == (0, f"no fleet runs on {state_dir}")
    code, _, err = lpctl(*broker, "fleet", "scale", "2", "--state-dir", state_dir)
    assert code == 4
    assert "no fleet runs on" in err


def test_fleet_up_with_a_bad_spec_starts_nothing(tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"hosts": 2, "builds": [{"release": "6.1-lp1", "share": 0.5}]}))
    state_dir = tmp_path / "fleet"
    code, _, err = lpctl("fleet", "up", "--state-dir", state_dir, "--spec", spec)
    assert code == 2
    assert "builds" in err
    assert "sum to 1" in err
    assert not (state_dir / ".fleet" / "runner.pid").exists()
    code, _, _ = lpctl("fleet", "status", "--state-dir", state_dir)
    assert code == 4
