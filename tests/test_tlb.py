"""The virtual TLB with the native fill faults exactly as the emulated CPU TLB does, and runs the kernel."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.emu import native
from daemon.emu.tlb import TLB_MODES, TlbMode
from daemon.errors import GuestFault
from daemon.kernel.kernel import Kernel, KernelConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=TLB_MODES)
def kernel(request: pytest.FixtureRequest) -> Iterator[Kernel]:
    mode: TlbMode = request.param
    with Kernel(KernelConfig(nr_cpus=2, loadgens_per_cpu=0, tlb_mode=mode)) as k:
        yield k


def _region(k: Kernel, name: str) -> tuple[int, int]:
    r = next(r for r in k.memory.regions if r.name == name)
    return r.base, r.end


def _fault(k: Kernel, fn: str | int, *args: int) -> tuple[str, str]:
    """Run a call that must fault on CPU 1: (Unicorn's error, the function it faulted in). The faulted vCPU
    stays dead, so each case boots a kernel of its own."""
    with pytest.raises(GuestFault) as err:
        k.call(fn, *args, cpu=1, timeout=10)
    k.machine.vcpus[1].error = None
    pc = err.value.details["pc"]
    return str(err.value.details["reason"]), k.kallsyms.describe(pc).split("+")[0]


CASES = {
    # name: (what to call, expected Unicorn error, function it faults in)
    "store to text": (lambda k: ("memset", _region(k, "kernel.text")[0] + 0x100, 0, 8), "UC_ERR_WRITE_PROT", "memset"),
    "store to rodata": (lambda k: ("memset", _region(k, "kernel.rodata")[0], 0, 8), "UC_ERR_WRITE_PROT", "memset"),
    "store to module text": (lambda k: ("memset", _region(k, "modules.text")[0], 0, 8), "UC_ERR_WRITE_PROT",
                             "memset"),
    "fetch from data": (lambda k: (_region(k, "kernel.data")[0] + 0x40,), "UC_ERR_FETCH_PROT", None),
    "fetch from heap": (lambda k: (_region(k, "heap")[0],), "UC_ERR_FETCH_PROT", None),
    "read of page 1": (lambda k: ("lkdtm_READ_UNMAPPED", 0x1000), "UC_ERR_READ_UNMAPPED", "lkdtm_READ_UNMAPPED"),
    "read past the heap": (lambda k: ("lkdtm_READ_UNMAPPED", _region(k, "heap")[1] + 0x10), "UC_ERR_READ_UNMAPPED",
                           "lkdtm_READ_UNMAPPED"),
}


@pytest.mark.parametrize("mode", TLB_MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_faults_are_the_same_in_both_modes(mode: TlbMode, case: str) -> None:
    make, error, where = CASES[case]
    with Kernel(KernelConfig(nr_cpus=2, loadgens_per_cpu=0, tlb_mode=mode)) as k:
        text = _region(k, "kernel.text")[0] + 0x100
        # Warm the translation of the target page first: a TLB entry made by a read must not let a store through.
        assert k.call("memcpy", k.heap.alloc(64), text, 64, cpu=1) != 0
        call = make(k)
        reason, fn = _fault(k, *call)
        assert error in reason
        if where is not None:
            assert fn == where
        assert k.call("getpid_loop", 10, cpu=0) >= 0, "the other CPU keeps running"


def test_kernel_memory_is_readable_and_writable_where_it_should_be(kernel: Kernel) -> None:
    buf = kernel.heap.alloc(256)
    assert kernel.call("memset", buf, 0x5A, 256, cpu=1) == buf
    assert kernel.memory.read(buf, 256) == b"\x5a" * 256, "guest stores reach the host's view"
    kernel.memory.write(buf, b"\x11" * 16)
    dst = kernel.heap.alloc(16)
    kernel.call("memcpy", dst, buf, 16, cpu=0)
    assert kernel.memory.read(dst, 16) == b"\x11" * 16, "host writes reach the guest, on every CPU"


def test_the_virtual_tlb_counts_its_fills(kernel: Kernel) -> None:
    vcpu = kernel.machine.vcpus[0]
    if kernel.config.tlb_mode == "cpu":
        assert vcpu.tlb_fills is None
        return
    assert vcpu.tlb_fills is not None
    before = vcpu.tlb_fills.fills
    kernel.call("bench_corpus", 2000, 1, cpu=0)
    assert vcpu.tlb_fills.fills > before, "a walk over 10,240 functions misses the TLB"


def test_the_native_objects_are_reproducible() -> None:
    """The committed objects are what the source builds to (CI runs the same check)."""
    done = subprocess.run([sys.executable, "-m", "daemon.emu.native", "--check"], cwd=ROOT, capture_output=True,
                          text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr


def test_an_unsupported_host_gets_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native.platform, "machine", lambda: "riscv64")
    with pytest.raises(native.NativeUnavailable, match="tlb_mode='cpu'"):
        native.host_object()


def test_a_missing_object_gets_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(native, "HERE", tmp_path)
    with pytest.raises(native.NativeUnavailable, match=r"python -m daemon\.emu\.native"):
        native.host_object()
