"""One fleet split over two ``livepatchd fleet`` runner processes that share only the broker (as two machines would):
disjoint host-id ranges of the same spec (``--first``), both halves seen as one fleet by ``FleetClient`` and
``lpctl hosts``, each host drawn as a single runner of the whole fleet would draw it, and scaling one runner
leaves the other's hosts alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from mqtt_fixtures import Mosquitto, run
from test_lpctl_fleet import lpctl

from clients.sdk import FleetClient
from daemon.fleet.plan import draw
from daemon.fleet.runner import fleet_dir, request_size
from schemas.fleet import FleetSpec

REPO = Path(__file__).resolve().parent.parent


def _status(state_dir: Path) -> dict[str, Any]:
    try:
        doc: dict[str, Any] = json.loads((fleet_dir(state_dir) / "status.json").read_text())
        return doc
    except (OSError, ValueError):
        return {}


def _wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_fleet_split_over_two_runners_is_one_fleet_on_the_broker(mosquitto: Mosquitto, tmp_path: Path) -> None:
    prefix = f"s{uuid.uuid4().hex[:6]}"
    doc = {"hosts": 6, "prefix": prefix, "seed": 11, "labels": {"zone": {"eu": 0.5, "us": 0.5}},
           "builds": [{"release": "6.1-lp1", "share": 0.5}, {"release": "6.6-lp1", "share": 0.5}],
           "faults": [{"kind": "slow", "count": 2, "delay_s": 0.05}]}
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(doc))
    whole = {p.host: p for p in draw(FleetSpec.model_validate(doc))}  # one runner of the whole fleet
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    halves = [(tmp_path / "machine-a", 0, 3), (tmp_path / "machine-b", 3, 3)]
    procs = [subprocess.Popen([sys.executable, "-m", "daemon.cli", "fleet", "--spec", str(spec_file), "--broker",
                               mosquitto.url, "--state-dir", str(d), "--workers", "0", "--first", str(first),
                               "--hosts", str(n), "--log-level", "warning"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for d, first, n in halves]
    try:
        for (d, _, n), p in zip(halves, procs, strict=True):
            _wait(lambda d=d, n=n, p=p: _status(d).get("online") == n or p.poll() is not None, 120, f"{d} online")
            assert p.poll() is None, f"the runner on {d} exited with {p.returncode}"
        a, b = (_status(d) for d, _, _ in halves)
        assert sorted(a["hosts"]) == sorted(whole)[:3]
        assert sorted(b["hosts"]) == sorted(whole)[3:], "disjoint ranges: no host id runs twice"

        async def listing() -> dict[str, Any]:
            async with FleetClient(mosquitto.url) as fleet:
                return {r.id: r for r in await fleet.hosts() if r.id.startswith(prefix)}
        seen = run(listing())
        assert sorted(seen) == sorted(whole), "both halves are one fleet on the broker"
        for host, plan in whole.items():
            r = seen[host]
            assert r.online
            assert (r.release, dict(r.labels), list(r.faults)) == (plan.release, plan.labels,
                                                                   [f.kind for f in plan.faults]), host
        code, out, err = lpctl("--broker", mosquitto.url, "--json", "hosts", "--state", "online")
        assert code == 0, err
        assert sorted(h for h in json.loads(out) if h.startswith(prefix)) == sorted(whole)

        # scaling one runner leaves the other's hosts alone: same boot, still online
        b_boots = {h: seen[h].boot_seq for h in sorted(whole)[3:]}
        request_size(halves[0][0], 1)
        _wait(lambda: _status(halves[0][0]).get("online") == 1 and _status(halves[0][0]).get("target") == 1, 60,
              "machine-a shrunk")
        time.sleep(1.0)
        after = run(listing())
        assert [h for h in sorted(whole)[:3] if after[h].online] == [sorted(whole)[0]]
        assert {h: (after[h].online, after[h].boot_seq) for h in b_boots} == {h: (True, s) for h, s in
                                                                             b_boots.items()}
        assert _status(halves[1][0])["target"] == 3
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0]


def test_a_negative_first_host_number_starts_nothing(tmp_path: Path, capsys: Any) -> None:
    from daemon.cli import main  # noqa: PLC0415

    assert main(["fleet", "--first", "-3", "--state-dir", str(tmp_path)]) == 2
    assert "bad_fleet_spec: --first must be 0 or more, not -3" in capsys.readouterr().err
    assert not fleet_dir(tmp_path).exists()
