"""The module loader on the real kernel: compiled objects loaded into the module area and run in the guest."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from daemon.arch.arm64 import insn, relocs
from daemon.emu.memory import Perm
from daemon.errors import (
    AmbiguousSymbol,
    LivepatchdError,
    ModuleError,
    ModuleExists,
    ModuleFormatError,
    ModuleNoSpace,
    ModuleNotLoaded,
    RelocationOverflow,
    UnresolvedSymbol,
    UnsupportedRelocation,
)
from daemon.guest import abi
from daemon.kernel.kernel import Kernel
from daemon.livepatch.artifact import compile_object
from daemon.module_loader import LoadedModule, ModuleLoader, elf, link

# A module in C: calls kernel functions (PLT veneers), a sympos-disambiguated static, its own data, rodata
# and bss, and kernel data through ADRP/ADD/LDR and ABS64.
C_MODULE = r"""
#include "kernel.h"

extern char saved_command_line[256];
u64 __arm64_sys_getpid(u64 regs);
u64 helper_3(u64 x) __asm__(".klp.sym.vmlinux.corpus_helper,3");

static u64 hits;
u64 scale = 3;
static const char greeting[] = "module says";
const char *greeting_ptr = greeting;
char *cmdline_ptr = saved_command_line;
u64 (*getpid_ptr)(u64) = __arm64_sys_getpid;

u64 mod_cmdline_len(void)
{
	hits++;
	return strlen(saved_command_line) * scale;
}

u64 mod_hits(void)
{
	return hits;
}

u64 mod_format(char *buf, u64 size, u64 x)
{
	return (u64)snprintf(buf, size, "%s %lu [%s]", greeting_ptr, x, cmdline_ptr);
}

u64 mod_strlen(const char *s)
{
	return strlen(s);
}

u64 mod_helper_3(u64 x)
{
	return helper_3(x);
}

u64 mod_poke_cmdline(u64 i, u64 c)
{
	u64 old = (u8)saved_command_line[i];

	saved_command_line[i] = (char)c;
	return old;
}

u64 mod_getpid_loop(u64 n)
{
	u64 good = 0, pid = getpid_ptr(0);

	for (u64 i = 0; i < n; i++)
		good += __arm64_sys_getpid(0) == pid;
	return good;
}
"""

# Every relocation type the loader implements, in assembly (the compiler alone emits only some of them).
# `missing` is an undefined weak symbol: it binds to 0, so checked relocations get small values.
ASM_RELOCS = r"""
	.weak missing
	.text
	.globl f_movw
	.p2align 3
f_movw:
	movz x0, #:abs_g3:saved_command_line
	movk x0, #:abs_g2_nc:saved_command_line
	movk x0, #:abs_g1_nc:saved_command_line
	movk x0, #:abs_g0_nc:saved_command_line
	ret

	.globl f_movw_checked
f_movw_checked:
	movz x0, #:abs_g2:missing + 0x123400000000
	movk x0, #:abs_g1:missing + 0x56780000
	movk x0, #:abs_g0:missing + 0x9abc
	ret

	.globl f_adr
f_adr:
	adr x0, other_target
	ret

	.globl f_ldr_literal
f_ldr_literal:
	ldr x0, other_literal
	ret

	.globl f_adrp_nc
f_adrp_nc:
	adrp x0, :pg_hi21_nc:d64
	add x0, x0, :lo12:d64
	ret

	.globl f_loads
f_loads:
	adrp x1, d8
	ldrb w2, [x1, :lo12:d8]
	adrp x1, d16
	ldrh w3, [x1, :lo12:d16]
	add x2, x2, x3
	adrp x1, d32
	ldr w3, [x1, :lo12:d32]
	add x2, x2, x3
	adrp x1, d64
	ldr x3, [x1, :lo12:d64]
	add x0, x2, x3
	ret

	.globl f_ldst128
f_ldst128:
	adrp x1, d128
	ldr q0, [x1, :lo12:d128]
	ret

	.globl f_branches
