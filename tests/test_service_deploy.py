"""The deploy/ configuration: mosquitto as shipped (password files, ACLs by role, client ids bound to user names on
the people's listener, a listener for the service accounts that hold several connections); the embedded default
broker; the systemd unit."""

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
from mqtt_fixtures import REPO, DaemonThread, Mosquitto, daemon_settings, free_port, run

from clients.sdk import BrokerUnreachable, LivepatchClient, RequestTimeout

DEPLOY = REPO / "deploy"
USERS = {"livepatchd": "daemon-secret", "operator": "op-secret", "observer": "obs-secret"}
"""The accounts of the people's listener (1883 as shipped): this host's daemon, an operator, an observer."""
SERVICES = {"orchestrator": "orch-secret", "dashboard": "dash-secret"}
"""The service accounts of listener 1884 (several connections each)."""


def passwd_file(path: Path, users: dict[str, str]) -> Path:
    for i, (user, password) in enumerate(users.items()):
        subprocess.run(["mosquitto_passwd", *(["-c"] if i == 0 else []), "-b", str(path), user, password],
                       check=True, capture_output=True)
    path.chmod(0o600)
    return path


class ShippedMosquitto(Mosquitto):
    """deploy/mosquitto.conf as shipped, with only its ports, file paths, persistence and logging replaced (each
    replacement must find its line: a reshaped file fails here, not silently)."""

    def __init__(self, workdir: Path, users: dict[str, str], services: dict[str, str]) -> None:
        super().__init__(workdir)
        self.services_port = free_port()
        self.passwd = passwd_file(workdir / "livepatchd.passwd", users)
        self.services_passwd = passwd_file(workdir / "livepatchd-services.passwd", services)

    def services_url(self, user: str, password: str) -> str:
        return f"mqtt://{user}:{password}@127.0.0.1:{self.services_port}"

    def write_conf(self) -> None:
        text = (DEPLOY / "mosquitto.conf").read_text()
        for old, new in [("listener 1883 127.0.0.1", f"listener {self.port} 127.0.0.1"),
                         ("listener 1884 127.0.0.1", f"listener {self.services_port} 127.0.0.1"),
                         ("/etc/mosquitto/livepatchd.passwd\n", f"{self.passwd}\n"),
                         ("/etc/mosquitto/livepatchd-services.passwd\n", f"{self.services_passwd}\n"),
                         ("acl_file /etc/mosquitto/livepatchd.acl", f"acl_file {DEPLOY / 'livepatchd.acl'}"),
                         ("persistence true", "persistence false"),
                         ("persistence_location /var/lib/mosquitto/\n", ""),
                         ("log_dest syslog", f"log_dest file {self.log}")]:
            assert old in text, f"deploy/mosquitto.conf no longer has {old!r}"
            text = text.replace(old, new)
        # as root, mosquitto would switch to the 'mosquitto' user, who cannot read the test's private files
        self.conf.write_text(text + ("user root\n" if os.geteuid() == 0 else ""))


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[ShippedMosquitto]:
    broker = ShippedMosquitto(tmp_path / "broker", USERS, SERVICES)
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
            async with LivepatchClient(operator, lpd.host, client_id="operator") as c:
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
            async with LivepatchClient(operator, lpd.host, client_id="operator") as c:  # still serving
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


