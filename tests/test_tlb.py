"""The vCPUs' TLB modes on the real image: the virtual TLB's native fill honours every region's permissions.

A wrong permission would be a security bug, so each forbidden access is tried in both modes on its own vCPU
(a fault ends that vCPU) and must fault the same way: same error, same faulting instruction.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.emu.memory import Backing, Perm, Region
from daemon.emu.native import build as native
from daemon.emu.tlb import DEFAULT_TLB_MODE, FillTable, TlbMode
from daemon.errors import GuestFault, NativeBuildError
from daemon.ftrace.core import Ftrace
from daemon.ftrace.ops import FtraceOps
from daemon.ftrace.tracer import FunctionTracer
from daemon.kernel.kernel import Kernel, KernelConfig
from daemon.settings import Settings

CASES = ["store to text", "store to rodata", "store to module text", "fetch from data", "fetch from heap",
         "read unmapped", "store unmapped"]


def _attempt(k: Kernel, case: str, cpu: int) -> GuestFault:
    regions = {r.name: r for r in k.memory.regions}
    fn: str | int
    args: tuple[int, ...]
    if case == "store to text":
        fn, args = "memset", (k.kallsyms.addr("lkdtm_BUG"), 0, 8)
    elif case == "store to rodata":
        fn, args = "memset", (regions["kernel.rodata"].base + 64, 0, 8)
    elif case == "store to module text":
        fn, args = "memset", (regions["modules.text"].base, 0, 8)
    elif case == "fetch from data":
        fn, args = k.kallsyms.addr("boot_params"), ()
    elif case == "fetch from heap":
        fn, args = regions["heap"].base, ()
    elif case == "read unmapped":
        fn, args = "lkdtm_READ_UNMAPPED", (0x1000,)
    else:
        fn, args = "memset", (0x2000, 0, 8)
    with pytest.raises(GuestFault) as err:
        k.call(fn, *args, cpu=cpu)
    k.machine.vcpus[cpu].error = None  # acknowledged: the other vCPUs keep running
    return err.value


@pytest.fixture(scope="module")
def faults() -> dict[TlbMode, dict[str, GuestFault]]:
    out: dict[TlbMode, dict[str, GuestFault]] = {}
    for mode in TlbMode:
        with Kernel(KernelConfig(nr_cpus=len(CASES) + 1, workers_per_cpu=1, loadgens_per_cpu=0,
                                 tlb_mode=mode)) as k:
            out[mode] = {case: _attempt(k, case, cpu) for cpu, case in enumerate(CASES)}
            # the last vCPU never faulted: the machine still serves
            assert k.call("getpid_loop", 100, cpu=len(CASES)) == 100
    return out


@pytest.mark.parametrize("case", CASES)
def test_forbidden_access_faults_as_under_the_cpu_tlb(faults: dict[TlbMode, dict[str, GuestFault]],
                                                      case: str) -> None:
    cpu, virtual = faults[TlbMode.CPU][case], faults[TlbMode.VIRTUAL][case]
    assert virtual.code == "guest_fault"
    assert virtual.details["reason"] == cpu.details["reason"]
    assert virtual.details["pc"] == cpu.details["pc"]


def test_fault_reasons_name_the_access(faults: dict[TlbMode, dict[str, GuestFault]]) -> None:
    reasons = {case: f.details["reason"] for case, f in faults[TlbMode.VIRTUAL].items()}
    assert "UC_ERR_WRITE_PROT" in reasons["store to text"]
    assert "UC_ERR_WRITE_PROT" in reasons["store to rodata"]
    assert "UC_ERR_WRITE_PROT" in reasons["store to module text"]
    assert "UC_ERR_FETCH_PROT" in reasons["fetch from data"]
    assert "UC_ERR_FETCH_PROT" in reasons["fetch from heap"]
    assert "UC_ERR_READ_UNMAPPED" in reasons["read unmapped"]
    assert "UC_ERR_WRITE_UNMAPPED" in reasons["store unmapped"]


def test_virtual_tlb_is_the_default_and_filled_natively() -> None:
    assert DEFAULT_TLB_MODE is TlbMode.VIRTUAL
    assert Settings().tlb_mode == "virtual"
    with Kernel(KernelConfig(nr_cpus=1)) as k:
        v = k.machine.vcpus[0]
        assert v.tlb_mode is TlbMode.VIRTUAL
        assert v.fill_table is not None
        before = v.fill_table.fills
        assert k.call("bench_corpus", 2000, 1) == 0  # no wrong result
        assert v.fill_table.fills > before
        assert v.fill_table.refused == 0


def test_cpu_tlb_mode_has_no_fill_table() -> None:
    with Kernel(KernelConfig(nr_cpus=1, tlb_mode=TlbMode.CPU)) as k:
        assert k.machine.vcpus[0].fill_table is None
        assert k.call("bench_corpus", 2000, 1) == 0


def test_unknown_tlb_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="physical"):
        Kernel(KernelConfig(tlb_mode="physical"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tlb_mode"):
        Settings(tlb_mode="physical")  # type: ignore[arg-type]


def test_fill_table_refuses_unaligned_regions() -> None:
    r = Region("odd", 0x1000, 0x1000, Perm.RW, Backing(0x2000))
    odd = Region("odd", 0x1200, 0x1000, Perm.RW, Backing(0x2000))
    assert FillTable.of([r]).nr_regions == 1
    with pytest.raises(ValueError, match="not aligned"):
        FillTable.of([odd])


def test_native_build_is_reproducible() -> None:
    assert native.main(["--check"]) == 0


def test_native_library_builds_into_a_fresh_cache_from_any_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    path = native.library_path()
    assert path.parent == tmp_path / "cache" / "native"
    assert native.read_digests()[native.host_target()] == native._digest(path)
    mtime = path.stat().st_mtime_ns
    assert native.library_path() == path
    assert path.stat().st_mtime_ns == mtime
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".build-")]


def test_unwritable_cache_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    monkeypatch.setenv(native.CACHE_ENV, str(not_a_dir))
    with pytest.raises(NativeBuildError, match=native.CACHE_ENV) as err:
        native.library_path()
    assert err.value.details["path"] == str(not_a_dir / "native")


def test_unbuildable_source_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "tlb_fill.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(native, "SOURCE", broken)
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(NativeBuildError, match="building the native TLB fill callback failed") as err:
        native.library_path()
    assert err.value.code == "native_build_error"
    assert not list((tmp_path / "cache" / "native").iterdir())  # nothing half-built left in the cache


def test_unsupported_host_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native.platform, "machine", lambda: "riscv64")
    with pytest.raises(NativeBuildError, match="riscv64"):
        native.host_target()


def test_tlb_grows_to_the_corpus_working_set() -> None:
    """The corpus walk outgrows QEMU's initial 256-entry TLB; host calls flush a churning TLB so it grows."""
    with Kernel(KernelConfig(nr_cpus=1, loadgens_per_cpu=0)) as k:
        table = k.machine.vcpus[0].fill_table
        assert table is not None
        assert table.flushes == 3  # sized at boot: 256 -> 2048 entries
        assert k.call("bench_corpus", 20_000, 1) == 0  # translate the corpus
        fills = table.fills
        assert k.call("bench_corpus", 20_000, 1) == 0
        assert (table.fills - fills) / 20_000 < 0.1  # was 1.4 fills per call at 256 entries
        flushes = table.flushes
        for _ in range(20):  # a TLB that holds the working set is not flushed again
            k.call("getpid_loop", 1000)
        assert table.flushes == flushes


