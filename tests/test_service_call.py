"""The ``call`` verb end to end (real mosquitto, real kernel): 64-bit arguments, timeouts and their late results."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from mqtt_fixtures import DaemonThread, Mosquitto, daemon_settings, run
from test_service_mqtt import raw_request
from test_service_patch import Session

from clients.sdk import LivepatchClient, ReplyError

CALL_TIMEOUT_S = 0.5
LATE = 40_000_000  # getpid_loop iterations: longer than CALL_TIMEOUT_S (~1.5 s)
U64 = (1 << 64) - 1


@pytest.fixture(scope="module")
def quick(mosquitto: Mosquitto, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonThread]:
    """A daemon whose calls time out after CALL_TIMEOUT_S."""
    d = DaemonThread(daemon_settings(tmp_path_factory.mktemp("quick"), mosquitto.url,
                                     call_timeout_s=CALL_TIMEOUT_S)).start()
    yield d
    d.stop()


def expected(lpd: DaemonThread, fn: str, *args: int, cpu: int = 0) -> int:
    kernel = lpd.daemon.kernel
    assert kernel is not None
    return kernel.call(fn, *args, cpu=cpu)


def test_arguments_are_64_bit_twos_complement(quick: DaemonThread) -> None:
    """What the schema accepts (-2**63 .. 2**64-1) runs: -1 and 2**64-1 are the same register value."""
    async def main() -> None:
        async with LivepatchClient(quick.url, quick.host) as c:
            minus_one = await c.call("work_chain", -1)
            assert minus_one.value == expected(quick, "work_chain", U64)
            assert (await c.call("work_chain", U64)).value == minus_one.value
            assert (await c.call("work_chain", -(1 << 63))).value == expected(quick, "work_chain", 1 << 63)
            assert (await c.call("work_step_c", -2, cpu=1)).value == expected(quick, "work_step_c", U64 - 1)
        for bad in (-(1 << 63) - 1, 1 << 64):
            rid = uuid.uuid4().hex
            reply = await raw_request(quick, "call", f'{{"request_id": "{rid}", "function": "work_chain", '
                                                     f'"args": [{bad}]}}'.encode())
            error = reply["error"]
            assert isinstance(error, dict)
            assert error["code"] == "bad_request", error
            assert quick.daemon.service is not None
            assert quick.daemon.service.journal.get(rid) is None, "refused before the journal"
    run(main())


def test_a_call_that_times_out_is_answered_timeout_and_its_late_result_is_an_event(quick: DaemonThread) -> None:
    async def main() -> None:
        async with Session(quick.url, quick.host) as s:
            c = s.c
            address = (await c.symbol("getpid_loop")).address
            with pytest.raises(ReplyError) as err:
                await c.call("getpid_loop", LATE, cpu=1)
            assert err.value.code == "timeout"
            assert err.value.details["function"] == "getpid_loop"
            assert err.value.details["address"] == f"{address:#x}"
            assert err.value.details["cpu"] == 1
            assert "getpid_loop" in err.value.message
            assert f"{address:#x}" in err.value.message
            # the other CPU still serves meanwhile
            assert (await c.call("work_chain", 3, cpu=0)).value == expected(quick, "work_chain", 3)
            late = await s.event("call.finished_late", timeout=30)
            assert late["function"] == "getpid_loop"
            assert late["address"] == f"{address:#x}"
            assert late["ok"] is True
            assert late["value"] == LATE, "every getpid in the loop returned the worker's pid"
            assert late["elapsed_s"] > CALL_TIMEOUT_S
            assert late["request_id"] == err.value.request_id
            assert late["cpu"] == 1
    run(main())
