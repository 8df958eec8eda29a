"""What makes a fleet host's boot cheap keeps ftrace_init's meaning: the boot sites worked out once per image and
written as one array batch are the records and the words the per-site path gives, on every kernel of the image."""

from __future__ import annotations

import numpy as np
import pytest

from daemon.arch.arm64 import callsite, insn
from daemon.errors import PatchMismatch
from daemon.ftrace.core import Ftrace
from daemon.ftrace.records import records_from
from daemon.kernel.kernel import Kernel


def _expected(kernel: Kernel) -> list[tuple[int, str]]:
    ks = kernel.kallsyms

    def name_at(addr: int) -> str | None:
        sym = ks.containing(addr)
        return sym.name if sym is not None and sym.addr == addr else None
    return [(r.ip, r.name) for r in records_from(kernel.image.mcount_loc(), name_at)]


def test_boot_records_and_sites_are_ftrace_inits_on_each_kernel(kernel: Kernel) -> None:
    first = Ftrace(kernel)
    with Kernel(kernel.config) as other:  # a second kernel of the same image: the cached sites, fresh records
        second = Ftrace(other)
        expected = _expected(kernel)
        for f in (first, second):
            assert [(r.ip, r.name) for r in f.records] == sorted(expected)
            assert all((r.flags, r.target, r.literal) == (0, 0, f.nop_ops) for r in f.records)
            mem = f.kernel.memory
            for r in f.records[:: max(1, len(f.records) // 200)]:
                assert mem.read_u32(r.ip - 4) == insn.MOV_X9_LR
                assert mem.read_u64(callsite.literal_addr(r.ip)) == f.nop_ops
            assert f.last_batch is not None
            assert (f.last_batch.sites, f.last_batch.data) == (len(expected), len(expected))
        assert first.records[0] is not second.records[0], "records are per kernel"
        second.records[0].flags = 1
        assert first.records[0].flags == 0


def test_a_bulk_batch_with_one_wrong_word_writes_nothing(kernel: Kernel) -> None:
    f = Ftrace(kernel)
    ips = np.array([r.ip for r in f.records[:3]], dtype=np.uint64)
    lits = np.array([callsite.literal_addr(int(i)) for i in ips], dtype=np.uint64)
    before = [kernel.memory.read_u32(int(i) - 4) for i in ips]
    old = np.array([insn.MOV_X9_LR, insn.NOP, insn.MOV_X9_LR], dtype=np.uint32)  # the middle one is wrong
    new = np.full(3, insn.NOP, dtype=np.uint32)
    with pytest.raises(PatchMismatch, match="1 site"):
        f.patcher.apply_bulk(ips - np.uint64(4), old, new, lits, 0)
    assert [kernel.memory.read_u32(int(i) - 4) for i in ips] == before
    assert all(kernel.memory.read_u64(int(a)) == f.nop_ops for a in lits), "no literal written either"
