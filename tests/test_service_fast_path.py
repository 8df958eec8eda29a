"""The read fast path: a mutating request's fsync runs beside the event loop (group fsync) and is still done
before its PUBACK; reads are answered meanwhile; an fsync that fails refuses the request, durably."""

from __future__ import annotations

import asyncio
import errno
import json
import threading
import time
from pathlib import Path

import pytest
from pydantic import Field

from daemon.service import Journal, RequestContext, Service
from daemon.service.store.durability import GroupSync
from schemas import VERBS, KernelState, Outbound, Request, VerbSpec


class StepRequest(Request):
    value: int = Field(default=0, ge=0)


class StepData(Outbound):
    value: int


@pytest.fixture
def verbs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(VERBS, "test.change", VerbSpec("test.change", StepRequest, StepData, "a change",
                                                       mutating=True))
    monkeypatch.setitem(VERBS, "test.read", VerbSpec("test.read", StepRequest, StepData, "a read"))


class SlowFsync:
    """The journal's real fsync, held until ``release`` (fault injection on the real object), counted."""

    def __init__(self, journal: Journal) -> None:
        self.real = journal.fsync_wal
        self.gate = threading.Event()
        self.started = threading.Event()
        self.calls = 0
        self.error: OSError | None = None
        journal.fsync_wal = self  # type: ignore[method-assign]

    def __call__(self) -> None:
        self.calls += 1
        self.started.set()
        assert self.gate.wait(10)
        if self.error is not None:
            raise self.error
        self.real()


def make_service(tmp: Path, *, fast: bool = True) -> tuple[Service, list[int], SlowFsync]:
    journal = Journal(tmp / "j.sqlite3")
    fsync = SlowFsync(journal)
    service = Service(host="fast", boot_seq=journal.next_boot_seq(), journal=journal, read_fast_path=fast,
                      kernel=KernelState(build_id="x", nr_cpus=1, booted_at=time.time()))
    executed: list[int] = []

    def change(req: StepRequest, ctx: RequestContext) -> StepData:
        executed.append(req.value)
        return StepData(value=req.value)

    async def read(req: StepRequest, ctx: RequestContext) -> StepData:
        return StepData(value=req.value)

    service.serve({"test.change": change, "test.read": read})
    return service, executed, fsync


def payload(rid: str, value: int = 0) -> bytes:
    return json.dumps({"request_id": rid, "value": value}).encode()


async def wait_thread(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, 10)


def test_a_change_is_acknowledged_after_its_fsync_and_reads_are_served_meanwhile(tmp_path: Path,
                                                                                  verbs: None) -> None:
    service, executed, fsync = make_service(tmp_path)
    acks: list[str] = []

    async def main() -> None:
        change = asyncio.get_running_loop().create_task(
            service.handle("test.change", payload("c1", 7), ack=lambda: acks.append("c1")))
        await wait_thread(fsync.started)
        # the row is committed (a crash now replays it) but not acknowledged, nor executed
        assert service.journal.get("c1") is not None
        assert acks == []
        assert executed == []
        started = time.perf_counter()
        read = await service.handle("test.read", payload("r1", 1), ack=lambda: acks.append("r1"))
        assert read.reply.ok
        assert acks == ["r1"]
        assert time.perf_counter() - started < 1.0  # served while the change's fsync is held
        assert not change.done()
        fsync.gate.set()
        outcome = await change
        assert outcome.reply.ok
        assert outcome.reply.data == {"value": 7}
        assert acks == ["r1", "c1"]
        assert executed == [7]

    asyncio.run(main())
    assert fsync.calls == 1  # the read's commit needed no fsync
    service.close()
    service.journal.close()


def test_one_fsync_covers_every_change_committed_before_it_began(tmp_path: Path, verbs: None) -> None:
    service, executed, fsync = make_service(tmp_path)
    acks: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        first = loop.create_task(service.handle("test.change", payload("c0"), ack=lambda: acks.append("c0")))
        await wait_thread(fsync.started)  # the first fsync is under way: the next ones wait for a second one
        rest = [loop.create_task(service.handle("test.change", payload(f"c{i}", i),
                                                ack=lambda i=i: acks.append(f"c{i}"))) for i in range(1, 6)]
        await asyncio.sleep(0.05)
        assert acks == []
        fsync.gate.set()
        outcomes = await asyncio.gather(first, *rest)
        assert all(o.reply.ok for o in outcomes)

    asyncio.run(main())
    assert sorted(executed) == [0, 1, 2, 3, 4, 5]
    assert fsync.calls == 2  # c0's, then one for c1..c5
    assert sorted(acks) == [f"c{i}" for i in range(6)]
    service.close()
    service.journal.close()


