"""lpctl's connection errors name the broker they used (its password left out): a new user who forgot --broker
sees at once which broker lpctl tried."""

from __future__ import annotations

from mqtt_fixtures import Mosquitto, free_port, unique_host
from typer.testing import CliRunner

from clients.cli.main import app

runner = CliRunner()


def lpctl(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stderr


def test_an_unreachable_broker_is_named_without_its_password() -> None:
    port = free_port()
    code, err = lpctl("--broker", f"mqtt://operator:s3cret@127.0.0.1:{port}", "--host", "web-01", "info")
    assert code == 3
    assert f"mqtt://operator:***@127.0.0.1:{port}" in err
    assert "s3cret" not in err


def test_no_reply_names_the_broker(mosquitto: Mosquitto) -> None:
    code, err = lpctl("--broker", mosquitto.url, "--host", unique_host("nobody"), "--timeout", "1", "info")
    assert code == 3
    assert mosquitto.url in err


def test_status_of_an_unknown_host_names_the_broker(mosquitto: Mosquitto) -> None:
    host = unique_host("nobody")
    code, err = lpctl("--broker", mosquitto.url.replace("mqtt://", "mqtt://u:pw@"), "--host", host, "--timeout",
                      "2", "status")
    assert code == 4
    assert f"host {host} has never announced itself on mqtt://u:***@" in err
