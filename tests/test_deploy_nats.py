"""deploy/nats/ as shipped: three nodes from nats-1..3.conf (only their ports and store directories moved to
free loopback ones) with the users and permissions of livepatchd-auth.conf — the Mosquitto ACL's roles:

* the daemon (user livepatchd) serves on a cluster it reaches through all three nodes;
* an operator's lpctl sends requests and reads replies, state and hosts;
* an observer reads status, state and hosts (discovery included), but its requests never reach a daemon: NATS
  drops a publish its permissions deny, so lpctl ends with no answer (exit 3) and the daemon ran nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from broker_fixtures import _Process, free_port, nats_binary, wait_mqtt_ready
from mqtt_fixtures import REPO, DaemonThread, daemon_settings, run
from orchestrator_forgery import ORCH_EVENTS, forged_events_seen
from typer.testing import CliRunner

from clients.cli.main import app

DEPLOY = REPO / "deploy" / "nats"
PASSWORDS = {"LIVEPATCHD_NATS_DAEMON_PASSWORD": "d-secret", "LIVEPATCHD_NATS_OPERATOR_PASSWORD": "o-secret",
             "LIVEPATCHD_NATS_OBSERVER_PASSWORD": "v-secret"}
runner = CliRunner()


class DeployedCluster:
    def __init__(self, work: Path) -> None:
        self.work = work
        shutil.copy(DEPLOY / "livepatchd-auth.conf", work / "livepatchd-auth.conf")
        texts = {i: (DEPLOY / f"nats-{i}.conf").read_text() for i in (1, 2, 3)}
        ports = sorted({int(p) for t in texts.values() for p in re.findall(r"127\.0\.0\.1:(\d+)", t)})
        moved = {p: free_port() for p in ports}
        self.mqtt_ports: list[int] = []
        self.nodes: list[_Process] = []
        for i, shipped in texts.items():
            text = re.sub(r"127\.0\.0\.1:(\d+)", lambda m: f"127.0.0.1:{moved[int(m[1])]}", shipped)
            text = text.replace(f"/var/lib/livepatchd-nats/node-{i}", str(work / f"js-{i}"))
            (work / f"nats-{i}.conf").write_text(text)
            mqtt = re.search(r"mqtt \{\s*listen: 127\.0\.0\.1:(\d+)", text)
            assert mqtt is not None
            self.mqtt_ports.append(int(mqtt[1]))

    def url(self, user: str, password: str, first: int = 0) -> str:
        ports = self.mqtt_ports[first:] + self.mqtt_ports[:first]
        return ",".join(f"mqtt://{user}:{password}@127.0.0.1:{p}" for p in ports)

    def start(self) -> None:
        env = {**os.environ, **PASSWORDS}
        for i in (1, 2, 3):
            node = _Process()
            node.spawn([nats_binary(), "-c", str(self.work / f"nats-{i}.conf")], self.work / f"nats-{i}.log", env)
            self.nodes.append(node)
        for i, (node, port) in enumerate(zip(self.nodes, self.mqtt_ports, strict=True)):
            assert node.proc is not None
            wait_mqtt_ready(port, node.proc, self.work / f"nats-{i + 1}.log", 60,
                            auth=("observer", PASSWORDS["LIVEPATCHD_NATS_OBSERVER_PASSWORD"]))

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DeployedCluster, DaemonThread]]:
    cluster = DeployedCluster(tmp_path_factory.mktemp("deploy-nats"))
    try:
        cluster.start()
        d = DaemonThread(daemon_settings(tmp_path_factory.mktemp("deploy-nats-state"),
                                         cluster.url("livepatchd", "d-secret"))).start(timeout=90)
        try:
            yield cluster, d
        finally:
            d.stop()
    finally:
        cluster.stop()


def lpctl(cluster: DeployedCluster, d: DaemonThread, user: str, password: str, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["--broker", cluster.url(user, password, first=1), "--host", d.host, "--timeout",
                                 "6", *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_an_operator_operates(deployed: tuple[DeployedCluster, DaemonThread]) -> None:
    cluster, d = deployed
    code, out, err = lpctl(cluster, d, "operator", "o-secret", "--json", "call", "work_chain", "5")
    assert code == 0, err
    assert json.loads(out)["data"]["function"] == "work_chain"
    code, out, _ = lpctl(cluster, d, "operator", "o-secret", "--json", "state")
    assert (code, json.loads(out)["host"]) == (0, d.host)
    code, out, _ = lpctl(cluster, d, "operator", "o-secret", "--json", "hosts")
    assert json.loads(out)[d.host]["liveness"] == "online"


def test_an_observer_reads_but_cannot_request(deployed: tuple[DeployedCluster, DaemonThread]) -> None:
    cluster, d = deployed
    code, out, _ = lpctl(cluster, d, "observer", "v-secret", "status")
    assert code == 0
    assert f"{d.host}: online" in out
    code, out, _ = lpctl(cluster, d, "observer", "v-secret", "--json", "hosts")
    assert d.host in json.loads(out)
    assert d.daemon.service is not None
    before = d.daemon.service.journal.counts()["accepted"]
    code, _, err = lpctl(cluster, d, "observer", "v-secret", "call", "work_chain", "5")
    assert code == 3
    assert "no reply to call" in err
    assert d.daemon.service.journal.counts()["accepted"] == before  # it never reached the daemon


def test_a_wrong_password_is_refused(deployed: tuple[DeployedCluster, DaemonThread]) -> None:
    cluster, d = deployed
    code, _, err = lpctl(cluster, d, "operator", "wrong", "info")
    assert code == 3
    assert "refused the connection" in err
    assert "wrong" not in err  # the password is not echoed


def test_a_daemon_account_cannot_forge_orchestrator_events(deployed: tuple[DeployedCluster, DaemonThread]) -> None:
    # the operator reads every host's events, the orchestrator's pseudo host's included (its '*' host level)
    cluster, d = deployed
    seen = run(forged_events_seen(cluster.mqtt_ports[1], d.host, ("livepatchd", "d-secret"), ("operator", "o-secret")))
    assert f"livepatch/v1/{d.host}/events" in [t for t, _ in seen]
    assert [p for t, p in seen if t == ORCH_EVENTS] == []
    # the host still answers requests over the same account
    code, out, err = lpctl(cluster, d, "operator", "o-secret", "--json", "info")
    assert code == 0, err
    assert json.loads(out)["data"]["host"] == d.host
