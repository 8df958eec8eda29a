"""Every SUBACK read, and lpctl's --timeout as a hard bound on the whole command.

A private NATS (MQTT gateway) whose anonymous clients are observers allowed to read host status and state only:
the SDK's subscription to its reply topic is refused (SUBACK 0x80), which must surface at once as
SubscriptionFailed / lpctl exit 3 with the broker's reason, never a silent wait for a reply that cannot come.
(Mosquitto 2.0 grants a subscription its ACL denies and drops the messages: no client can tell that from a quiet
topic.) A listener that accepts TCP and never answers stands for a broker stuck before its CONNACK.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from broker_fixtures import Nats
from mqtt_fixtures import REPO, run

from clients.sdk import LivepatchClient, SubscriptionFailed

OBSERVERS_ONLY = """
no_auth_user: observer
authorization {
  users: [
    { user: observer, password: secret,
      permissions: { publish: { deny: ["livepatch.v1.*.request.>"] },
                     subscribe: { allow: ["livepatch.v1.*.status", "livepatch.v1.*.state"] } } }
  ]
}
"""


@pytest.fixture(scope="module")
def status_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nats]:
    broker = Nats(tmp_path_factory.mktemp("nats-acl"), conf_extra=OBSERVERS_ONLY)
    try:
        yield broker.start()
    finally:
        broker.stop()


def test_a_refused_subscription_is_an_error_with_the_reason(status_only: Nats) -> None:
    async def main() -> None:
        async with LivepatchClient(status_only.url, "web-01", timeout=2):
            pass
    started = time.monotonic()
    with pytest.raises(SubscriptionFailed, match=r"reply/lpsdk-\w+ failed: the broker answered .*\(0x8\d\)") as exc:
        run(main())
    assert exc.value.topic.startswith("livepatch/v1/web-01/reply/")
    assert time.monotonic() - started < 5  # a few retries with backoff, not a timeout per attempt


def test_a_granted_subscription_passes(status_only: Nats) -> None:
    async def main() -> None:
        async with LivepatchClient(status_only.url, None, timeout=2) as c:
            assert await c.hosts(0.1) == {}
    run(main())


def lpctl(*args: str, timeout: float = 60) -> tuple[int, str, float]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "clients.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, check=False)
    return proc.returncode, proc.stderr, time.monotonic() - started


def test_lpctl_exits_3_with_the_brokers_reason(status_only: Nats) -> None:
    code, err, _ = lpctl("--broker", status_only.url, "--host", "web-01", "--timeout", "5", "info")
    assert code == 3
    assert "subscription to livepatch/v1/web-01/reply/" in err
    assert "Unspecified error (0x80)" in err
    assert "ACL" in err  # the hint


def listen_silently() -> socket.socket:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)  # connections complete in the backlog and are never accepted: no byte ever comes back
    return server


@pytest.fixture
def silent() -> Iterator[int]:
    server = listen_silently()
    yield int(server.getsockname()[1])
    server.close()


@pytest.fixture
def startup() -> float:
    """What lpctl takes to start and exit with nothing to do (imports: a loaded machine makes it slow)."""
    return min(lpctl("--help")[2] for _ in range(2))


@pytest.mark.parametrize("command", [["info"], ["status"], ["state"], ["hosts"]])
def test_timeout_bounds_the_whole_command(silent: int, command: list[str], startup: float) -> None:
    code, err, took = lpctl("--broker", f"mqtt://127.0.0.1:{silent}", "--host", "web-01", "--timeout", "1.5",
                            *command)
    assert code == 3
    assert "(--timeout)" in err or "CONNACK" in err
    budget = 1.5 + (0.5 if command == ["hosts"] else 0)  # hosts: --timeout plus its --wait
    assert took < startup + budget + 2.5  # the watchdog fires 2 s past the budget at the latest


def test_timeout_bounds_every_node_of_a_list(startup: float) -> None:
    servers = [listen_silently() for _ in range(4)]
    try:
        nodes = ",".join(f"mqtt://127.0.0.1:{s.getsockname()[1]}" for s in servers)
        code, err, took = lpctl("--broker", nodes, "--host", "web-01", "--timeout", "2", "info")
    finally:
        for server in servers:
            server.close()
    assert code == 3
    assert took < startup + 2 + 2.5  # four silent nodes, each worth a 2 s CONNACK wait twice (5, then 3.1.1)
    assert "within 2 s (--timeout)" in err
