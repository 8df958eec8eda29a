"""A broker with persistence restarted (kill -9 and SIGTERM, ~2 s down) while ops register and unregister: every
request is answered, and the final ops list is exactly what the replies said (issue 10 §2)."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from mqtt_fixtures import DaemonThread, Mosquitto, daemon_settings, run

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
