"""kprobes over corpus functions (real emulator, real image): every instruction of a few corpus functions probed,
the results equal the unprobed ones; a probe at the function's address beside an ftrace ops at ``rec->ip``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from daemon.errors import KprobeRefused
from daemon.ftrace.core import Ftrace
from daemon.ftrace.tracer import FunctionProfiler
from daemon.guest.corpus import function_names
from daemon.kernel.kernel import Kernel
from daemon.kprobes.core import Kprobes
from tests.conftest import booted

NAMES = function_names()
# leaves (x * mul + add) and chained ones (BL to the previous function), plus a BL into a static helper
FUNCS = [NAMES[0], NAMES[1], NAMES[9], NAMES[640], NAMES[641], "corpus_dup_00", "corpus_dup_03"]
INPUTS = [0, 1, 0x7FFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF, 0x1234_5678_9ABC_DEF0]


@pytest.fixture(scope="module")
def ftrace() -> Iterator[Ftrace]:
    """Ftrace initialised the sites (``mov x9, x30`` at each function's address) before any probe is armed."""
    for k in booted():
        yield Ftrace(k)


def _probe_everywhere(kernel: Kernel, kp: Kprobes, expect: dict[tuple[str, int], int]) -> dict[str, int]:
    modes: dict[str, int] = {}
    for fn in FUNCS:
        s = kernel.kallsyms.lookup(fn)
        for off in range(0, s.size, 4):
            if off == 4:
                with pytest.raises(KprobeRefused, match=r"rec->ip"):
                    kp.register("c", f"{fn}+{off:#x}")
                continue
            p = kp.register("c", f"{fn}+{off:#x}", record=True, post=True)
            modes[p.mode] = modes.get(p.mode, 0) + 1
            try:
                for cpu in range(kernel.config.nr_cpus):
                    for x in INPUTS:
                        assert kernel.call(fn, x, cpu=cpu) == expect[(fn, x)], (fn, off, p.mode, x)
                info = kp.info(p)
                n = kernel.config.nr_cpus * len(INPUTS)
                assert (info["hits"], info["post_hits"], info["nmissed"]) == (n, n, 0), (fn, off, info)
                hits = kp.drain()
                assert len(hits) == 2 * n
                assert all(h.regs["pc"] == p.addr for h in hits if not h.post)
            finally:
                kp.unregister("c")
    return modes


def test_corpus_functions_probed_at_every_instruction(ftrace: Ftrace) -> None:
    kernel = ftrace.kernel
    kp = Kprobes(kernel, ftrace.patcher)
    expect = {(fn, x): kernel.call(fn, x) for fn in FUNCS for x in INPUTS}
    text = {fn: kernel.memory.read(kernel.kallsyms.addr(fn), kernel.kallsyms.lookup(fn).size) for fn in FUNCS}
    modes = _probe_everywhere(kernel, kp, expect)
    assert set(modes) == {"step", "simulate:b", "simulate:br"}, modes  # func+0 is mov x9, x30 once ftrace is up
    assert kp.bugs() == 0
    for fn in FUNCS:  # every BRK and slot gone: the text is what it was
        assert kernel.memory.read(kernel.kallsyms.addr(fn), len(text[fn])) == text[fn]


def test_probe_at_function_address_beside_an_ftrace_ops(ftrace: Ftrace) -> None:
    """arm64 has no KPROBES_ON_FTRACE: the BRK at func+0 steps ``mov x9, x30`` and the BL at rec->ip still
    calls ftrace_caller; both count every call."""
    kernel = ftrace.kernel
    kp = Kprobes(kernel, ftrace.patcher)
    fn = NAMES[1]
    expect = {x: kernel.call(fn, x) for x in INPUTS}
    prof = FunctionProfiler(ftrace, filter=fn)
    prof.start()
    try:
        p = kp.register("both", fn)
        assert p.mode == "step"
        assert p.opcode == 0xAA1E03E9  # mov x9, x30: ftrace_init_nop's, stepped out of line
        for x in INPUTS:
            assert kernel.call(fn, x) == expect[x]
        assert kp.info(p)["hits"] == len(INPUTS)
        assert {line.name: line.hits for line in prof.report()} == {fn: len(INPUTS)}
        kp.unregister("both")
        assert kernel.call(fn, 3) == kernel.call(fn, 3)
        assert {line.name: line.hits for line in prof.report()} == {fn: len(INPUTS) + 2}
    finally:
        prof.close()