f_branches:
	cbz x0, other_zero
	tbnz x0, #1, other_bit1
	cmp x0, #5
	b.eq other_five
	b other_default

	.globl f_tail
f_tail:
	b strlen

	.globl f_call
f_call:
	stp x29, x30, [sp, #-16]!
	mov x29, sp
	bl strlen
	ldp x29, x30, [sp], #16
	ret

	.section .text.other, "ax"
	.globl other_target
other_target:
	nop
other_zero:
	mov x0, #100
	ret
other_bit1:
	mov x0, #101
	ret
other_five:
	mov x0, #105
	ret
other_default:
	mov x0, #102
	ret
	.p2align 3
	.globl other_literal
other_literal:
	.quad 0x1122334455667788

	.section .rodata
	.globl ro_word
ro_word:
	.word 0x5a5a5a5a

	.data
	.p2align 4
	.globl d128, d64, d32, d16, d8, table
d128: .quad 0x1111, 0x2222
d64: .quad 0x4000000000
d32: .word 0x30000
d16: .hword 0x200
d8: .byte 0x10
	.p2align 3
table:
	.quad saved_command_line + 8
	.quad ro_word - .
	.word ro_word - .
	.word missing + 0x7fff1234
	.hword missing + 0xfff0
	.hword ro_word - .
	.p2align 3
	.quad f_call
"""

# Each must be refused with RelocationOverflow: kernel addresses do not fit these fields.
OVERFLOWS = {
    "abs32": ".data\n.word saved_command_line\n",
    "movw_g0": ".text\nmovz x0, #:abs_g0:saved_command_line\n",
    "condbr19": ".text\nb.eq strlen\n",
    "tstbr14": ".text\ntbz x0, #3, strlen\n",
}

UNRESOLVED = '#include "kernel.h"\nu64 no_such_function(u64);\nu64 f(u64 x) { return no_such_function(x); }\n'
AMBIGUOUS = '#include "kernel.h"\nu64 corpus_helper(u64);\nu64 f(u64 x) { return corpus_helper(x); }\n'
TOO_BIG = '#include "kernel.h"\nchar huge[32 << 20];\nu64 f(u64 i) { return (u64)huge[i]; }\n'
RETURNS = '#include "kernel.h"\nu64 answer(void) {{ return {value}; }}\n'


@pytest.fixture(scope="module")
def objects(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Every test object, compiled once with the guest kernel's flags (in parallel)."""
    work = tmp_path_factory.mktemp("objs")
    jobs: dict[str, tuple[str, str]] = {
        "c_module": (C_MODULE, ".c"), "asm_relocs": (ASM_RELOCS, ".S"), "unresolved": (UNRESOLVED, ".c"),
        "ambiguous": (AMBIGUOUS, ".c"), "too_big": (TOO_BIG, ".c"),
        "returns_1": (RETURNS.format(value=1), ".c"), "returns_2": (RETURNS.format(value=2), ".c"),
    }
    jobs.update({f"overflow_{k}": (v, ".S") for k, v in OVERFLOWS.items()})
    with ThreadPoolExecutor(max_workers=4) as pool:
        built = {name: pool.submit(compile_object, src, name, work, suffix=suffix)
                 for name, (src, suffix) in jobs.items()}
        return {name: f.result() for name, f in built.items()}


@pytest.fixture(scope="module")
def kernel(module_kernel: Kernel) -> Kernel:
    """One booted kernel for this file's tests (each test unloads what it loaded)."""
    return module_kernel


@pytest.fixture
def loader(kernel: Kernel) -> Iterator[ModuleLoader]:
    ml = ModuleLoader(kernel)
    text_free, data_free = kernel.module_text_alloc.free_bytes, kernel.module_data_alloc.free_bytes
    yield ml
    for name in list(ml.modules):
        ml.unload(name)
    assert (kernel.module_text_alloc.free_bytes, kernel.module_data_alloc.free_bytes) == (text_free, data_free)


def area_state(kernel: Kernel) -> tuple[int, int, bytes]:
    """What a refused load must leave unchanged: both allocators and the start of the module area."""
    return (kernel.module_text_alloc.free_bytes, kernel.module_data_alloc.free_bytes,
            kernel.memory.read(abi.MODULES_VADDR, 64 << 10) + kernel.memory.read(abi.MODULES_DATA_VADDR, 64 << 10))


def call_string(kernel: Kernel, fn: int, *args: int) -> str:
    buf = kernel.host_buffer.alloc(256)
    try:
        n = kernel.call(fn, buf, 256, *args)
        return kernel.memory.read(buf, n).decode()
    finally:
        kernel.host_buffer.free(buf, 256)


# -- end to end ------------------------------------------------------------------------------------------------

def test_c_module_runs_in_the_guest(kernel: Kernel, loader: ModuleLoader, objects: dict[str, bytes]) -> None:
    """Kernel calls through veneers, own data/rodata/bss, kernel data via ADRP/LDR and ABS64, all correct."""
    m = loader.load("c_module", objects["c_module"])
    cmdline = kernel.memory.read_cstr(kernel.kallsyms.addr("saved_command_line"))
    assert kernel.call(m.addr("mod_hits")) == 0  # .bss starts zeroed
    assert kernel.call(m.addr("mod_cmdline_len")) == 3 * len(cmdline)
    assert kernel.call(m.addr("mod_cmdline_len")) == 3 * len(cmdline)
    assert kernel.call(m.addr("mod_hits")) == 2
    assert call_string(kernel, m.addr("mod_format"), 42) == f"module says 42 [{cmdline}]"
    helper_3 = kernel.kallsyms.lookup("corpus_helper", 3).addr
    assert kernel.call(m.addr("mod_helper_3"), 1000) == kernel.call(helper_3, 1000) != 1000
    assert kernel.call(m.addr("mod_getpid_loop"), 50) == 50
    # a store into kernel data through ADRP + STRB
    assert kernel.call(m.addr("mod_poke_cmdline"), 0, ord("X")) == ord(cmdline[0])
    assert kernel.read_string("proc_cmdline_read") == "X" + cmdline[1:] + "\n"
    kernel.call(m.addr("mod_poke_cmdline"), 0, ord(cmdline[0]))
    assert kernel.read_string("proc_cmdline_read") == cmdline + "\n"


def test_kernel_calls_go_through_one_veneer_per_target(kernel: Kernel, loader: ModuleLoader,
                                                       objects: dict[str, bytes]) -> None:
    """Every BL to the kernel lands on a veneer `adrp x16; add x16; br x16` to its target; one per target."""
    m = loader.load("c_module", objects["c_module"])
    sym = kernel.kallsyms.addr
    targets = {sym("strlen"), sym("snprintf"), sym("__arm64_sys_getpid"),
               kernel.kallsyms.lookup("corpus_helper", 3).addr}
    assert set(m.veneers) == targets
    for target, veneer in m.veneers.items():
        words = struct.unpack("<3I", kernel.memory.read(veneer, 12))
        assert insn.decode_plt_entry(words, veneer) == target
        assert not insn.reachable_by_bl(veneer, target)
        assert m.text[0] <= veneer < m.text[1]
    bls = []
    for name in ("mod_cmdline_len", "mod_strlen"):
        s = m.symbol(name)
        for pc in range(s.addr, s.end, 4):
            decoded = insn.decode_branch(kernel.memory.read_u32(pc), pc)
            if decoded is not None and decoded[1]:
                bls.append(decoded[0])
    assert bls == [m.veneers[sym("strlen")]] * 2  # two call sites, one veneer


def test_every_relocation_type(kernel: Kernel, loader: ModuleLoader, objects: dict[str, bytes]) -> None:
    """MOVW G0..G3, ADR, LDR literal, ADRP(+NC)/ADD/LDST8..128, CONDBR19, TSTBR14, JUMP26/CALL26, data relocs."""
    m = loader.load("asm_relocs", objects["asm_relocs"])
    sym = kernel.kallsyms.addr
    call = kernel.call
    assert call(m.addr("f_movw")) == sym("saved_command_line")
    assert call(m.addr("f_movw_checked")) == 0x1234_5678_9ABC
    assert call(m.addr("f_adr")) == m.addr("other_target")
    assert call(m.addr("f_ldr_literal")) == 0x1122334455667788
    assert call(m.addr("f_adrp_nc")) == m.addr("d64")
    assert call(m.addr("f_loads")) == 0x10 + 0x200 + 0x30000 + 0x4000000000
    assert [call(m.addr("f_branches"), x) for x in (0, 2, 5, 9)] == [100, 101, 105, 102]
    s = kernel.host_buffer.alloc(16)
    kernel.memory.write(s, b"twelve chars\0")
    assert call(m.addr("f_tail"), s) == call(m.addr("f_call"), s) == 12
    kernel.host_buffer.free(s, 16)
    # LDST128 (FP/SIMD is not run in the guest): the scaled imm12 must be d128's low 12 bits / 16
    ldr_q = kernel.memory.read_u32(m.addr("f_ldst128") + 4)
    assert ((ldr_q >> 10) & 0xFFF) << 4 == m.addr("d128") & 0xFFF
    table = m.addr("table")
    abs64, prel64, prel32, abs32, abs16, prel16, fptr = struct.unpack("<QqiIHh4xQ", kernel.memory.read(table, 40))
    assert abs64 == sym("saved_command_line") + 8
    assert table + 8 + prel64 == m.addr("ro_word")
    assert table + 16 + prel32 == m.addr("ro_word")
    assert (abs32, abs16) == (0x7FFF1234, 0xFFF0)
    assert table + 26 + prel16 == m.addr("ro_word")
    assert fptr == m.addr("f_call")


@pytest.mark.parametrize("case", sorted(OVERFLOWS))
def test_relocation_overflow_is_refused(kernel: Kernel, loader: ModuleLoader, objects: dict[str, bytes],
                                        case: str) -> None:
    """A kernel address in ABS32, MOVW_UABS_G0, CONDBR19 (+-1 MiB) or TSTBR14 (+-32 KiB): refused, nothing kept."""
    before = area_state(kernel)
    with pytest.raises(RelocationOverflow) as err:
        loader.load("overflow", objects[f"overflow_{case}"])
    assert err.value.code == "module_relocation_overflow"
    assert area_state(kernel) == before
    assert not loader.modules


def test_layout_permissions_and_records(kernel: Kernel, loader: ModuleLoader, objects: dict[str, bytes]) -> None:
    """Code in r-x module text, data/rodata/bss in rw- module data; patchable entries and the ftrace PLT."""
    m = loader.load("c_module", objects["c_module"])
    for name in ("mod_cmdline_len", "mod_format"):
        assert kernel.is_text(m.addr(name))
        assert kernel.memory.region(m.addr(name)).perms == Perm.RX
    assert m.data is not None
    for name in ("scale", "greeting", "hits", "greeting_ptr"):
        assert kernel.memory.region(m.addr(name)).perms == Perm.RW
        assert m.data[0] <= m.addr(name) < m.data[1]
    assert not kernel.is_text(m.addr("scale"))
    assert kernel.memory.read_u64(m.addr("greeting_ptr")) == m.addr("greeting")
    assert kernel.memory.read_u64(m.addr("cmdline_ptr")) == kernel.kallsyms.addr("saved_command_line")
    funcs = sorted(s.addr for s in m.all_symbols if s.is_func)
    assert list(m.patchable_entries) == [f - 8 for f in funcs]  # two NOPs before, two at entry: traceable
    for f in funcs:
        assert [kernel.memory.read_u32(f + d) for d in (-8, -4, 0, 4)] == [insn.NOP] * 4
    assert m.ftrace_plt is not None
    words = struct.unpack("<3I", kernel.memory.read(m.ftrace_plt, 12))
    assert insn.decode_plt_entry(words, m.ftrace_plt) == kernel.kallsyms.addr("ftrace_caller")
    assert loader.module_at(m.addr("mod_hits")) is m
    assert m.describe(m.addr("mod_hits") + 4).startswith("mod_hits+0x4/")
    assert m.describe(m.addr("mod_hits") + 4).endswith(" [c_module]")


def test_reused_area_runs_new_code_not_stale_translations(kernel: Kernel, loader: ModuleLoader,
                                                          objects: dict[str, bytes]) -> None:
    """Load, run (translate), unload, load other code at the same address: the vCPU runs the new code."""
    a = loader.load("ret", objects["returns_1"])
    assert [kernel.call(a.addr("answer"), cpu=c) for c in (0, 1)] == [1, 1]
    addr = a.addr("answer")
    loader.unload(a)
    assert kernel.memory.read_u32(addr) == insn.gen_brk(0x800)  # a stray call now traps
    b = loader.load("ret", objects["returns_2"])
    assert b.addr("answer") == addr
    assert [kernel.call(b.addr("answer"), cpu=c) for c in (0, 1)] == [2, 2]


def test_bss_is_zero_in_a_reused_block(kernel: Kernel, loader: ModuleLoader, objects: dict[str, bytes]) -> None:
    """A module's counters start at 0 even where an unloaded module left data behind."""
    m = loader.load("c_module", objects["c_module"])
    kernel.call(m.addr("mod_cmdline_len"))
    hits = m.addr("hits")
    assert kernel.memory.read_u64(hits) == 1
    loader.unload(m)
    m = loader.load("c_module", objects["c_module"])
    assert m.addr("hits") == hits
    assert kernel.call(m.addr("mod_hits")) == 0


# -- relocation arithmetic at its limits ----------------------------------------------------------------------

P = 0xFFFF_8000_0000_1000  # a place in module text


@pytest.mark.parametrize(("rtype", "ok", "bad"), [
    (relocs.R_AARCH64_ABS32, [-(1 << 31), (1 << 32) - 1], [-(1 << 31) - 1, 1 << 32]),
    (relocs.R_AARCH64_ABS16, [-(1 << 15), 0xFFFF], [-(1 << 15) - 1, 1 << 16]),
    (relocs.R_AARCH64_PREL32, [P - (1 << 31), P + (1 << 32) - 1], [P - (1 << 31) - 1, P + (1 << 32)]),
    (relocs.R_AARCH64_MOVW_UABS_G1, [0, (1 << 32) - 1], [1 << 32]),
    (relocs.R_AARCH64_TSTBR14, [P - (1 << 15), P + (1 << 15) - 4], [P - (1 << 15) - 4, P + (1 << 15), P + 2]),
    (relocs.R_AARCH64_CONDBR19, [P - (1 << 20), P + (1 << 20) - 4], [P + (1 << 20)]),
    (relocs.R_AARCH64_CALL26, [P - (128 << 20), P + (128 << 20) - 4], [P + (128 << 20), P - (128 << 20) - 4]),
    (relocs.R_AARCH64_ADR_PREL_PG_HI21, [P + (1 << 32) - 0x2000], [P + (1 << 32)]),
    (relocs.R_AARCH64_LDST64_ABS_LO12_NC, [0x1238], [0x1234]),
])
def test_relocation_limits(rtype: int, ok: list[int], bad: list[int]) -> None:
    """The ABI's overflow checks at their exact bounds (and the linker's alignment check on LDSTn)."""
    kind = relocs.lookup(rtype)
    assert kind is not None
    template = {relocs.R_AARCH64_CALL26: insn.gen_branch(0, 0, link=True),
                relocs.R_AARCH64_ADR_PREL_PG_HI21: insn.gen_adrp(0, 0, 0)}.get(rtype, 0)
    for value in ok:
        buf = bytearray(struct.pack("<Q", template))
        relocs.apply(kind, buf, 0, P, value & (1 << 64) - 1)
    for value in bad:
        with pytest.raises(RelocationOverflow):
            relocs.apply(kind, bytearray(struct.pack("<Q", template)), 0, P, value & (1 << 64) - 1)


def test_klp_sym_names(kernel: Kernel) -> None:
    """.klp.sym.vmlinux.<name>,<sympos> picks one of several; a position that does not exist is unresolved."""
    ks = kernel.kallsyms
    assert link.kernel_symbol(ks, ".klp.sym.vmlinux.corpus_helper,2") == ks.lookup("corpus_helper", 2).addr
    assert link.kernel_symbol(ks, "strlen") == ks.addr("strlen")
    with pytest.raises(UnresolvedSymbol):
        link.kernel_symbol(ks, ".klp.sym.vmlinux.corpus_helper,99")
    with pytest.raises(AmbiguousSymbol):
        link.kernel_symbol(ks, "corpus_helper")


# -- refusals --------------------------------------------------------------------------------------------------

def test_unresolved_and_ambiguous_symbols(kernel: Kernel, loader: ModuleLoader, objects: dict[str, bytes]) -> None:
    """Unknown name: UnresolvedSymbol; a static defined in 16 files, without .klp.sym sympos: AmbiguousSymbol."""
    before = area_state(kernel)
    with pytest.raises(UnresolvedSymbol) as err:
        loader.load("bad", objects["unresolved"])
    assert err.value.details["symbol"] == "no_such_function"
    assert err.value.errno == -2
    with pytest.raises(AmbiguousSymbol) as amb:
        loader.load("bad", objects["ambiguous"])
    assert ".klp.sym.vmlinux.corpus_helper,<sympos>" in amb.value.message
    assert area_state(kernel) == before


def test_unknown_relocation_type(kernel: Kernel, loader: ModuleLoader, objects: dict[str, bytes]) -> None:
    """A relocation type the loader does not know (here 1000, patched into a valid object) is refused."""
    raw = bytearray(objects["c_module"])
    parsed = elf.parse(bytes(raw))
    rela = next(s for s in parsed.sections if s.name == ".rela.text")
    shoff = struct.unpack_from("<Q", raw, 0x28)[0]
    offset = struct.unpack_from("<Q", raw, shoff + rela.index * 64 + 24)[0]
    info = struct.unpack_from("<Q", raw, offset + 8)[0]
    struct.pack_into("<Q", raw, offset + 8, (info & ~0xFFFF_FFFF) | 1000)
    before = area_state(kernel)
    with pytest.raises(UnsupportedRelocation) as err:
        loader.load("bad", bytes(raw))
    assert err.value.details["type"] == 1000
    assert area_state(kernel) == before


@pytest.mark.parametrize(("offset", "value", "message"), [
    (4, 1, "not ELF64 little-endian"),  # ELFCLASS32
    (5, 2, "not ELF64 little-endian"),  # big-endian
    (18, 62, "machine 62, not AArch64"),  # EM_X86_64
    (16, 2, "not ET_REL"),  # ET_EXEC
    (0, 0x7E, "no ELF magic"),
])
def test_bad_elf_headers(loader: ModuleLoader, objects: dict[str, bytes], offset: int, value: int,
                         message: str) -> None:
    """Wrong class, byte order, machine, type or magic: refused before anything else is read."""
    raw = bytearray(objects["returns_1"])
    raw[offset] = value
    with pytest.raises(ModuleFormatError, match=message):
        loader.load("bad", bytes(raw))


def test_kernel_image_is_not_a_module(loader: ModuleLoader, kernel: Kernel) -> None:
    """vmlinux is an AArch64 ELF, but ET_EXEC."""
    with pytest.raises(ModuleFormatError, match="not ET_REL"):
        loader.load("vmlinux", kernel.config.image.read_bytes())


def test_no_space(kernel: Kernel, loader: ModuleLoader, objects: dict[str, bytes]) -> None:
    """A 32 MiB bss exceeds the per-module limit; a full module data area refuses a small module."""
    before = area_state(kernel)
    with pytest.raises(ModuleNoSpace):
        loader.load("big", objects["too_big"])
    alloc = kernel.module_data_alloc
    hog = alloc.alloc(alloc.free_bytes)
    try:
        with pytest.raises(ModuleNoSpace) as err:
            loader.load("c_module", objects["c_module"])
        assert err.value.errno == -12
    finally:
        alloc.free(hog, abi.MODULES_DATA_SIZE)
    assert area_state(kernel) == before


def test_names_and_unload(loader: ModuleLoader, objects: dict[str, bytes]) -> None:
    """A name is loaded once; unloading twice (by object or name) is refused."""
    m = loader.load("one", objects["returns_1"])
    with pytest.raises(ModuleExists):
        loader.load("one", objects["returns_2"])
    with pytest.raises(ModuleError, match="bad module name"):
        loader.load("no spaces", objects["returns_2"])
    loader.unload(m)
    with pytest.raises(ModuleNotLoaded):
        loader.unload(m)
    with pytest.raises(ModuleNotLoaded):
        loader.unload("one")
    assert loader.module_at(m.text[0]) is None


# -- fuzzing ---------------------------------------------------------------------------------------------------

def _refused_or_loaded(kernel: Kernel, loader: ModuleLoader, raw: bytes) -> LoadedModule | None:
    before = area_state(kernel)
    try:
        m = loader.load("fuzz", raw)
    except LivepatchdError as exc:
        event(f"refused: {exc.code}")
        assert area_state(kernel) == before
        return None
    event("loaded")
    loader.unload(m)
    return m


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=4096))
def test_fuzz_random_bytes(kernel: Kernel, loader: ModuleLoader, raw: bytes) -> None:
    """Garbage is refused with a ModuleFormatError and nothing changes."""
    before = area_state(kernel)
    with pytest.raises(ModuleFormatError):
        loader.load("fuzz", raw)
    assert area_state(kernel) == before


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_mutated_objects(kernel: Kernel, loader: ModuleLoader, objects: dict[str, bytes],
                              data: st.DataObject) -> None:
    """Random byte edits and truncations of valid objects: loaded, or refused with a LivepatchdError."""
    raw = bytearray(objects[data.draw(st.sampled_from(["c_module", "asm_relocs"]))])
    header_bias = data.draw(st.booleans())  # half the edits land in the ELF header or section headers
    shoff = struct.unpack_from("<Q", raw, 0x28)[0]
    positions = st.one_of(st.integers(0, 63), st.integers(shoff, len(raw) - 1)) if header_bias \
        else st.integers(0, len(raw) - 1)
    for pos, value in data.draw(st.lists(st.tuples(positions, st.integers(0, 255)), min_size=1, max_size=8)):
        raw[pos] = value
    if data.draw(st.booleans()):
        del raw[data.draw(st.integers(0, len(raw))):]
    _refused_or_loaded(kernel, loader, bytes(raw))


