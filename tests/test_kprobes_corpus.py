"""kprobes over corpus functions (real emulator, real image): every instruction of every corpus function probed
(a differential test: results equal the unprobed ones, hit counts exact, refusals carry a documented reason); every
instruction of a few functions with recording handlers; a probe at the function's address beside an ftrace ops at
``rec->ip``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from daemon.errors import KprobeRefused
from daemon.ftrace.core import Ftrace
from daemon.ftrace.tracer import FunctionProfiler
from daemon.guest import abi
from daemon.guest.corpus import function_names
from daemon.kernel.kernel import Kernel
from daemon.kprobes import decode
from daemon.kprobes.core import ADDRESS_REFUSALS, Kprobes, ProbeSpec
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


def _chain_callee(i: int) -> int | None:
    """The corpus function that function ``i`` calls (every 8th, offset 1, calls its predecessor)."""
    return i - 1 if i % 8 == 1 else None


def test_every_corpus_function_probed_at_every_instruction(ftrace: Ftrace) -> None:
    """Round k probes instruction k of every corpus function: the probes are armed KPROBE_MAX at a time (the size
    of the guest's kprobe_table), each group in one stop-machine batch, every probed function runs once with its
    input, results equal the unprobed run, each probe counts exactly the calls that passed it (a chained function
    also runs its callee), then the group is disarmed in one batch. Refused addresses give a documented reason."""
    kernel = ftrace.kernel
    kp = Kprobes(kernel, ftrace.patcher)
    funcs = [(i, kernel.kallsyms.lookup(fn)) for i, fn in enumerate(NAMES)]
    inputs = [INPUTS[i % len(INPUTS)] for i in range(len(NAMES))]
    ncpu = kernel.config.nr_cpus

    def run(indices: list[int]) -> list[int]:
        futures = [kernel.submit(funcs[i][1].addr, inputs[i], cpu=j % ncpu) for j, i in enumerate(indices)]
        return [f.result(30) for f in futures]

    everyone = list(range(len(funcs)))
    expect = run(everyone)
    lo = min(s.addr for _, s in funcs)
    hi = max(s.addr + s.size for _, s in funcs)
    text = kernel.memory.read(lo, hi - lo)
    documented = ADDRESS_REFUSALS | decode.REFUSAL_REASONS
    probed = refused = batches = 0
    modes: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for k in range(max(s.size for _, s in funcs) // 4):
        armable: list[int] = []
        for i, s in funcs:
            if 4 * k >= s.size:
                continue
            try:
                kp.check_address(s.addr + 4 * k, s.name, 4 * k)
            except KprobeRefused as exc:
                reason = str(exc.details["reason"])
                assert reason in documented, (s.name, k, reason)
                reasons[reason] = reasons.get(reason, 0) + 1
                refused += 1
                continue
            armable.append(i)
        for start in range(0, len(armable), abi.KPROBE_MAX):
            group = armable[start:start + abi.KPROBE_MAX]
            probes = kp.register_batch([ProbeSpec(f"c{i}", funcs[i][1].addr + 4 * k, post=True) for i in group])
            batches += 1
            try:
                got = run(group)
                assert got == [expect[i] for i in group], (k, [funcs[i][1].name for i in group])
                in_group = set(group)
                want = dict.fromkeys(group, 1)
                for i in group:
                    callee = _chain_callee(i)
                    if callee is not None and callee in in_group:
                        want[callee] += 1
                for i, p in zip(group, probes, strict=True):
                    modes[p.mode] = modes.get(p.mode, 0) + 1
                    counts = (kp.counter(p, "hits"), kp.counter(p, "post_hits"), kp.counter(p, "nmissed"))
                    assert counts == (want[i], want[i], 0), (p.symbol, p.offset, p.mode, counts)
            finally:
                kp.unregister_batch([p.name for p in probes])
            probed += len(group)
    # func+4 is every function's rec->ip: refused, as on Linux; nothing else in this corpus is
    rec_ip = [r for r in ADDRESS_REFUSALS if "rec->ip" in r]
    assert reasons == {rec_ip[0]: len(funcs)}, reasons
    assert probed + refused == sum(s.size // 4 for _, s in funcs)
    assert {"step", "simulate:br"} <= set(modes), modes
    assert kp.bugs() == 0
    assert kernel.memory.read(lo, hi - lo) == text  # every BRK gone, no stray write
    assert run(everyone) == expect
    print(f"{probed} probes over {len(funcs)} functions in {batches} batches; modes {modes}; refused {refused}")
