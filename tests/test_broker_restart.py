"""A broker with persistence restarted (kill -9 and SIGTERM, ~2 s down) while ops register and unregister: every
request is answered, and the final ops list is exactly what the replies said; a reply in flight when the broker
dies is answered to the SDK's re-sent copy right after the restart (issue 10 §2)."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from pathlib import Path

from cutting_proxy import CuttingProxy
from mqtt_fixtures import DaemonThread, Mosquitto, daemon_settings, run, wait_for

from clients.sdk import LivepatchClient

ROUNDS = 20
DOWN_S = 2.0
NAMES = ("br_a", "br_b", "br_c")


def _stop_broker(broker: Mosquitto, sig: signal.Signals) -> None:
    proc = broker.proc
    assert proc is not None
    proc.send_signal(sig)
    proc.wait(10)
    if proc.stderr:
        proc.stderr.close()
    broker.proc = None


def test_broker_restarts_with_persistence_keep_replies_and_ops_in_agreement(tmp_path: Path) -> None:
    conf = f"allow_anonymous true\npersistence true\npersistence_location {tmp_path / 'broker'}/\n"
    broker = Mosquitto(tmp_path / "broker", extra_conf=conf)
    broker.start()
    lpd = None
    try:
        lpd = DaemonThread(daemon_settings(tmp_path / "state", broker.url)).start()

        async def main() -> None:
            registered: set[str] = set()
            async with LivepatchClient(broker.url, lpd.host, timeout=30) as c:
                for round_ in range(ROUNDS):
                    stop = asyncio.Event()

                    async def churn(stop: asyncio.Event = stop) -> int:
                        done = 0
                        i = 0
                        while not stop.is_set() or done < 4:
                            name = NAMES[i % len(NAMES)]
                            i += 1
                            if name in registered:
                                await c.ops_unregister(name)
                                registered.discard(name)
                            else:
                                await c.ops_register(name, filter="cmdline_proc_show")
                                registered.add(name)
                            done += 1
                        return done

                    worker = asyncio.ensure_future(churn())
                    await asyncio.sleep(0.3)
                    sig = signal.SIGKILL if round_ % 2 == 0 else signal.SIGTERM
                    await asyncio.to_thread(_stop_broker, broker, sig)
                    await asyncio.sleep(DOWN_S)
                    await asyncio.to_thread(broker.start)
                    started = time.monotonic()
                    await asyncio.sleep(0.5)
                    stop.set()
                    done = await asyncio.wait_for(worker, 60)  # an SDK timeout fails the round
                    assert done >= 4
                    assert time.monotonic() - started < 30
                    listed = {o.name for o in (await c.ops_list()).ops}
                    assert listed == registered, f"round {round_} ({sig.name}): listed {listed}, replies {registered}"
        run(main())
    finally:
        if lpd is not None:
            lpd.stop()
        broker.stop()


def test_a_reply_in_flight_when_the_broker_dies_is_answered_to_the_resent_request(tmp_path: Path) -> None:
    """The broker dies while the daemon publishes a reply (its PUBACK never comes): the publish ends with the
    connection, not after the publish timeout, so its key leaves ``_delivering`` at once; after the restart the
    SDK's re-sent copy is answered from the journal within seconds, and the change was applied once."""
    conf = f"allow_anonymous true\npersistence true\npersistence_location {tmp_path / 'broker'}/\n"
    broker = Mosquitto(tmp_path / "broker", extra_conf=conf)
    broker.start()
    rid = f"inflight-{uuid.uuid4().hex}"
    proxy = CuttingProxy(broker.port, marker=rid.encode(), hold=True)  # only the daemon goes through it
    lpd = None
    try:
        lpd = DaemonThread(daemon_settings(tmp_path / "state", proxy.url)).start()
        bridge = lpd.daemon.bridge
        assert bridge is not None

        async def main() -> None:
            async with LivepatchClient(broker.url, lpd.host, timeout=30) as c:
                request = asyncio.ensure_future(c.ops_register("inflight", filter="cmdline_proc_show",
                                                               request_id=rid))
                assert await asyncio.to_thread(proxy.held.wait, 20)  # the reply is under way, unacknowledged
                await wait_for(lambda: bridge._delivering, 5)
                assert not request.done()
                await asyncio.to_thread(_stop_broker, broker, signal.SIGKILL)
                lost = time.monotonic()
                await wait_for(lambda: not bridge._delivering, 5)
                released = time.monotonic() - lost
                assert released < 2.0, f"the reply's key was held {released:.1f} s after the connection was lost"
                await asyncio.sleep(0.5)
                await asyncio.to_thread(broker.start)
                restarted = time.monotonic()
                ops = await asyncio.wait_for(request, 30)
                answered = time.monotonic() - restarted
                assert answered < 10.0, f"answered {answered:.1f} s after the broker restart"
                assert ops.ops.name == "inflight"
                listed = [o.name for o in (await c.ops_list()).ops]
                assert listed.count("inflight") == 1
                assert proxy.cuts == 1
        run(main())
    finally:
        if lpd is not None:
            lpd.stop()
        proxy.close()
        broker.stop()
