"""Memory fetch args (``+OFFS(%REG)``): read by the guest at the hit from mapped memory only, ``(fault)``
otherwise; parsed from kprobe_events lines and printed in trace lines."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.errors import KprobeRefused
from daemon.kernel.kernel import Kernel, KernelConfig
from daemon.kprobes.core import Kprobes
from daemon.service import Journal, Service
from daemon.service.kprobes import KprobeSubsystem
from schemas import KernelState
from schemas.kprobes import parse_probe_definition
from tests.conftest import booted


@pytest.fixture
def kernel() -> Iterator[Kernel]:
    yield from booted()


def test_fetches_read_memory_at_the_hit(kernel: Kernel) -> None:
    kp = Kprobes(kernel)
    buf = kernel.host_buffer.alloc(32)
    for i in range(4):
        kernel.memory.write_u64(buf + 8 * i, 0x1000 + i)
    kp.register("ld", "kpt_load", record=True, fetch=(("x0", 0), ("x0", 8), ("x0", 24), ("sp", 0)))
    assert kernel.call("kpt_load", buf) == 0x1001
    kernel.memory.write_u64(buf, 0x2000)  # changed after the hit: the record keeps what the guest read then
    (hit,) = kp.drain()
    assert hit.mem[:3] == (0x1000, 0x1001, 0x1003)
    assert hit.mem[3] == kernel.memory.read_u64(hit.regs["sp"])  # the stack is mapped memory too
    assert kernel.call("kpt_load", buf + 8) == 0x1002
    (hit,) = kp.drain()
    assert hit.mem[:2] == (0x1001, 0x1002)


def test_an_unmapped_fetch_is_a_fault_not_a_crash(kernel: Kernel) -> None:
    kp = Kprobes(kernel)
    kp.register("leaf", "kpt_leaf", record=True, fetch=(("x0", 0), ("x0", -8), ("pc", 0)))
    assert kernel.call("kpt_leaf", 5) == 16  # x0 = 5: no such address
    (hit,) = kp.drain()
    assert hit.mem[:2] == (None, None)
    assert hit.mem[2] == kernel.memory.read_u64(kernel.kallsyms.addr("kpt_leaf"))  # text is readable
    kernel.machine.check()


def test_bad_fetches_are_refused(kernel: Kernel) -> None:
    kp = Kprobes(kernel)
    with pytest.raises(KprobeRefused, match="at most 4"):
        kp.register("m", "kpt_leaf", fetch=(("x0", 0),) * 5)
    with pytest.raises(KprobeRefused, match="pstate"):
        kp.register("m", "kpt_leaf", fetch=(("pstate", 0),))
    with pytest.raises(KprobeRefused, match="32 bits"):
        kp.register("m", "kpt_leaf", fetch=(("x0", 1 << 40),))
    assert kp.describe() == []
    d = parse_probe_definition("p:m kpt_load +8(%x0):u32 v=-0x10($arg1) w=+0(sp) x0")
    assert [(a.name, a.reg, a.offset, a.type) for a in d.args] == [
        ("arg1", "x0", 8, "u32"), ("v", "x0", -16, "x64"), ("w", "sp", 0, "x64"), ("arg4", "x0", None, "x64")]
    for bad in ("p:m kpt_leaf +0(+8(%x0))", "p:m kpt_leaf +8(%pstate)", "p:m kpt_leaf +8(%x40)"):
        with pytest.raises(ValueError):  # noqa: PT011  (each is a different message)
            parse_probe_definition(bad)


def test_trace_lines_and_definitions_through_the_verbs(tmp_path: Path) -> None:
    kernel = Kernel(KernelConfig(nr_cpus=1)).boot()
    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        service = Service(host="h", boot_seq=journal.next_boot_seq(), journal=journal,
                          kernel=KernelState(build_id="b", nr_cpus=1, booted_at=time.time()))
        sub = KprobeSubsystem(service, kernel)
        service.serve(sub.verbs())
        d = parse_probe_definition("p:ld kpt_load first=+0(%x0) second=+8(%x0):u32 p=%x0")

        ids = itertools.count()

        def request(verb: str, **params: object) -> dict[str, object]:
            body = json.dumps({"request_id": f"r{next(ids)}", **params}).encode()
            reply = asyncio.run(service.handle(verb, body)).reply
            assert reply.ok, reply.error
            assert reply.data is not None
            return reply.data

        data = request("kprobe.register", name=d.name, target=d.target, args=[a.model_dump() for a in d.args])
        assert data["definition"] == "p:kprobes/ld kpt_load+0 first=+0(%x0) second=+8(%x0):u32 p=%x0"
        buf = kernel.host_buffer.alloc(16)
        kernel.memory.write_u64(buf, 0xAB)
        kernel.memory.write_u64(buf + 8, 0x1_0000_0007)
        assert kernel.call("kpt_load", buf) == 0xAC
        line = request("kprobe.read")["text"]
        assert isinstance(line, str)
        assert line.rstrip().endswith(f"ld: (kpt_load+0x0/0x14) first=0xab second=7 p={buf:#x}")
        # x0 = 3 is no pointer: the fetch says (fault), kpt_leaf runs as ever
        request("kprobe.unregister", name="ld")
        d2 = parse_probe_definition("p:lf kpt_leaf v=+0(%x0)")
        request("kprobe.register", name=d2.name, target=d2.target, args=[a.model_dump() for a in d2.args])
        assert kernel.call("kpt_leaf", 3) == 10
        text = request("kprobe.read")["text"]
        assert isinstance(text, str)
        assert text.rstrip().endswith("lf: (kpt_leaf+0x0/0x14) v=(fault)")
    finally:
        kernel.shutdown()
        journal.close()