def test_a_failed_fsync_refuses_the_change_durably(tmp_path: Path, verbs: None) -> None:
    service, executed, fsync = make_service(tmp_path)
    fsync.error = OSError(errno.EIO, "Input/output error")
    fsync.gate.set()
    acks: list[str] = []

    async def main() -> None:
        out = await service.handle("test.change", payload("c1", 3), ack=lambda: acks.append("c1"))
        assert out.reply.error is not None
        assert out.reply.error.code == "storage_full"
        assert "could not be made durable" in out.reply.error.message
        assert out.reply.error.details["errno"] == errno.EIO
        again = await service.handle("test.change", payload("c1", 3), ack=lambda: acks.append("c1 again"))
        assert again.reply == out.reply  # answered from the journal, not run
        fsync.error = None  # the disk is back: the next change goes through
        ok = await service.handle("test.change", payload("c2", 4))
        assert ok.reply.ok

    asyncio.run(main())
    assert executed == [4]
    assert acks == ["c1", "c1 again"]  # refused: acknowledged, with the refusal as the reply
    entry = service.journal.get("c1")
    assert entry is not None
    assert entry.reply is not None
    assert "storage_full" in entry.reply
    service.close()
    service.journal.close()
    # after a restart nothing is replayed: the refusal is the request's answer
    journal = Journal(tmp_path / "j.sqlite3")
    assert journal.unanswered() == []
    journal.close()


def test_a_repeated_change_is_acknowledged_only_once_the_first_copy_is_durable(tmp_path: Path,
                                                                                verbs: None) -> None:
    service, executed, fsync = make_service(tmp_path)
    acks: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        first = loop.create_task(service.handle("test.change", payload("c1", 5), ack=lambda: acks.append("first")))
        await wait_thread(fsync.started)
        second = loop.create_task(service.handle("test.change", payload("c1", 5),
                                                 ack=lambda: acks.append("second")))
        await asyncio.sleep(0.05)
        assert acks == []
        fsync.gate.set()
        a, b = await asyncio.gather(first, second)
        assert a.reply == b.reply
        assert a.reply.ok

    asyncio.run(main())
    assert executed == [5]
    assert sorted(acks) == ["first", "second"]
    service.close()
    service.journal.close()


def test_without_the_fast_path_the_fsync_is_part_of_the_commit(tmp_path: Path, verbs: None) -> None:
    service, executed, fsync = make_service(tmp_path, fast=False)  # fsync: never called
    out = asyncio.run(service.handle("test.change", payload("c1", 1)))
    assert out.reply.ok
    assert executed == [1]
    assert fsync.calls == 0
    service.close()
    service.journal.close()


def test_group_sync_retries_after_a_failed_fsync() -> None:
    outcomes: list[OSError | None] = [OSError(errno.ENOSPC, "No space left on device"), None]
    calls = []

    def fsync() -> None:
        calls.append(1)
        err = outcomes.pop(0)
        if err is not None:
            raise err

    sync = GroupSync(fsync)

    async def main() -> None:
        t = sync.ticket()
        with pytest.raises(OSError, match="No space"):
            await sync.durable(t)
        await sync.durable(t)  # a new fsync, which succeeds
        await sync.durable(t)  # durable already: no fsync

    asyncio.run(main())
    assert len(calls) == 2
    assert sync.fsyncs == 2
    sync.close()


def test_a_benchmark_may_measure_changes_without_their_fsync(tmp_path: Path, verbs: None) -> None:
    journal = Journal(tmp_path / "j.sqlite3")
    fsync = SlowFsync(journal)  # the gate stays shut: a call would hang the test
    service = Service(host="fast", boot_seq=journal.next_boot_seq(), journal=journal, fsync=False,
                      kernel=KernelState(build_id="x", nr_cpus=1, booted_at=time.time()))
    service.register("test.change", lambda req, ctx: StepData(value=req.value))
    acks: list[str] = []
    out = asyncio.run(service.handle("test.change", payload("c1", 2), ack=lambda: acks.append("c1")))
    assert out.reply.ok
    assert acks == ["c1"]
    assert fsync.calls == 0
    service.close()
    journal.close()