def test_shipped_config_an_observer_cannot_take_an_operators_or_the_daemons_client_id(
        secured: ShippedMosquitto, tmp_path: Path) -> None:
    lpd = DaemonThread(daemon_settings(tmp_path / "state", secured.url, username="livepatchd",
                                       password=USERS["livepatchd"])).start()
    try:
        service = lpd.daemon.service
        assert service is not None
        daemon_id = lpd.daemon.bridge.client_id if lpd.daemon.bridge is not None else f"livepatchd-{lpd.host}"
        url = secured.url.replace("mqtt://", "mqtt://{user}:{password}@")
        operator = url.format(user="operator", password=USERS["operator"])

        def reconnects() -> float:
            return float(service.metrics.reconnects._value.get())

        async def squatters(seen: list[str]) -> None:
            """An observer asking for the operator's, then the daemon's id (one at a time: the broker gives each
            connection the id "observer"), listening on every reply and request it may read."""
            for identifier in ("operator", daemon_id, "livepatchd"):
                async with aiomqtt.Client("127.0.0.1", secured.port, username="observer", password=USERS["observer"],
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
        assert "already connected" not in secured.log.read_text()
    finally:
        lpd.stop()


def test_shipped_config_lpctl_with_its_user_name_as_client_id(secured: ShippedMosquitto, tmp_path: Path) -> None:
    lpd = DaemonThread(daemon_settings(tmp_path / "state", secured.url, username="livepatchd",
                                       password=USERS["livepatchd"])).start()
    try:
        operator = secured.url.replace("mqtt://", f"mqtt://operator:{USERS['operator']}@")
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


@pytest.fixture
def fleet_broker(tmp_path: Path) -> Iterator[ShippedMosquitto]:
    """The shipped config set up for a fleet on one daemon account: livepatchd moved to the service listener."""
    people = {k: v for k, v in USERS.items() if k != "livepatchd"}
    broker = ShippedMosquitto(tmp_path / "broker", people, {**SERVICES, "livepatchd": USERS["livepatchd"]})
    broker.start()
    yield broker
    broker.stop()


def test_shipped_config_service_accounts_keep_their_connections_and_ids(fleet_broker: ShippedMosquitto,
                                                                       tmp_path: Path) -> None:
    """Listener 1884: two daemons on the one livepatchd account and the orchestrator's two connections all stay
    connected; no person's account logs in there; and neither an observer nor an operator on 1883 asking for
    these clients' ids kicks one of them (their ids are replaced by their user names)."""
    broker = fleet_broker
    hosts = [DaemonThread(daemon_settings(tmp_path / f"state{i}", broker.services_url("livepatchd",
                                                                                      USERS["livepatchd"]),
                                          username="livepatchd", password=USERS["livepatchd"])).start()
             for i in range(2)]
    try:
        services = [h.daemon.service for h in hosts]
        assert all(s is not None for s in services)
        daemon_ids = [h.daemon.bridge.client_id for h in hosts if h.daemon.bridge is not None]
        people = broker.url.replace("mqtt://", "mqtt://{user}:{password}@")
        operator = people.format(user="operator", password=USERS["operator"])
        orchestrator = broker.services_url("orchestrator", SERVICES["orchestrator"])

        def reconnects() -> list[float]:
            return [float(s.metrics.reconnects._value.get()) for s in services if s is not None]

        async def squat(seen: list[str], user: str) -> None:
            """``user`` asking on 1883 for each of the service clients' ids in turn (the broker names every such
            connection ``user``), listening on their reply topics."""
            for identifier in ("lporch-w1", "lporch-w1-hosts", *daemon_ids):
                async with aiomqtt.Client("127.0.0.1", broker.port, username=user, password=USERS[user],
                                          identifier=identifier, protocol=aiomqtt.ProtocolVersion.V5,
                                          clean_start=False) as spy:
                    for host in (h.host for h in hosts):
                        await spy.subscribe(f"livepatch/v1/{host}/reply/{identifier}", qos=1)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.3):
                            async for message in spy.messages:
                                seen.append(str(message.topic))

        async def main() -> None:
            before = reconnects()
            for user in ("operator", "observer"):  # people have no account on the service listener
                with pytest.raises(BrokerUnreachable):
                    async with LivepatchClient(broker.services_url(user, USERS[user]), hosts[0].host,
                                               reconnect=False):
                        pass
            async with contextlib.AsyncExitStack() as stack:
                orch = [await stack.enter_async_context(LivepatchClient(orchestrator, h.host, client_id=cid))
                        for h, cid in zip(hosts, ("lporch-w1", "lporch-w1-hosts"), strict=True)]
                seen: list[str] = []
                # the observer while an operator works; then the operator itself (an account is one
                # connection on 1883: its squatting connection would otherwise replace its own session)
                for squatter in ("observer", "operator"):
                    async with contextlib.AsyncExitStack() as people:
                        clients = list(orch)
                        if squatter == "observer":
                            clients.append(await people.enter_async_context(
                                LivepatchClient(operator, hosts[1].host, client_id="operator")))
                        spy = asyncio.create_task(squat(seen, squatter))
                        answered = 0
                        while not spy.done():
                            for c in clients:
                                assert (await c.info()).host == c.host
                            answered += 1
                        await spy
                        assert answered >= 3, squatter
                        assert [c.reconnects for c in clients] == [0] * len(clients), squatter
                assert seen == []
            assert reconnects() == before  # neither daemon was kicked off
        run(main())
        assert "already connected" not in broker.log.read_text()
    finally:
        for h in hosts:
            h.stop()
