"""The committed guest image: reproducible, laid out like an arm64 CALL_OPS kernel, ABI in one place."""

from __future__ import annotations

import hashlib
from pathlib import Path

from daemon.arch.arm64 import insn
from daemon.guest import abi, build
from daemon.guest.layout import Struct, render_c, u8, u64
from daemon.kernel.kernel import load_image


def test_rebuild_is_byte_identical(tmp_path: Path) -> None:
    """A fresh build in another folder gives the committed image, byte for byte."""
    built = build.build(tmp_path)
    assert hashlib.sha256(built.read_bytes()).digest() == hashlib.sha256(build.IMAGE_PATH.read_bytes()).digest()


def test_patchable_entries_have_the_call_ops_layout() -> None:
    """Every mcount_loc entry is 8-aligned, 4 NOPs, and the symbol sits 8 bytes in (=4,2 layout)."""
    image, kallsyms = load_image(build.IMAGE_PATH)
    entries = image.mcount_loc()
    assert len(entries) >= 10_000
    text = image.section(".text")
    funcs = {s.addr: s for s in kallsyms if s.is_func}
    for entry in entries:
        assert entry % 8 == 0
        off = entry - text.addr
        words = [int.from_bytes(text.data[off + 4 * i : off + 4 * i + 4], "little") for i in range(4)]
        assert words == [insn.NOP] * 4
        assert entry + 8 in funcs, f"no function symbol at {entry + 8:#x}"


def test_notrace_functions_have_no_record() -> None:
    """Scheduler, entry code and host calls are not traceable; workload functions are."""
    image, kallsyms = load_image(build.IMAGE_PATH)
    traced = {e + 8 for e in image.mcount_loc()}
    for name in ("schedule", "cpu_switch_to", "host_call", "worker_main", "wait_on", "memcpy", "count_tramp"):
        assert kallsyms.addr(name) not in traced, name
    for name in ("cmdline_proc_show", "__arm64_sys_getpid", "sleeper_inner", "seq_printf", "work_chain"):
        assert kallsyms.addr(name) in traced, name


def test_build_id_and_memory_map() -> None:
    image, kallsyms = load_image(build.IMAGE_PATH)
    assert len(image.build_id) == 40
    assert kallsyms.addr("_text") == abi.KIMAGE_VADDR
    # the module area is out of BL range of all kernel text, as on real arm64
    assert kallsyms.addr("_text") - (abi.MODULES_VADDR + abi.MODULES_SIZE) > insn.BL_RANGE


def test_layout_renders_static_asserts_and_asm_offsets() -> None:
    """The generated header lets the C compiler check each offset the Python layout computed."""
    s = Struct("demo", [u8("a"), u64("b"), u8("c", 3)])
    assert (s.offsetof("b"), s.offsetof("c"), s.size) == (8, 16, 24)
    header = render_c([s], {"X": 1}, "test")
    assert "_Static_assert(__builtin_offsetof(struct demo, b) == 8" in header
    assert "#define DEMO_C 16" in header
    assert abi.task_struct.offsetof("job.args") == abi.task_struct.offsetof("job") + abi.job.offsetof("args")
