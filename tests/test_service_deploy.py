"""The deploy/ configuration: mosquitto with a password file and ACLs (operators vs observers); the embedded
default broker; the systemd unit."""

from __future__ import annotations

import asyncio
import configparser
import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
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


@pytest.fixture
def bound(tmp_path: Path) -> Iterator[Mosquitto]:
    """deploy/mosquitto.conf with deploy/mosquitto-bound-ids.conf added (client ids bound to user names)."""
    passwd = tmp_path / "passwd"
    for i, (user, password) in enumerate(USERS.items()):
        subprocess.run(["mosquitto_passwd", *(["-c"] if i == 0 else []), "-b", str(passwd), user, password],
                       check=True, capture_output=True)
    passwd.chmod(0o600)
    conf = deploy_conf(passwd, DEPLOY / "livepatchd.acl") + (DEPLOY / "mosquitto-bound-ids.conf").read_text()
    broker = Mosquitto(tmp_path / "broker", extra_conf=conf)
    broker.start()
    yield broker
    broker.stop()


def test_bound_ids_an_observer_cannot_take_an_operators_or_the_daemons_client_id(bound: Mosquitto,
                                                                                 tmp_path: Path) -> None:
    lpd = DaemonThread(daemon_settings(tmp_path / "state", bound.url, username="livepatchd",
                                       password=USERS["livepatchd"])).start()
    try:
        service = lpd.daemon.service
        assert service is not None
        daemon_id = lpd.daemon.bridge.client_id if lpd.daemon.bridge is not None else f"livepatchd-{lpd.host}"
        url = bound.url.replace("mqtt://", "mqtt://{user}:{password}@")
        operator = url.format(user="operator", password=USERS["operator"])

        def reconnects() -> float:
            return float(service.metrics.reconnects._value.get())

        async def squatters(seen: list[str]) -> None:
            """An observer asking for the operator's, then the daemon's id (one at a time: the broker gives each
            connection the id "observer"), listening on every reply and request it may read."""
            for identifier in ("operator", daemon_id, "livepatchd"):
                async with aiomqtt.Client("127.0.0.1", bound.port, username="observer", password=USERS["observer"],
                                          identifier=identifier, protocol=aiomqtt.ProtocolVersion.V5,
                                          clean_start=False) as spy:
                    await spy.subscribe(f"livepatch/v1/{lpd.host}/reply/{identifier}", qos=1)
                    await spy.subscribe(f"livepatch/v1/{lpd.host}/reply/#", qos=1)
                    await spy.subscribe(f"livepatch/v1/{lpd.host}/request/#", qos=1)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1.0):
                            async for message in spy.messages:
                                seen.append(str(message.topic))

        async def main() -> None:
            before = reconnects()
            async with LivepatchClient(operator, lpd.host, client_id="operator") as c:
                assert (await c.info()).host == lpd.host
                seen: list[str] = []
                spy = asyncio.create_task(squatters(seen))
                answered = 0
                while not spy.done():
                    assert (await c.call("work_chain", answered)).function == "work_chain"
                    answered += 1
                await spy
                assert answered >= 10
                assert seen == []  # neither the operator's replies nor the daemon's requests
                assert c.reconnects == 0  # the operator was never kicked off
            assert reconnects() == before  # nor was the daemon
        run(main())
        assert "already connected" not in bound.log.read_text()
    finally:
        lpd.stop()


def test_bound_ids_lpctl_with_its_user_name_as_client_id(bound: Mosquitto, tmp_path: Path) -> None:
    lpd = DaemonThread(daemon_settings(tmp_path / "state", bound.url, username="livepatchd",
                                       password=USERS["livepatchd"])).start()
    try:
        operator = bound.url.replace("mqtt://", f"mqtt://operator:{USERS['operator']}@")
        env = {**os.environ, "LPCTL_BROKER": operator, "LPCTL_HOST": lpd.host, "LPCTL_TIMEOUT": "5"}
        ok = subprocess.run([sys.executable, "-m", "clients.cli", "--json", "--client-id", "operator", "info"],
                            env=env, capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
        assert ok.returncode == 0, ok.stderr
        assert lpd.host in json.dumps(json.loads(ok.stdout))
        # its own random id: the broker calls it "operator", so reply/<random id> is not its to read
        refused = subprocess.run([sys.executable, "-m", "clients.cli", "info"], env=env, capture_output=True,
                                 text=True, timeout=60, cwd=REPO, check=False)
        assert refused.returncode == 3, refused.stderr
        assert "--client-id" in refused.stderr  # the hint names the way out
    finally:
        lpd.stop()