def test_object_compiles_reproducibly(tmp_path: Path, objects: dict[str, bytes]) -> None:
    """The same source compiled elsewhere gives the same bytes (relative names, -g0)."""
    assert compile_object(C_MODULE, "c_module", tmp_path) == objects["c_module"]


@pytest.mark.parametrize(("section", "entsize"), [(".rela.text", 0), (".rela.text", 16), (".symtab", 0),
                                                   (".symtab", 48)])
def test_table_entry_sizes_are_checked(kernel: Kernel, loader: ModuleLoader, objects: dict[str, bytes],
                                       section: str, entsize: int) -> None:
    """A RELA or symbol table whose sh_entsize is not its entry's size is refused (module_bad_elf), not read
    as if it were 24 / 24 bytes per entry; nothing is allocated."""
    raw = bytearray(objects["c_module"])
    target = next(s for s in elf.parse(bytes(raw)).sections if s.name == section)
    shoff = struct.unpack_from("<Q", raw, 0x28)[0]
    struct.pack_into("<Q", raw, shoff + target.index * 64 + 56, entsize)  # sh_entsize, the header's last field
    before = area_state(kernel)
    with pytest.raises(ModuleFormatError, match=f"entry size {entsize}, expected 24") as err:
        loader.load("bad", bytes(raw))
    assert err.value.code == "module_bad_elf"
    assert err.value.details["section"] == section
    assert area_state(kernel) == before