def test_no_region_is_both_writable_and_executable() -> None:
    """A page both writable and executable sends every store to it through the slow path on either TLB (its
    translations must be checked): the virtual TLB's gain depends on data never being executable."""
    with Kernel(KernelConfig(nr_cpus=1, loadgens_per_cpu=0)) as k:
        both = [r.name for r in k.memory.regions if Perm.W in r.perms and Perm.X in r.perms]
        assert both == []


def test_traced_calls_miss_the_tlb_nowhere_in_steady_state() -> None:
    """A traced call (one ops: per-callsite; two: the list function) and the function tracer's ring writes,
    once warm, take no TLB fill per call: nothing on the path leaves the fast path (bench.ftrace_ops times it)."""
    with Kernel(KernelConfig(nr_cpus=1, loadgens_per_cpu=0)) as k:
        table = k.machine.vcpus[0].fill_table
        assert table is not None
        ft = Ftrace(k)
        registered = []
        for i in range(2):
            ops = FtraceOps(f"nop{i}", "ops_func_nop")
            ft.set_filter(ops, "tracee_relevant")
            ft.register(ops)
            registered.append(ops)
            k.call("bench_tracee", 10_000, timeout=60)
            fills = table.fills
            k.call("bench_tracee", 10_000, timeout=60)
            assert table.fills - fills == 0, f"{i + 1} ops"
        for ops in registered:
            ft.unregister(ops)
        tracer = FunctionTracer(ft, filter="tracee_relevant", entries_per_cpu=1 << 14)
        tracer.start()
        k.call("bench_tracee", 1000, timeout=60)
        fills = table.fills
        k.call("bench_tracee", 10_000, timeout=60)
        # a 48-byte entry per call: a new 1 KiB ring page every ~21 calls, nothing more
        assert table.fills - fills <= 10_000 * 48 // 1024 + 4
        assert tracer.dropped == 0
        assert len(tracer.stop()) == 11_000
        assert table.refused == 0
