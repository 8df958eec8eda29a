"""The deploy/ configuration: mosquitto with a password file and ACLs (operators vs observers); the embedded
default broker; the systemd unit."""

from __future__ import annotations

import configparser
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from mqtt_fixtures import REPO, DaemonThread, Mosquitto, daemon_settings, run

from clients.sdk import BrokerUnreachable, LivepatchClient, RequestTimeout

DEPLOY = REPO / "deploy"
USERS = {"livepatchd": "daemon-secret", "operator": "op-secret", "observer": "obs-secret"}
OVERRIDDEN = ("listener", "password_file", "acl_file", "persistence", "persistence_location", "log_dest", "log_type",
              "set_tcp_nodelay", "autosave_interval")


def deploy_conf(passwd: Path, acl: Path) -> str:
    """deploy/mosquitto.conf with the test's files; the fixture adds its own port, logging and persistence off."""
    kept = [line for line in (DEPLOY / "mosquitto.conf").read_text().splitlines()
            if line.strip() and not line.startswith("#") and line.split()[0] not in OVERRIDDEN]
    return "\n".join([*kept, f"password_file {passwd}", f"acl_file {acl}", ""])


@pytest.fixture
def secured(tmp_path: Path) -> Mosquitto:
    passwd = tmp_path / "passwd"
    for i, (user, password) in enumerate(USERS.items()):
        subprocess.run(["mosquitto_passwd", *(["-c"] if i == 0 else []), "-b", str(passwd), user, password],
                       check=True, capture_output=True)
    passwd.chmod(0o600)
    broker = Mosquitto(tmp_path / "broker", extra_conf=deploy_conf(passwd, DEPLOY / "livepatchd.acl"))
    broker.start()
    yield broker
    broker.stop()


def test_observer_cannot_send_requests(secured: Mosquitto, tmp_path: Path) -> None:
    lpd = DaemonThread(daemon_settings(tmp_path / "state", secured.url, username="livepatchd",
                                       password=USERS["livepatchd"])).start()
    try:
        service = lpd.daemon.service
        assert service is not None
        url = secured.url.replace("mqtt://", "mqtt://{user}:{password}@")

        async def main() -> None:
            operator = url.format(user="operator", password=USERS["operator"])
            observer = url.format(user="observer", password=USERS["observer"])
            async with LivepatchClient(operator, lpd.host) as c:
                assert (await c.info()).host == lpd.host
                assert (await c.symbol("work_chain")).is_func
            async with LivepatchClient(observer, lpd.host, timeout=1.5) as c:
                status = await c.status()  # observers read status and state
                assert status is not None
                assert status.state == "online"
                assert (await c.state()) is not None
                rid = f"obs-{uuid.uuid4().hex}"
                with pytest.raises(RequestTimeout):
                    await c.request_raw("call", {"function": "work_chain", "args": [1]}, request_id=rid)
                assert service.journal.get(rid) is None  # the broker dropped it: the daemon never saw it
            with pytest.raises(BrokerUnreachable):
                async with LivepatchClient(url.format(user="observer", password="wrong"), lpd.host):
                    pass
            with pytest.raises(BrokerUnreachable):
                async with LivepatchClient(secured.url, lpd.host):  # anonymous
                    pass
            async with LivepatchClient(operator, lpd.host) as c:  # still serving
                assert (await c.call("work_chain", 2)).function == "work_chain"
        run(main())
    finally:
        lpd.stop()


def test_embedded_broker_when_none_is_configured(tmp_path: Path) -> None:
    lpd = DaemonThread(daemon_settings(tmp_path, None)).start()
    try:
        assert lpd.url.startswith("mqtt://127.0.0.1:")
        assert not lpd.url.endswith(":1883")

        async def main() -> None:
            async with LivepatchClient(lpd.url, lpd.host) as c:  # MQTT 5 refused by amqtt: falls back to 3.1.1
                assert c.mqtt_version == "3.1.1"
                info = await c.info()
                assert info.host == lpd.host
                assert (await c.call("work_chain", 3)).value == lpd.daemon.kernel.call("work_chain", 3)  # type: ignore[union-attr]
                status = await c.status()
                assert status is not None
                assert status.state == "online"
        run(main())
    finally:
        lpd.stop()


def test_systemd_unit_runs_serve_and_stops_with_sigterm() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / "livepatchd.service")
    service = unit["Service"]
    assert service["ExecStart"].endswith("livepatchd serve")
    assert service["KillSignal"] == "SIGTERM"
    assert service["EnvironmentFile"] == "/etc/livepatchd/livepatchd.env"
    env_keys = {line.split("=", 1)[0].lstrip("# ") for line in (DEPLOY / "livepatchd.env").read_text().splitlines()
                if "=" in line and line.lstrip("# ").startswith("LIVEPATCHD_")}
    from daemon.settings import Settings  # noqa: PLC0415
    known = {f"LIVEPATCHD_{name.upper()}" for name in Settings.model_fields}
    assert env_keys <= known, env_keys - known


def test_serve_refuses_invalid_settings(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "daemon.cli", "serve", "--host", "bad/host", "--state-dir",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "host_id" in proc.stdout


def test_serve_refuses_unusable_tls_files(tmp_path: Path) -> None:
    not_pem = tmp_path / "ca.crt"
    not_pem.write_text("not a certificate\n")
    for args, said in [(["--tls-ca", str(tmp_path / "missing.crt")], "tls_ca_file"),
                       (["--tls-ca", str(not_pem)], "cannot load the TLS files")]:
        proc = subprocess.run([sys.executable, "-m", "daemon.cli", "serve", "--broker", "mqtts://127.0.0.1:1",
                               "--state-dir", str(tmp_path), *args], cwd=REPO, capture_output=True, text=True,
                              timeout=60, check=False)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert said in proc.stdout
