"""kprobes on the real emulator and image: BRK + out-of-line slots, simulation, refusals, handlers, re-entry."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from daemon.errors import GuestFault, KprobeExists, KprobeNoSpace, KprobeNotFound, KprobeRefused, SymbolError
from daemon.ftrace.core import Ftrace
from daemon.guest import abi, corpus
from daemon.guest.build import IMAGE_PATH
from daemon.kernel.kernel import Kernel, load_image
from daemon.kprobes import decode
from daemon.kprobes.core import Kprobes
from daemon.livepatch import examples
from daemon.livepatch.core import Livepatch
from daemon.livepatch.transition import StallPolicy
from patchformat.bundle import PatchBundle
from tests.conftest import booted

FUNCS = ["kpt_leaf", "kpt_branches", "kpt_literal", "kpt_calls", "kpt_testbit"]
NAMES = corpus.function_names()
CORPUS = [NAMES[0], NAMES[1], NAMES[9], NAMES[17], NAMES[100]]  # leaves, and chained ones (i % 8 == 1)
INPUTS = [0, 5, 0x1_0000_00FF, 0xFFFF_FFFF_FFFF_FFF3]


@pytest.fixture
def kernel() -> Iterator[Kernel]:
    yield from booted()


@pytest.fixture
def kp(kernel: Kernel) -> Kprobes:
    return Kprobes(kernel)


def _code_offsets(kernel: Kernel, fn: str) -> list[int]:
    """Offsets of the function's instructions from its entry (kpt_literal's literal pool skipped)."""
    s = kernel.kallsyms.lookup(fn)
    offs = []
    for off in range(0, s.size, 4):
        w = kernel.memory.read_u32(s.addr + off)
        if fn == "kpt_literal" and w in (0x55667788, 0x11223344, 0x80000001):
            continue
        offs.append(off)
    return offs


def test_every_instruction_probed_gives_the_unprobed_result(kernel: Kernel, kp: Kprobes) -> None:
    """The differential test: every instruction of the selftest functions and of corpus functions, probed,
    gives the unprobed results (and the original text is back after each unregister)."""
    expect = {(f, x): kernel.call(f, x) for f in FUNCS + CORPUS for x in INPUTS}
    modes: set[str] = set()
    for f in FUNCS + CORPUS:
        for off in _code_offsets(kernel, f):
            if off == 4:  # rec->ip: refused (test below)
                continue
            p = kp.register("p", f"{f}+{off:#x}", record=True, post=True)
            modes.add(p.mode)
            try:
                for x in INPUTS:
                    assert kernel.call(f, x) == expect[(f, x)], (f, off, p.mode, x)
                assert kernel.call("kpt_calls", 9) == expect.get(("kpt_calls", 9), kernel.call("kpt_calls", 9))
            finally:
                kp.unregister("p")
    kernel.machine.check()
    for x in INPUTS:  # disarmed: the original text is back
        assert [kernel.call(f, x) for f in FUNCS] == [expect[(f, x)] for f in FUNCS]
    assert modes >= {"step", "simulate:nop", "simulate:b", "simulate:b.cond", "simulate:cbz", "simulate:tbz",
                     "simulate:adr", "simulate:ldr_literal", "simulate:br"}, modes


def test_hits_post_and_registers(kernel: Kernel, kp: Kprobes) -> None:
    p = kp.register("leaf", "kpt_leaf+0x8", record=True, post=True)  # add x8, x0, x0, lsl #1: stepped
    assert p.mode == "step"
    assert p.slot
    for x in range(3):
        assert kernel.call("kpt_leaf", 100 + x) == (100 + x) * 3 + 1
    info = kp.info(p)
    assert (info["hits"], info["post_hits"], info["nmissed"]) == (3, 3, 0)
    hits = kp.drain()
    assert len(hits) == 6
    pre = [h for h in hits if not h.post]
    post = [h for h in hits if h.post]
    assert [h.regs["x0"] for h in pre] == [100, 101, 102]
    assert all(h.regs["pc"] == p.addr for h in pre)
    assert all(h.regs["pc"] == p.addr + 4 for h in post)  # after the step, at the next instruction
    assert [h.regs["x8"] for h in post] == [300, 303, 306]  # the stepped add ran
    for h in pre:
        assert h.regs["pstate"] & 0xF == 0b0101  # EL1h
        assert h.regs["pstate"] >> 32 == 0
        assert h.regs["pstate"] & (1 << 20) == 0  # not an illegal return (SCR_EL3.RW, virtual TLB)
        assert h.regs["sp"] % 16 == 0
        assert h.regs["x30"] != 0
    assert kp.drain() == []


def test_simulated_bl_sets_lr_and_records(kernel: Kernel, kp: Kprobes) -> None:
    s = kernel.kallsyms.lookup("kpt_calls")
    bl_off = next(o for o in range(0, s.size, 4) if kernel.memory.read_u32(s.addr + o) >> 26 == 0x25)
    p = kp.register("bl", f"kpt_calls+{bl_off:#x}", record=True)
    assert p.mode == "simulate:b"
    assert kernel.call("kpt_calls", 4) == 4 * 3 + 1 + 5 * 3 + 1
    (hit,) = kp.drain()
    assert hit.regs["pc"] == p.addr
    assert hit.regs["x0"] == 4


def test_set_register_fault_injection(kernel: Kernel, kp: Kprobes) -> None:
    kp.register("inj", "kpt_leaf+0x10", set_reg=0, set_val=0x1234)  # at the ret: x0 replaced
    assert kernel.call("kpt_leaf", 5) == 0x1234


@pytest.mark.parametrize(("target", "reason"), [
    ("kpt_leaf+0x4", "rec->ip"),
    ("kpt_leaf+0x2", "aligned"),
    ("schedule", "notrace"),
    ("do_debug_exception", "blacklisted"),
    ("el1h_sync", "blacklisted"),
])
def test_refused_places(kp: Kprobes, target: str, reason: str) -> None:
    with pytest.raises(KprobeRefused, match=reason.replace(">", ".")):
        kp.register("r", target)


def test_refused_instruction_classes(kernel: Kernel, kp: Kprobes) -> None:
    def off_of(fn: str, pred: object) -> int:
        s = kernel.kallsyms.lookup(fn)
        return next(o for o in range(8, s.size, 4) if pred(kernel.memory.read_u32(s.addr + o)))  # type: ignore[operator]

    cases = {
        "exclusive": ("kpt_atomic", decode.is_load_exclusive),
        "LL/SC": ("kpt_atomic", lambda w: (w & 0xFF000000) == 0x8B000000),  # the add between ldxr and stxr
        "DAIF": ("kpt_sysregs", lambda w: (w & 0xFFFFFFE0) == 0xD53B4220),
        "exception-generating": ("kpt_sysregs", lambda w: (w & 0xFFE0001F) == 0xD4200000),
    }
    for reason, (fn, pred) in cases.items():
        with pytest.raises(KprobeRefused, match=reason):
            kp.register("r", f"{fn}+{off_of(fn, pred):#x}")
    # the cbnz after the stxr closes the sequence: allowed
    off = off_of("kpt_atomic", lambda w: (w & 0x7F000000) == 0x35000000)
    kp.register("ok", f"kpt_atomic+{off:#x}")
    assert kernel.call("kpt_atomic", 3) == 0
    assert kernel.call("kpt_atomic", 1) == 3
    assert kp.info(kp.get("ok"))["hits"] == 2


def test_decoder_classes() -> None:
    assert decode.decode(0xD503201F) == abi.KP_SIM_NOP
    assert decode.decode(0xD65F03C0) == abi.KP_SIM_BR  # ret
    assert decode.decode(0xD63F0100) == abi.KP_SIM_BR  # blr x8
    assert decode.decode(0x94000000) == abi.KP_SIM_B
    for bad in (0xD4000001, 0xD69F03E0, 0xD51B4220, 0xD50342DF, 0xD8000040, 0xC85F7C00, 0xC85FFC00):
        with pytest.raises(KprobeRefused):  # svc, eret, msr daif, msr daifset, prfm lit, ldxr, ldaxr
            decode.decode(bad)
    assert decode.decode(0xD53BD048) == abi.KP_STEP  # mrs x8, tpidr_el0 is steppable


def test_reentry_is_missed(kernel: Kernel, kp: Kprobes) -> None:
    inner = kp.register("inner", "kpt_leaf+0x8")
    outer = kp.register("outer", "kpt_testbit+0x8", call_fn="kpt_leaf")  # its pre handler runs probed code
    assert kernel.call("kpt_testbit", 5) == 0x205
    assert kp.info(outer)["hits"] == 1
    assert kp.info(inner)["nmissed"] == 1
    assert kp.info(inner)["hits"] == 0
    assert kernel.call("kpt_leaf", 2) == 7  # a direct call is a hit
    assert kp.info(inner)["hits"] == 1
    assert kp.info(inner)["nmissed"] == 1
    assert kp.bugs() == 0


def test_names_and_unregister(kp: Kprobes) -> None:
    kp.register("a", "kpt_leaf")
    with pytest.raises(KprobeExists):
        kp.register("a", "kpt_branches")
    with pytest.raises(KprobeNotFound):
        kp.unregister("zz")
    assert [p["name"] for p in kp.describe()] == ["a"]
    kp.unregister("a")
    assert kp.describe() == []


def test_probes_under_load_on_every_vcpu_armed_and_disarmed_1000_times(kernel: Kernel, kp: Kprobes) -> None:
    """Every vCPU loops over the probed functions (and the corpus load generators run) while probes at every
    instruction class are armed and disarmed 1,000 times: every result stays right, nothing is a BUG."""
    kernel.set_load(abi.LOADGEN_CORPUS)
    n = 8
    expect = kernel.call("kpt_loop", n)
    sites = [f"{f}+{off:#x}" for f in ("kpt_branches", "kpt_calls", "kpt_testbit", "kpt_literal")
             for off in _code_offsets(kernel, f) if off != 4]
    sites += [f"{CORPUS[1]}+{off:#x}" for off in _code_offsets(kernel, CORPUS[1]) if off != 4]
    stop = threading.Event()
    wrong: list[int] = []
    runs = [0] * kernel.config.nr_cpus

    def load(cpu: int) -> None:
        while not stop.is_set():
            got = kernel.call("kpt_loop", n, cpu=cpu, timeout=30)
            if got != expect:
                wrong.append(got)
            runs[cpu] += 1

    threads = [threading.Thread(target=load, args=(c,)) for c in range(kernel.config.nr_cpus)]
    for t in threads:
        t.start()
    hits = 0
    try:
        for i in range(1000):
            name = f"l{i % 3}"
            if i >= 3:
                p = kp.get(name)
                hits += kp.counter(p, "hits")
                kp.unregister(name)
            kp.register(name, sites[(i * 7) % len(sites)], record=i % 2 == 0, post=i % 3 == 0)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    for p in kp.describe():
        kp.unregister(p["name"])
    kernel.set_load(abi.LOADGEN_OFF)
    kernel.machine.check()
    assert wrong == []
    assert min(runs) > 0
    assert hits > 0
    assert kp.bugs() == 0
    assert kernel.load_stats()["errors"] == 0
    assert [kernel.call(f, 5) for f in FUNCS] == [kernel.call(f, 5) for f in FUNCS]


# -- test-kprobe.sh, with arm64's behaviour ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cmdline_bundle(tmp_path_factory: pytest.TempPathFactory) -> PatchBundle:
    build_id = load_image(IMAGE_PATH)[0].build_id
    return examples.build_examples(tmp_path_factory.mktemp("patches"), build_id)["livepatch_cmdline"]


def test_kprobe_and_livepatch_coexist_on_one_function(kernel: Kernel, cmdline_bundle: PatchBundle) -> None:
    """arm64 has no KPROBES_ON_FTRACE: a BRK kprobe (with a post handler) at a function's address and a live
    patch of that function coexist, and the probe still fires on the old entry, before ftrace redirects the call
    (x86's test-kprobe.sh expects -EBUSY for a kprobe with a post handler: an IPMODIFY conflict)."""
    lp = Livepatch(kernel, Ftrace(kernel), policy=StallPolicy(retry_interval=0.02, signal_after=None))
    kp = Kprobes(kernel)  # after ftrace's init of the sites (func+0 is `mov x9, x30` from now on)
    p = kp.register("cmdline", "cmdline_proc_show", post=True, record=True)
    assert p.mode == "step"  # mov x9, x30, stepped out of line
    original = kernel.read_string("proc_cmdline_read")
    assert kp.info(p)["hits"] == 1
    lp.load(cmdline_bundle)
    lp.enable("livepatch_cmdline")  # no -EBUSY
    assert kernel.read_string("proc_cmdline_read") == "livepatch_cmdline: this has been live patched\n"
    info = kp.info(p)
    assert (info["hits"], info["post_hits"]) == (2, 2)  # fired on the old entry, then the call was redirected
    pre = [h for h in kp.drain() if not h.post]
    assert [h.regs["pc"] for h in pre] == [p.addr, p.addr]
    lp.disable("livepatch_cmdline")
    assert kernel.read_string("proc_cmdline_read") == original
    kp.unregister("cmdline")
    lp.unload("livepatch_cmdline")
    assert kernel.read_string("proc_cmdline_read") == original


def test_a_fault_while_stepping_resets_the_probe_state(kernel: Kernel, kp: Kprobes) -> None:
    s = kernel.kallsyms.lookup("kpt_load")
    off = next(o for o in range(8, s.size, 4) if (kernel.memory.read_u32(s.addr + o) & 0xFFC00000) == 0xF9400000)
    p = kp.register("ld", f"kpt_load+{off:#x}")  # ldr x8, [x0]: stepped
    assert p.mode == "step"
    buf = kernel.host_buffer.alloc(8)
    kernel.memory.write_u64(buf, 41)
    assert kernel.call("kpt_load", buf) == 42
    with pytest.raises(GuestFault) as err:
        kernel.call("kpt_load", 0x10)  # unmapped: faults in the slot
    assert err.value.details["pc"] == p.slot
    assert kp.faults_reset == 1
    assert kernel.call("kpt_load", buf) == 42  # the CPU's next hit is a plain hit, not a reentry BUG
    assert kp.info(p)["hits"] == 3
    assert kp.bugs() == 0


def test_bad_targets(kernel: Kernel, kp: Kprobes) -> None:
    with pytest.raises(KprobeRefused, match="beyond"):
        kp.register("b", "kpt_leaf+0x400")
    with pytest.raises(SymbolError):
        kp.register("b", "no_such_function+0x8")
    with pytest.raises(KprobeRefused, match="not inside a function"):
        kp.register("b", abi.MODULES_VADDR + 0x100)
    with pytest.raises(KprobeRefused, match="bad probe name"):
        kp.register("a b", "kpt_leaf")
    with pytest.raises(KprobeRefused, match="set_reg"):
        kp.register("b", "kpt_leaf", set_reg=31)
    names = corpus.function_names()
    for i in range(abi.KPROBE_MAX):
        kp.register(f"p{i}", names[200 + i])
    with pytest.raises(KprobeNoSpace):
        kp.register("one_more", names[300])
    assert kernel.call(names[200], 3) == kernel.call(names[200], 3)
    assert sum(p["hits"] for p in kp.describe()) == 2
