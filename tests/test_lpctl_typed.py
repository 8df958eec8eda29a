"""lpctl goes through the SDK's typed methods (each verb's parameters written once, in the SDK) and prints the raw
reply only for --json: ``capture_replies`` hands it the reply the typed method parsed, exactly as it arrived."""

from __future__ import annotations

import json

from mqtt_fixtures import DaemonThread, run
from typer.testing import CliRunner

from clients.cli.main import app
from clients.sdk import LivepatchClient, capture_replies

runner = CliRunner()


def test_capture_replies_keeps_what_the_typed_methods_parsed(lpd: DaemonThread) -> None:
    async def main() -> None:
        async with LivepatchClient(lpd.url, lpd.host) as c:
            with capture_replies() as replies:
                info = await c.info()
                symbol = await c.symbol("work_chain")
            outside = await c.tasks()
            assert outside.tasks
            assert len(replies) == 2
            assert json.loads(replies[0].payload)["data"]["host"] == info.host
            assert json.loads(replies[1].payload)["data"]["name"] == symbol.name
    run(main())


def test_json_prints_the_raw_reply_of_a_typed_call(lpd: DaemonThread) -> None:
    base = ["--broker", lpd.url, "--host", lpd.host]
    shown = runner.invoke(app, [*base, "--json", "symbols", "work_chain"])
    assert shown.exit_code == 0
    reply = json.loads(shown.stdout)
    assert (reply["ok"], reply["data"]["name"]) == (True, "work_chain")
    refused = runner.invoke(app, [*base, "--json", "patch", "info", "no_such_patch"])
    assert refused.exit_code == 1
    assert json.loads(refused.stdout)["error"]["code"] == "livepatch_not_found"
    told = runner.invoke(app, [*base, "patch", "info", "no_such_patch"])
    assert told.exit_code == 1
    assert "livepatch_not_found:" in told.stderr
