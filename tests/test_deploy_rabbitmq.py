"""deploy/rabbitmq/ as shipped: a private RabbitMQ node with rabbitmq.conf (its two listeners moved to free
loopback ports) and the users and topic permissions of users.sh — the Mosquitto ACL's roles:

* the daemon (user livepatchd) serves through it (MQTT 3.1.1: RabbitMQ 3.x drops a v5 CONNECT);
* an operator's lpctl sends requests and reads replies, state and hosts (found by the broadcast discovery
  request: RabbitMQ never hands retained statuses to a wildcard subscription);
* an observer reads status and hosts, but a request of its own never reaches a daemon (exit 3).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import pytest
from broker_fixtures import RabbitMQ
from mqtt_fixtures import REPO, DaemonThread, daemon_settings, run
from orchestrator_forgery import ORCH_EVENTS, forged_events_seen
from typer.testing import CliRunner

from clients.cli.main import app

DEPLOY = REPO / "deploy" / "rabbitmq"
PASSWORDS = {"LIVEPATCHD_RMQ_DAEMON_PASSWORD": "d-secret", "LIVEPATCHD_RMQ_OPERATOR_PASSWORD": "o-secret",
             "LIVEPATCHD_RMQ_OBSERVER_PASSWORD": "v-secret"}
runner = CliRunner()


def users(node: RabbitMQ) -> None:
    env = {**node.env(), **PASSWORDS, "RABBITMQCTL": "/usr/lib/rabbitmq/bin/rabbitmqctl"}
    done = subprocess.run(["sh", str(DEPLOY / "users.sh")], env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RabbitMQ, DaemonThread]]:
    conf = (DEPLOY / "rabbitmq.conf").read_text()
    conf = conf.replace("127.0.0.1:5672", "127.0.0.1:{amqp_port}").replace("127.0.0.1:1883", "127.0.0.1:{mqtt_port}")
    node = RabbitMQ(tmp_path_factory.mktemp("deploy-rabbitmq"), conf=conf + "log.console = false\n",
                    auth=("observer", "v-secret"))
    try:
        node.start(before_ready=users)
        d = DaemonThread(daemon_settings(tmp_path_factory.mktemp("deploy-rmq-state"),
                                         f"mqtt://livepatchd:d-secret@127.0.0.1:{node.mqtt_port}")).start(timeout=90)
        try:
            yield node, d
        finally:
            d.stop()
    finally:
        node.stop()


def lpctl(node: RabbitMQ, d: DaemonThread, user: str, password: str, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["--broker", f"mqtt://{user}:{password}@127.0.0.1:{node.mqtt_port}", "--host", d.host,
                                 "--timeout", "6", *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_an_operator_operates(deployed: tuple[RabbitMQ, DaemonThread]) -> None:
    node, d = deployed
    code, out, err = lpctl(node, d, "operator", "o-secret", "--json", "call", "work_chain", "5")
    assert code == 0, err
    assert json.loads(out)["data"]["function"] == "work_chain"
    code, out, _ = lpctl(node, d, "operator", "o-secret", "--json", "state")
    assert (code, json.loads(out)["host"]) == (0, d.host)
    code, out, _ = lpctl(node, d, "operator", "o-secret", "--json", "hosts")
    assert json.loads(out)[d.host]["liveness"] == "online"


def test_an_observer_reads_but_cannot_request(deployed: tuple[RabbitMQ, DaemonThread]) -> None:
    node, d = deployed
    code, out, err = lpctl(node, d, "observer", "v-secret", "status")
    assert code == 0, err
    assert f"{d.host}: online" in out
    code, out, _ = lpctl(node, d, "observer", "v-secret", "--json", "hosts")
    assert d.host in json.loads(out)
    assert d.daemon.service is not None
    before = d.daemon.service.journal.counts()["accepted"]
    code, _, _ = lpctl(node, d, "observer", "v-secret", "call", "work_chain", "5")
    assert code == 3
    assert d.daemon.service.journal.counts()["accepted"] == before  # it never reached the daemon


def test_no_guest_and_no_anonymous(deployed: tuple[RabbitMQ, DaemonThread]) -> None:
    node, d = deployed
    assert "guest" not in node.ctl("list_users")
    code, _, err = lpctl(node, d, "guest", "guest", "info")
    assert code == 3
    assert "refused the connection" in err
    assert os.environ.get("LIVEPATCHD_RMQ_DAEMON_PASSWORD") is None  # the passwords went to users.sh only


def test_a_daemon_account_cannot_forge_orchestrator_events(deployed: tuple[RabbitMQ, DaemonThread]) -> None:
    # the operator reads every host's events, the orchestrator's pseudo host's included (its '*' host level)
    node, d = deployed
    seen = run(forged_events_seen(node.mqtt_port, d.host, ("livepatchd", "d-secret"), ("operator", "o-secret")))
    assert f"livepatch/v1/{d.host}/events" in [t for t, _ in seen]
    assert [p for t, p in seen if t == ORCH_EVENTS] == []
    # the host still answers requests over the same account
    code, out, err = lpctl(node, d, "operator", "o-secret", "--json", "info")
    assert code == 0, err
    assert json.loads(out)["data"]["host"] == d.host
